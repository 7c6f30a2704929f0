"""What `evaluate` scores: a predictions file of `fit` or `predict`, its labels, and the scored
units (patients, or slides with level=slide). Every row left out is listed with the reason.

Three predictions files are understood: `fit`'s out-of-fold predictions.csv (labels included;
repeated CV averaged per slide), `predict`'s predictions.csv (one row per slide, failed slides
carry a status and reason) and `predict`'s patient_predictions.csv (one row per patient).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from melanoma_mil.config import DataConfig
from melanoma_mil.data.cohort import map_labels, mixed_patients, read_slide_table
from melanoma_mil.errors import UserError
from melanoma_mil.io import read_text_csv
from melanoma_mil.rundir import TrainedRun

SCORED = ("ok", "no_heatmap")  # predict statuses that carry a prediction
_FOLD_COLUMN = re.compile(r"prob_(repeat_\d+_)?fold_\d+(_.+)?")  # predict's per-fold columns


@dataclass
class Scored:
    """Predictions with labels: ``slides`` one row per scored slide (bag), ``patients`` one row
    per patient (probabilities averaged); both hold patient_id, y (class index, -1 unlabelled)
    and prob_<class>. ``units`` is the table the classification metrics use."""

    kind: str  # fit | predict | patient_predictions
    classes: list[str]
    slides: pd.DataFrame | None
    patients: pd.DataFrame
    level: str
    excluded: list[dict[str, str]] = field(default_factory=list)

    @property
    def prob_columns(self) -> list[str]:
        return [f"prob_{c}" for c in self.classes]

    @property
    def units(self) -> pd.DataFrame:
        return self.patients if self.level == "patient" or self.slides is None else self.slides

    @property
    def labelled(self) -> bool:
        return bool((self.units["y"] >= 0).any())

    def exclude(self, ids: list[str], level: str, reason: str, analysis: str = "all") -> None:
        self.excluded += [
            {"id": str(i), "level": level, "analysis": analysis, "reason": reason} for i in ids
        ]


def predictions_kind(df: pd.DataFrame, path: str) -> str:
    cols = set(df.columns)
    if {"slide_id", "fold", "y"} <= cols:
        return "fit"
    if {"patient_id", "slide_ids", "status"} <= cols:
        return "patient_predictions"
    if {"slide_id", "status"} <= cols:
        return "predict"
    raise UserError(
        f"predictions '{path}' is not a predictions file of `fit` or `predict` (columns "
        f"{sorted(cols)[:8]}); pass fit's predictions.csv, predict's predictions.csv or "
        "patient_predictions.csv."
    )


def prediction_classes(df: pd.DataFrame, path: str, run: TrainedRun | None) -> list[str]:
    """The run's classes when known, else the prob_<class> columns in file order."""
    if run is not None:
        missing = [f"prob_{c}" for c in run.classes if f"prob_{c}" not in df.columns]
        if missing:
            raise UserError(
                f"predictions '{path}' lack {missing} of run '{run.run_dir}' (classes "
                f"{run.classes}): were they made by another run? Check run_dir."
            )
        return list(run.classes)
    classes = [
        c[len("prob_") :]
        for c in df.columns
        if c.startswith("prob_") and not _FOLD_COLUMN.fullmatch(c)
    ]
    if len(classes) < 2:
        raise UserError(
            f"predictions '{path}' have no prob_<class> columns for two or more classes; "
            "pass a predictions file of `fit` or `predict`."
        )
    return classes


def _numeric(df: pd.DataFrame, columns: list[str], path: str) -> pd.DataFrame:
    for c in columns:
        values = pd.to_numeric(df[c], errors="coerce")
        bad = df.loc[values.isna() | ~np.isfinite(values), "__id"].tolist()
        if bad:
            raise UserError(
                f"predictions '{path}': column {c} is not a number for {bad[:5]}; "
                "rerun the command that wrote them."
            )
        df[c] = values.astype(float)
    return df


def _labels(path: str, run: TrainedRun | None, classes: list[str]) -> pd.DataFrame:
    """labels_csv as slide_id, patient_id, y; slides whose label maps to 'drop' get y = -2."""
    df = read_slide_table(Path(path), "labels CSV", "labels_csv", ["slide_id", "label"])
    dup = df["slide_id"][df["slide_id"].duplicated()].unique().tolist()
    if dup:
        raise UserError(f"labels CSV '{path}' lists slide(s) {dup[:5]} twice; keep one row each.")
    df = df.rename(columns={"label": "raw_label"})
    label_map = dict(run.config.data.label_map) if run is not None else {}
    kept, _ = map_labels(df, DataConfig(label_map=label_map, classes=classes), path)
    dropped = df[~df["slide_id"].isin(kept["slide_id"])]  # mapped to 'drop'
    kept = kept[["slide_id", "patient_id", "label"]].rename(columns={"label": "y"})
    dropped = dropped[["slide_id", "patient_id"]].assign(y=-2)
    return pd.concat([kept, dropped], ignore_index=True)


def _fit_slides(df: pd.DataFrame, probs: list[str]) -> pd.DataFrame:
    """Out-of-fold rows -> one per slide (bag), averaged over CV repeats."""
    df = df.assign(y=pd.to_numeric(df["y"], errors="coerce").fillna(-1).astype(int))
    agg = {"patient_id": "first", "y": "first", **{c: "mean" for c in probs}}
    return df.groupby("slide_id", sort=True).agg(agg).reset_index()


