"""What `evaluate` scores: a predictions file of `fit` or `predict`, its labels, and the scored
units (patients, or slides with level=slide). Every row left out is listed with the reason.

Three predictions files are understood: `fit`'s out-of-fold predictions.csv (labels included;
repeated CV averaged per slide), `predict`'s predictions.csv (one row per slide, failed slides
carry a status and reason) and `predict`'s patient_predictions.csv (one row per patient).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from melanoma_mil.config import DataConfig
from melanoma_mil.data.cohort import (
    is_missing,
    map_labels,
    mixed_patients,
    read_slide_table,
    repeated,
)
from melanoma_mil.errors import UserError
from melanoma_mil.ids import unmatched_ids
from melanoma_mil.io import read_text_csv
from melanoma_mil.rundir import TrainedRun

SCORED = ("ok", "no_heatmap")  # predict statuses that carry a prediction
_FOLD_COLUMN = re.compile(r"prob_(repeat_\d+_)?fold_\d+(_.+)?")  # predict's per-fold columns
UNLABELLED, DROPPED, BLANK = -1, -2, -3  # y of slides without a class: absent, 'drop', NA


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
    warnings: list[str] = field(default_factory=list)

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


@dataclass
class Labels:
    """labels_csv as slide_id, patient_id, y (class index, DROPPED or BLANK); ``patients``:
    whether the CSV names patients (a patient_id column with ids), not just slides."""

    path: str
    table: pd.DataFrame
    patients: bool


def _map_labels(
    df: pd.DataFrame, path: str, run: TrainedRun | None, classes: list[str]
) -> pd.DataFrame:
    """map_labels with the run's label_map, its error's fix worded for `evaluate`."""
    label_map = dict(run.config.data.label_map) if run is not None else {}
    try:
        kept, _ = map_labels(df, DataConfig(label_map=label_map, classes=classes), path)
    except UserError as e:
        problem = str(e).split("; ")[0].replace("data.classes", "the predictions' classes")
        fix = (
            f"correct the CSV to labels that run '{run.run_dir}' knows"
            if run is not None
            else f"correct the CSV to the classes {classes}, or pass run_dir= so that the "
            "run's label_map applies"
        )
        raise UserError(f"{problem}; {fix}.") from None
    return kept


def labels_table(path: str, run: TrainedRun | None, classes: list[str]) -> Labels:
    """Read labels_csv; blank / NA labels (data.cohort.MISSING) leave a slide unlabelled,
    unless the run's label_map maps them."""
    df = read_slide_table(Path(path), "labels CSV", "labels_csv", ["slide_id", "label"])
    raw = read_text_csv(Path(path), "labels CSV", "labels_csv", ["slide_id", "label", "patient_id"])
    named = "patient_id" in raw.columns and bool((~is_missing(raw["patient_id"])).any())
    if named:  # a blank patient id names no patient: the predictions' own grouping stands
        df["patient_id"] = df["patient_id"].where(~is_missing(raw["patient_id"]))
    dup = repeated(df["slide_id"])
    if dup:
        raise UserError(f"labels CSV '{path}' lists slide(s) {dup[:5]} twice; keep one row each.")
    df = df.rename(columns={"label": "raw_label"})
    mapped = {str(k) for k in run.config.data.label_map} if run is not None else set()
    blank = is_missing(df["raw_label"]) & ~df["raw_label"].isin(mapped)
    kept = _map_labels(df[~blank], path, run, classes) if (~blank).any() else df.iloc[:0]
    kept = kept.reindex(columns=["slide_id", "patient_id", "label"]).rename(columns={"label": "y"})
    other = df[~df["slide_id"].isin(kept["slide_id"])][["slide_id", "patient_id"]]
    other = other.assign(y=np.where(blank[other.index], BLANK, DROPPED))
    return Labels(path, pd.concat([kept, other], ignore_index=True), named)


