"""predict's tables: predictions.csv (a row per slide) and, with patients_csv,
patient_predictions.csv, which scores each patient's slides pooled into one bag as `fit` pools
them; the two are written as one result."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from melanoma_mil.data.bags import read_bag
from melanoma_mil.ids import unmatched_ids
from melanoma_mil.inference.analyse import FILE_COLUMNS, ensemble_columns
from melanoma_mil.inference.ensemble import Ensemble
from melanoma_mil.inference.inputs import PATIENTS, SlideInput
from melanoma_mil.io import write_together

log = logging.getLogger(__name__)

META = ["n_tiles", "status", "reason"]


def _ordered(table: pd.DataFrame) -> pd.DataFrame:
    """slide_id and prediction columns first, file paths and bookkeeping last."""
    files = [c for c in FILE_COLUMNS if c in table]
    front = [c for c in table.columns if c not in {"slide_id", *META, *files}]
    return table[["slide_id", *front, *META, *files]].sort_values("slide_id")


def patient_table(
    patient_of: dict[str, str], slides: pd.DataFrame, inputs: list[SlideInput], ensemble: Ensemble
) -> pd.DataFrame:
    """One row per patient: the ensemble on all tiles of the patient's successfully scored
    slides (slides that failed are listed in left_out, not pooled), with predictions.csv's
    probability columns. Slides are pooled in the patients CSV's row order, as `fit` pools them
    (order-sensitive models, e.g. TransMIL, score another order differently)."""
    paths = {i.slide_id: i.features for i in inputs if i.features is not None}
    row_of = {s: i for i, s in enumerate(patient_of)}
    scored = set(slides.loc[slides["status"].isin(["ok", "no_heatmap"]), "slide_id"]) & set(paths)
    rows: list[dict[str, Any]] = []
    ids = slides["slide_id"].map(lambda s: patient_of.get(s, s))  # unlisted: its own patient
    for patient, group in slides.groupby(ids, sort=True):
        members = sorted(group["slide_id"], key=lambda s: row_of.get(s, -1))
        usable = [s for s in members if s in scored]
        row: dict[str, Any] = {
            "patient_id": patient,
            "slide_ids": ";".join(usable),
            "n_slides": len(usable),
            "left_out": ";".join(sorted(set(group["slide_id"]) - set(usable))),
        }
        if usable:
            feats = np.concatenate([read_bag(paths[s])[0] for s in usable])
            probs, _ = ensemble(feats)
            e = ensemble
            row.update(ensemble_columns(probs, e.fold_names, e.classes, e.threshold))
            row.update(n_tiles=len(feats), status="ok")
        else:
            row.update(n_tiles=0, status="failed")
        rows.append(row)
    table = pd.DataFrame(rows)
    front = [c for c in table.columns if c not in {"left_out", "n_tiles", "status"}]
    return table[[*front, "n_tiles", "status", "left_out"]]


def warn_unlisted(patient_of: dict[str, str], slides: list[str], path: str) -> None:
    """Say which predicted slides patients_csv does not list (each is scored as a patient of
    its own, not pooled) and which of its slides were not predicted (e.g. 'S03' for s03)."""
    alone = [s for s in slides if s not in patient_of]
    if alone:
        log.warning(
            "patients_csv '%s' does not list %d predicted slide(s) (e.g. %s): each is scored "
            "as a patient of its own",
            path,
            len(alone),
            alone[:5],
        )
    listed = set(slides)
    absent = [s for s in patient_of if s not in listed]
    what = f"{len(absent)} slide(s) of patients_csv '{path}'"
    fix = "check slides_dir / manifest and the slide ids"
    if note := unmatched_ids(what, absent, slides, fix):
        log.warning("%s", note)


def write_tables(
    target: Path,
    table: pd.DataFrame,
    patient_of: dict[str, str] | None,
    patients_csv: str | None,
    inputs: list[SlideInput],
    ensemble: Ensemble,
) -> dict[Path, pd.DataFrame]:
    """predictions.csv (``target``) and, with patients_csv, patient_predictions.csv beside it,
    written as one result: a failed write (a full disk) leaves the earlier pair whole, never
    mixed."""
    table = _ordered(table)
    if patient_of is not None:  # lets `evaluate` group the slides by patient
        table.insert(1, "patient_id", table["slide_id"].map(lambda s: patient_of.get(s, s)))
    tables = {target: table}
    if patient_of is not None:
        warn_unlisted(patient_of, table["slide_id"].tolist(), str(patients_csv))
        tables[target.parent / PATIENTS] = patient_table(patient_of, table, inputs, ensemble)
    write_together({path: t.to_csv(index=False).encode() for path, t in tables.items()})
    return tables
