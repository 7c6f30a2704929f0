"""Labels CSV -> the bags of a cohort: class mapping, patient grouping, feature-file lookup."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from melanoma_mil.config import DataConfig
from melanoma_mil.data.bags import bag_path
from melanoma_mil.errors import UserError
from melanoma_mil.ids import check_slide_id

log = logging.getLogger(__name__)

DROP = "drop"


@dataclass
class Cohort:
    """One row per bag: bag_id, patient_id, slide_ids (';'-joined), label (class index)."""

    bags: pd.DataFrame
    classes: list[str]
    members: dict[str, list[tuple[str, Path]]]  # bag_id -> [(slide_id, feature path)]


def read_slide_table(path: Path, what: str, key: str, columns: list[str]) -> pd.DataFrame:
    """A CSV of slides as stripped strings with ``columns`` (patient_id defaults to slide_id),
    or a UserError naming the file (``what`` given by config ``key``) and the fix."""
    if not path.is_file():
        raise UserError(f"{what} '{path}' not found: check {key}.")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{what} '{path}' is unreadable ({msg}); save it as UTF-8 CSV.") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        optional = "" if "patient_id" in columns else "[, patient_id]"
        raise UserError(
            f"{what} '{path}' lacks column(s) {missing} (has {list(df.columns)}); "
            f"it needs {', '.join(columns)}{optional}."
        )
    for c in columns:
        df[c] = df[c].str.strip()
    for row, sid in zip(df.index, df["slide_id"], strict=True):
        check_slide_id(sid, f"{what} '{path}' row {row + 2}")
    patients = df["patient_id"].str.strip() if "patient_id" in df.columns else df["slide_id"]
    df["patient_id"] = patients.where(patients != "", df["slide_id"])
    return df


def read_labels(path: str | None, label_column: str = "label") -> pd.DataFrame:
    """Read and check the labels CSV (slide_id, label column, optional patient_id)."""
    if not path:
        raise UserError("data.labels_csv is not set: pass data.labels_csv=PATH/labels.csv.")
    p = Path(path)
    df = read_slide_table(p, "labels CSV", "data.labels_csv", ["slide_id", label_column])
    dup = df["slide_id"][df["slide_id"].duplicated()].unique().tolist()
    if dup:
        raise UserError(f"labels CSV '{p}' lists slide(s) {dup[:5]} twice; keep one row each.")
    return df.rename(columns={label_column: "raw_label"})[["slide_id", "patient_id", "raw_label"]]


def read_patients(path: str) -> dict[str, str]:
    """slide_id -> patient_id from a CSV with those columns (a labels CSV will do)."""
    df = read_slide_table(Path(path), "patients_csv", "patients_csv", ["slide_id", "patient_id"])
    return dict(zip(df["slide_id"], df["patient_id"], strict=True))


def map_labels(df: pd.DataFrame, cfg: DataConfig, source: str) -> tuple[pd.DataFrame, list[str]]:
    """Apply data.label_map and data.classes; print counts of kept and dropped slides."""
    raw = df["raw_label"]
    if cfg.label_map:
        unknown = sorted(set(raw) - set(cfg.label_map))
        if unknown:
            raise UserError(
                f"labels CSV '{source}': label(s) {unknown} are not in data.label_map "
                f"({sorted(cfg.label_map)}); add them (map to '{DROP}' to exclude)."
            )
        mapped = raw.map(cfg.label_map)
    else:
        mapped = raw
    keep = mapped != DROP
    dropped = df.loc[~keep, "raw_label"].value_counts().to_dict()
    df = df.loc[keep].assign(label_name=mapped[keep])
    classes = list(cfg.classes) or sorted(df["label_name"].unique())
    unknown = sorted(set(df["label_name"]) - set(classes))
    if unknown:
        raise UserError(
            f"labels CSV '{source}': label value(s) {unknown} are not in data.classes {classes}; "
            "fix the CSV, add them to data.classes, or map them with data.label_map."
        )
    if len(classes) < 2:
        raise UserError(f"labels CSV '{source}': only class(es) {classes} present; need >= 2.")
    counts = df["label_name"].value_counts().reindex(classes, fill_value=0).to_dict()
    log.info(
        "labels: kept %d slides %s, dropped %d %s",
        len(df),
        counts,
        sum(dropped.values()),
        dropped or "",
    )
    df = df.assign(label=df["label_name"].map({c: i for i, c in enumerate(classes)}).astype(int))
    return df, classes


def find_features(df: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    """Attach each slide's feature file; missing ones fail (listing ids) or are skipped."""
    if not cfg.features_dir:
        raise UserError("data.features_dir is not set: pass the folder of <slide_id>.h5 bags.")
    root = Path(cfg.features_dir)
    if not root.is_dir():
        raise UserError(f"features folder '{root}' not found: check data.features_dir.")
    paths = [bag_path(root, s) for s in df["slide_id"]]
    missing = [s for s, p in zip(df["slide_id"], paths, strict=True) if p is None]
    if missing and cfg.on_missing != "skip":
        raise UserError(
            f"{len(missing)} labelled slide(s) have no feature file in '{root}': "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}. Run `extract` for them or pass "
            "data.on_missing=skip."
        )
    if missing:
        log.warning("skipping %d labelled slides without features: %s", len(missing), missing[:10])
    df = df.assign(path=paths)
    return df[df["path"].notna()]


def build_cohort(cfg: DataConfig) -> Cohort:
    """Labels + features -> bags at slide or patient level."""
    df = read_labels(cfg.labels_csv, cfg.label_column)
    df, classes = map_labels(df, cfg, str(cfg.labels_csv))
    df = find_features(df, cfg)
    if df.empty:
        raise UserError(f"no labelled slide has features in '{cfg.features_dir}'.")
    if cfg.bag_level == "patient":
        conflict = df.groupby("patient_id")["label"].nunique()
        conflict = conflict[conflict > 1].index.tolist()
        if conflict:
            raise UserError(
                f"patients {conflict[:5]} have slides with different labels; "
                "patient-level bags need one label per patient (fix the CSV or bag_level=slide)."
            )
        grouped = df.groupby("patient_id", sort=True)
        bags = grouped.agg(slide_ids=("slide_id", ";".join), label=("label", "first")).reset_index()
        bags.insert(0, "bag_id", bags["patient_id"])
        members = {
            pid: list(zip(g["slide_id"], map(Path, g["path"]), strict=True)) for pid, g in grouped
        }
    else:
        bags = df.assign(bag_id=df["slide_id"], slide_ids=df["slide_id"])
        bags = bags[["bag_id", "patient_id", "slide_ids", "label"]].reset_index(drop=True)
        members = {s: [(s, Path(p))] for s, p in zip(df["slide_id"], df["path"], strict=True)}
    return Cohort(bags=bags, classes=classes, members=members)