def _fit_slides(df: pd.DataFrame, probs: list[str]) -> pd.DataFrame:
    """Out-of-fold rows -> one per slide (bag), averaged over CV repeats."""
    df = df.assign(y=pd.to_numeric(df["y"], errors="coerce").fillna(-1).astype(int))
    agg = {"patient_id": "first", "y": "first", **{c: "mean" for c in probs}}
    return df.groupby("slide_id", sort=True).agg(agg).reset_index()


def _unmatched_labels(labels: Labels, df: pd.DataFrame, kind: str) -> str | None:
    """The warning for labelled rows of labels_csv that no row of the predictions names (any
    status: a slide predict failed is listed on its own)."""
    slides = {s for c in ("slide_id", "slide_ids", "left_out") if c in df for v in df[c]
              for s in str(v).split(";") if s}  # fmt: skip
    table = labels.table[labels.table["y"] >= 0]
    used = table["slide_id"].isin(slides)
    if kind == "patient_predictions" and labels.patients:
        used |= table["patient_id"].isin(set(df["patient_id"]))
    n = int((~used).sum())
    return unmatched_ids(
        f"{n} labelled slide(s) of labels_csv '{labels.path}'",
        table.loc[~used, "slide_id"].tolist(),
        sorted(slides),
        "check that they were predicted (slides_dir / manifest) and spelled as the slide files",
    )


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


def _no_match(labels: Labels, key: str, predicted: list[str]) -> UserError:
    ids = labels.table[key].tolist()[:3]
    return UserError(
        f"labels CSV '{labels.path}': its {key}s (e.g. {ids}) match none of the predictions' "
        f"(e.g. {predicted[:3]}); check the files, or give labels_csv a patient_id column with "
        "the predictions' patient ids."
    )


def _bag_slides(ids: pd.Series) -> pd.Series:
    """Each row's slide ids: itself, and for `fit`'s patient bags (data.bag_level=patient) the
    patient's slides it joins with ';'."""
    return ids.map(
        lambda i: [i, *(s.strip() for s in i.split(";") if s.strip())] if ";" in i else [i]
    )


def _pooled_labels(ids: pd.Series, key: str, labels: Labels, names: pd.Series) -> pd.Series:
    """y per row from the labels_csv rows whose ``key`` is among the row's ``ids``: labelled
    slides of one patient must agree (``names`` name the patient); a class wins over 'drop',
    'drop' over a blank label, as `fit` drops 'drop' slides before pooling a patient's bag."""
    wanted = pd.DataFrame({"row": ids.index, key: ids}).explode(key)
    pairs = wanted.merge(labels.table[[key, "y"]], on=key)
    per = pairs[pairs["y"] >= 0].groupby("row")["y"].nunique()
    mixed = names[per[per > 1].index].tolist()
    if mixed:
        raise UserError(
            f"labels CSV '{labels.path}': patient(s) {mixed[:5]} have slides with different "
            "labels, but their predictions pool the patient's slides; give each such patient's "
            "slides one label."
        )
    rank = pairs["y"].map({BLANK: 0, DROPPED: 1}).fillna(2)
    best = pairs.assign(rank=rank).sort_values("rank", kind="stable").groupby("row")["y"].last()
    return best.reindex(ids.index, fill_value=UNLABELLED).astype(int)


