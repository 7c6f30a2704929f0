"""The clinical CSV: one row per patient with a follow-up time, an event flag and covariates.

Checked in full before any analysis: a wrong column, a time that is not a non-negative number
or an event that is not 0/1 fails with the file, the rows and the fix. A patient whose time or
event cell is empty has no follow-up and is left out of the survival analysis (listed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from melanoma_mil.data.cohort import is_missing, repeated
from melanoma_mil.errors import UserError
from melanoma_mil.io import read_text_csv

TIME, EVENT = "__time", "__event"  # internal names, so no covariate can collide with them


@dataclass
class Clinical:
    """``table``: index patient_id; TIME (float), EVENT (0/1) and the covariates (float for
    numeric columns, str for categorical ones, NaN where empty)."""

    table: pd.DataFrame
    covariates: dict[str, str]  # name -> "numeric" | "categorical"
    time_column: str
    event_column: str
    no_follow_up: list[str] = field(default_factory=list)


def _rows(df: pd.DataFrame, mask: pd.Series) -> str:
    rows = [f"row {i + 2} ({df.loc[i, 'patient_id']!r})" for i in df.index[mask][:3]]
    return ", ".join(rows) + (" ..." if int(mask.sum()) > 3 else "")


def _check_columns(df: pd.DataFrame, path: str, needed: list[str]) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise UserError(
            f"clinical CSV '{path}' lacks column(s) {missing} (has {list(df.columns)}); it needs "
            "patient_id and the columns named by time_column, event_column and covariates."
        )
    dup = repeated(df["patient_id"])
    if dup:
        raise UserError(f"clinical CSV '{path}' lists patient(s) {dup[:5]} twice; keep one row.")
    empty = df["patient_id"] == ""
    if empty.any():
        raise UserError(f"clinical CSV '{path}': {_rows(df, empty)} have no patient_id.")


def _time_and_event(df: pd.DataFrame, path: str, tcol: str, ecol: str) -> pd.DataFrame:
    present = (df[tcol] != "") & (df[ecol] != "")
    time = pd.to_numeric(df[tcol], errors="coerce")
    bad = present & (time.isna() | ~np.isfinite(time))
    if bad.any():
        raise UserError(
            f"clinical CSV '{path}': {tcol} is not a number in {_rows(df, bad)}; "
            "times must be numbers (one unit, e.g. months), empty when unknown."
        )
    if (present & (time < 0)).any():
        raise UserError(
            f"clinical CSV '{path}': {tcol} is negative in {_rows(df, present & (time < 0))}; "
            "times run from diagnosis (or sampling) and cannot be negative."
        )
    event = pd.to_numeric(df[ecol], errors="coerce")
    bad = present & ~event.isin([0, 1])
    if bad.any():
        raise UserError(
            f"clinical CSV '{path}': {ecol} is not 0 or 1 in {_rows(df, bad)}; "
            "use 1 = event (e.g. death from melanoma), 0 = censored."
        )
    return pd.DataFrame({TIME: time, EVENT: event}).where(present)


def _blank_missing(values: pd.Series) -> pd.Series:
    """NA spellings become '' so that they mean "unknown" like an empty cell, not a value."""
    return values.where(~is_missing(values), "")


def _covariate(df: pd.DataFrame, column: str, path: str) -> tuple[pd.Series, str]:
    """Numbers when every non-empty cell is one, categories (strings) when most are not;
    empty -> NaN. A mostly numeric column with a few other cells is an error naming them: a
    typo there would otherwise turn the covariate into one category per value."""
    values = df[column]
    filled = values != ""
    numbers = pd.to_numeric(values.where(filled), errors="coerce")
    is_number = filled & numbers.notna() & np.isfinite(numbers)
    if filled.any() and is_number[filled].all():
        return numbers, "numeric"
    bad = filled & ~is_number
    if is_number.sum() > bad.sum():
        raise UserError(
            f"clinical CSV '{path}': covariate {column} is numeric but not a number in "
            f"{_rows(df, bad)} ({sorted(set(values[bad]))[:5]}); correct those cells, or leave "
            "them empty (or NA) when unknown."
        )
    return values.where(filled), "categorical"  # where: no downcast of an all-empty column


def read_clinical(
    path: str, time_column: str, event_column: str, covariates: list[str]
) -> Clinical:
    """Read and check the clinical CSV (see the module docstring)."""
    used = ["patient_id", time_column, event_column, *covariates]
    df = read_text_csv(Path(path), "clinical CSV", "clinical_csv", used)
    clash = {time_column, event_column, "patient_id"} & set(covariates)
    if clash:
        raise UserError(
            f"covariates {sorted(clash)} are the patient id, time or event column; "
            "list only the other clinical columns in covariates."
        )
    if time_column == event_column:
        raise UserError(f"time_column and event_column are both '{time_column}'.")
    _check_columns(df, path, ["patient_id", time_column, event_column, *covariates])
    df = df.reset_index(drop=True)
    for c in [time_column, event_column, *covariates]:
        df[c] = _blank_missing(df[c])
    table = _time_and_event(df, path, time_column, event_column)
    kinds: dict[str, str] = {}
    for c in covariates:
        table[c], kinds[c] = _covariate(df, c, path)
    table.index = pd.Index(df["patient_id"], name="patient_id")
    missing = table[TIME].isna()
    return Clinical(
        table=table[~missing].assign(**{EVENT: table.loc[~missing, EVENT].astype(int)}),
        covariates=kinds,
        time_column=time_column,
        event_column=event_column,
        no_follow_up=table.index[missing].tolist(),
    )