def _scored_rows(df: pd.DataFrame, kind: str, scored: Scored) -> pd.DataFrame:
    """predict rows that carry a prediction; the others are listed as excluded."""
    level = "patient" if kind == "patient_predictions" else "slide"
    key = "patient_id" if level == "patient" else "slide_id"
    bad = df[~df["status"].isin(SCORED)]
    for r in bad.itertuples():
        reason = getattr(r, "reason", "") or "no slide of the patient could be scored"
        scored.exclude([getattr(r, key)], level, f"not scored by predict: {reason}")
    if kind == "patient_predictions" and "left_out" in df.columns:
        for r in df.itertuples():
            left = [s for s in str(r.left_out).split(";") if s]
            scored.exclude(left, "slide", f"failed in predict; left out of {r.patient_id}'s bag")
    return df[df["status"].isin(SCORED)].copy()


def _attach_labels(
    slides: pd.DataFrame, labels: pd.DataFrame | None, key: str, scored: Scored
) -> pd.DataFrame:
    """Join labels (and their patient ids) onto slide rows (key slide_id) or patient rows."""
    if labels is None:
        if "y" not in slides.columns:
            slides["y"] = -1
        return slides
    if key == "patient_id":
        per = labels[labels["y"] >= 0].groupby("patient_id")["y"]
        conflict = per.nunique()
        conflict = conflict[conflict > 1].index.tolist()
        if conflict:
            raise UserError(
                f"labels CSV: patient(s) {conflict[:5]} have slides with different labels; "
                "patient predictions need one label per patient."
            )
        ys = per.first()
        slides["y"] = slides["patient_id"].map(ys).fillna(-1).astype(int)
        missing = slides.loc[slides["y"] < 0, "patient_id"].tolist()
        scored.exclude(missing, "patient", "no label in labels_csv", "classification")
        return slides
    lab = labels.set_index("slide_id")
    slides["y"] = slides["slide_id"].map(lab["y"]).fillna(-1).astype(int)
    from_labels = slides["slide_id"].map(lab["patient_id"])
    slides["patient_id"] = from_labels.where(from_labels.notna(), slides["patient_id"])
    dropped = slides.loc[slides["y"] == -2, "slide_id"].tolist()
    scored.exclude(dropped, "slide", "label mapped to 'drop' by the run's label_map", "all")
    missing = slides.loc[slides["y"] == -1, "slide_id"].tolist()
    scored.exclude(missing, "slide", "no label in labels_csv", "classification")
    return slides[slides["y"] != -2]


def per_patient(slides: pd.DataFrame, probs: list[str]) -> pd.DataFrame:
    """Mean probability over each patient's slides; one label per patient (or an error)."""
    conflict = mixed_patients(slides[slides["y"] >= 0], "y")
    if conflict:
        raise UserError(
            f"patient(s) {conflict[:5]} have slides with different labels, so a patient-level "
            "score is undefined; fix the labels or pass level=slide."
        )
    grouped = slides.groupby("patient_id", sort=True)
    table = grouped[probs].mean()
    table["y"] = grouped["y"].max()  # the label where any slide has one, else -1
    table["n_slides"] = grouped.size()
    return table.reset_index()


def load_scored(
    predictions: str, labels_csv: str | None, level: str, run: TrainedRun | None
) -> Scored:
    """Read, label and aggregate the predictions; see the module docstring."""
    df = read_text_csv(Path(predictions), "predictions", "predictions")
    kind = predictions_kind(df, predictions)
    classes = prediction_classes(df, predictions, run)
    scored = Scored(kind, classes, None, pd.DataFrame(), level)
    probs = scored.prob_columns
    key = "patient_id" if kind == "patient_predictions" else "slide_id"
    if kind == "patient_predictions" and level == "slide":
        raise UserError(
            f"predictions '{predictions}' score whole patients (patient_predictions.csv); "
            "level=slide needs predict's predictions.csv."
        )
    if kind != "fit":
        df = _scored_rows(df, kind, scored)
    df = _numeric(df.assign(__id=df[key]), probs, predictions).drop(columns="__id")
    if kind == "fit":
        df = _fit_slides(df, probs)
    elif "patient_id" not in df.columns:
        df["patient_id"] = df["slide_id"]  # no patient ids yet: each slide its own patient
    labels = None
    if labels_csv:  # labels_csv wins over labels the predictions carry
        labels = _labels(labels_csv, run, classes)
        df = df.drop(columns="y", errors="ignore")
    rows = _attach_labels(df, labels, key, scored)
    if kind == "patient_predictions":
        scored.patients = rows[["patient_id", "y", *probs]].assign(
            n_slides=pd.to_numeric(rows.get("n_slides", 1), errors="coerce")
        )
    else:
        cols = ["slide_id", "patient_id", "y", *probs]
        cols += [c for c in ("heatmap",) if c in rows.columns]
        scored.slides = rows[cols].reset_index(drop=True)
        scored.patients = per_patient(scored.slides, probs)
    if scored.units.empty:
        raise UserError(f"predictions '{predictions}': no scored {level} is left to evaluate.")
    return scored