def _attach_labels(
    rows: pd.DataFrame, labels: Labels | None, key: str, scored: Scored
) -> pd.DataFrame:
    """Join labels (and their patient ids) onto slide rows (key slide_id) or patient rows
    (through labels_csv's patient_id, else the row's slide_ids); list each row left out."""
    if labels is None:
        if "y" not in rows.columns:
            rows["y"] = UNLABELLED
        return rows
    if key == "slide_id":
        by, ids = "slide_id", _bag_slides(rows["slide_id"])
    elif labels.patients:
        by, ids = "patient_id", rows["patient_id"].map(lambda p: [p])
    else:
        by, ids = "slide_id", _bag_slides(rows["slide_ids"].str.strip(";"))
    rows["y"] = _pooled_labels(ids, by, labels, rows["patient_id"])
    unnamed = labels.table["patient_id"].isna()
    if by == "patient_id" and unnamed.any():  # label rows without a patient id: by slide
        left = rows["y"] == UNLABELLED
        slides = _bag_slides(rows.loc[left, "slide_ids"].str.strip(";"))
        by_slide = replace(labels, table=labels.table[unnamed])
        rows.loc[left, "y"] = _pooled_labels(slides, "slide_id", by_slide, rows["patient_id"])
    if (rows["y"] == UNLABELLED).all() and (labels.table["y"] >= 0).any():
        raise _no_match(labels, by, ids.explode().tolist())
    if key == "slide_id" and labels.patients:  # else the predictions' own patient ids stand
        from_labels = rows["slide_id"].map(labels.table.set_index("slide_id")["patient_id"])
        own = rows["patient_id"] != rows["slide_id"]  # named by predict's patients_csv
        other = rows.loc[from_labels.notna() & own & (from_labels != rows["patient_id"])]
        if len(other):
            scored.warnings.append(
                f"labels_csv names other patients than the predictions for {len(other)} "
                f"slide(s) (e.g. {other['slide_id'].iloc[0]}: "
                f"{from_labels[other.index[0]]} in labels_csv, {other['patient_id'].iloc[0]} "
                "in the predictions); the labels' patients are used"
            )
        rows["patient_id"] = from_labels.where(from_labels.notna(), rows["patient_id"])
    level = key.removesuffix("_id")
    for y, reason, analysis in (
        (DROPPED, "label mapped to 'drop' by the run's label_map", "all"),
        (BLANK, "blank or NA label in labels_csv", "classification"),
        (UNLABELLED, "no label in labels_csv", "classification"),
    ):
        scored.exclude(rows.loc[rows["y"] == y, key].tolist(), level, reason, analysis)
    rows["y"] = rows["y"].replace(BLANK, UNLABELLED)
    return rows[rows["y"] != DROPPED]


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


def _slide_patients(df: pd.DataFrame, labels: Labels | None, scored: Scored) -> pd.DataFrame:
    """predict's rows get their patient_id column (blank: the slide id); a warning when
    neither they nor labels_csv name any patient, so each slide counts as one."""
    ids = df["patient_id"] if "patient_id" in df.columns else pd.Series("", index=df.index)
    ids = ids.fillna("").astype(str).str.strip()
    known = ~is_missing(ids)
    if not known.any() and not (labels is not None and labels.patients):
        scored.warnings.append(
            "no patient ids in the predictions or labels_csv: each slide is treated as its own "
            "patient, so CIs assume independent slides; add a patient_id column to labels_csv "
            "(or run predict with patients_csv=)"
        )
    return df.assign(patient_id=ids.where(known, df["slide_id"]))


def load_scored(
    predictions: str, labels_csv: str | None, level: str, run: TrainedRun | None
) -> Scored:
    """Read, label and aggregate the predictions; see the module docstring."""
    df = read_text_csv(Path(predictions), "predictions", "predictions")
    every = df  # all rows, scored or not: what labels_csv may name
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
    if kind != "fit":  # fit's out-of-fold rows repeat a slide once per CV repeat, on purpose
        dup = repeated(df[key])
        if dup:
            raise UserError(
                f"predictions '{predictions}' list {key} {dup[:5]} more than once (two predict "
                "outputs joined?); keep one row each, or evaluate each output on its own."
            )
        df = _scored_rows(df, kind, scored)
    df = _numeric(df.assign(__id=df[key]), probs, predictions).drop(columns="__id")
    if kind == "fit":
        df = _fit_slides(df, probs)
    labels = None
    if labels_csv:  # labels_csv wins over labels the predictions carry
        labels = labels_table(labels_csv, run, classes)
        df = df.drop(columns="y", errors="ignore")
        if note := _unmatched_labels(labels, every, kind):
            scored.warnings.append(note)
    if kind == "predict":
        df = _slide_patients(df, labels, scored)
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
