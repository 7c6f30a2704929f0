"""Labels CSV -> the bags of a cohort: class mapping, patient grouping, feature-file lookup."""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pandas as pd

from melanoma_mil.config import SLIDE_EXTENSIONS, DataConfig
from melanoma_mil.data.bags import bag_files, bag_path
from melanoma_mil.errors import UserError
from melanoma_mil.ids import check_slide_id
from melanoma_mil.io import read_text_csv

log = logging.getLogger(__name__)

DROP = "drop"
# labels that mean "no label" (pandas' NA spellings, compared lowercased): not a class
MISSING = frozenset({"", "nan", "na", "n/a", "null", "none", "<na>", "#n/a", "-nan"})


def is_missing(values: pd.Series) -> pd.Series:
    """Cells that are blank or an NA spelling (any case), as R, Excel and pandas write them."""
    return values.str.lower().isin(MISSING)


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


@dataclass
class Cohort:
    """One row per bag: bag_id, patient_id, slide_ids (';'-joined), label (class index)."""

    bags: pd.DataFrame
    classes: list[str]
    members: dict[str, list[tuple[str, Path]]]  # bag_id -> [(slide_id, feature path)]


def repeated(values: pd.Series) -> list[str]:
    """The values listed more than once, each once, in first-seen order."""
    return values[values.duplicated()].unique().tolist()


def read_slide_table(path: Path, what: str, key: str, columns: list[str]) -> pd.DataFrame:
    """A CSV of slides as stripped strings with ``columns`` (patient_id defaults to slide_id),
    or a UserError naming the file and the fix."""
    df = read_text_csv(path, what, key, [*columns, "patient_id"])
    missing = [c for c in columns if c not in df.columns]
    if missing:
        optional = "" if "patient_id" in columns else "[, patient_id]"
        raise UserError(
            f"{what} '{path}' lacks column(s) {missing} (has {list(df.columns)}); "
            f"it needs {', '.join(columns)}{optional}."
        )
    for row, sid in zip(df.index, df["slide_id"], strict=True):
        check_slide_id(sid, f"{what} '{path}' row {row + 2}")
    patients = df["patient_id"] if "patient_id" in df.columns else df["slide_id"]
    # a blank or NA-spelled patient id is unknown: the slide stands alone, never one shared "NA"
    df["patient_id"] = patients.where(~is_missing(patients), df["slide_id"])
    return df


def read_labels(path: str | None, label_column: str = "label") -> pd.DataFrame:
    """Read and check the labels CSV (slide_id, label column, optional patient_id)."""
    if not path:
        raise UserError("data.labels_csv is not set: pass data.labels_csv=PATH/labels.csv.")
    p = Path(path)
    df = read_slide_table(p, "labels CSV", "data.labels_csv", ["slide_id", label_column])
    dup = repeated(df["slide_id"])
    if dup:
        raise UserError(f"labels CSV '{p}' lists slide(s) {dup[:5]} twice; keep one row each.")
    return df.rename(columns={label_column: "raw_label"})[["slide_id", "patient_id", "raw_label"]]


def read_patients(path: str) -> dict[str, str]:
    """slide_id -> patient_id from a CSV with those columns (a labels CSV will do)."""
    df = read_slide_table(Path(path), "patients_csv", "patients_csv", ["slide_id", "patient_id"])
    dup = repeated(df["slide_id"])
    if dup:
        raise UserError(
            f"patients_csv '{path}' lists slide(s) {dup[:5]} more than once; keep one row each."
        )
    return dict(zip(df["slide_id"], df["patient_id"], strict=True))


def is_number(label: str) -> bool:
    """Whether a label is a number (`canonical_label` writes those one way)."""
    return _NUMBER.fullmatch(label) is not None


def canonical_label(raw: str) -> str:
    """A label that is a number, written the one way: '1', '1.0', '+1' and '1e0' are one class
    ('1'); '0.50' is '0.5'. Spreadsheets and R write the same label both ways; others stay."""
    if not is_number(raw):
        return raw
    value = Decimal(raw)
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _canonical_map(label_map: dict[str, str]) -> dict[str, str]:
    """data.label_map with numeric keys and classes written as canonical_label writes the
    labels: {a: 1.0, b: 1} maps both to class '1', not to two classes."""
    out: dict[str, str] = {}
    for key, raw_value in label_map.items():
        canon = canonical_label(str(key))
        value = raw_value if raw_value == DROP else canonical_label(str(raw_value))
        if out.setdefault(canon, value) != value:
            raise UserError(
                f"data.label_map maps the same label {canon!r} to {out[canon]!r} and {value!r}; "
                "keep one entry."
            )
    return out


def _missing_labels(df: pd.DataFrame, mapped: set[str], source: str) -> None:
    """Refuse blank / NaN labels that data.label_map does not map: they are not a class."""
    missing = is_missing(df["raw_label"]) & ~df["raw_label"].isin(mapped)
    if missing.any():
        rows = [f"{i + 2} ({s})" for i, s in df.loc[missing, "slide_id"].items()]
        values = sorted(set(df.loc[missing, "raw_label"]))
        raise UserError(
            f"labels CSV '{source}': {len(rows)} row(s) have no label {values}: row "
            f"{', '.join(rows[:10])}{' ...' if len(rows) > 10 else ''}; fill them in, remove the "
            f"rows, or exclude them with data.label_map (e.g. {{'': {DROP}}})."
        )


def _case_variants(raw: pd.Series, classes: list[str], source: str) -> None:
    """Refuse labels spelled in two cases ('Pos', 'pos') that data.classes does not name both:
    they would silently be two classes (a binary cohort trained as a multi-class one)."""
    spellings: dict[str, list[str]] = {}
    for label in raw.unique():
        spellings.setdefault(label.casefold(), []).append(label)
    for names in map(sorted, spellings.values()):
        if len(names) > 1 and not set(names) <= set(classes):
            raise UserError(
                f"labels CSV '{source}': labels {names} differ only in case and would be "
                f"{len(names)} classes; write them one way, or map them with data.label_map "
                f"(e.g. {{{', '.join(f'{n}: {names[0]}' for n in names)}}})."
            )


def _classes(names: pd.Series, given: list[str], source: str) -> list[str]:
    """The class order: data.classes (``given``) when set, else the sorted labels; refused when
    it names a class twice, misses a label or leaves fewer than two classes."""
    # data.classes names raw labels or label_map's classes: compare them as numbers too
    named = [canonical_label(c) for c in given]
    twice = sorted({c for c in named if named.count(c) > 1})
    if twice:
        raise UserError(
            f"data.classes={list(given)} names {twice} more than once; name each class "
            "once, the positive class last."
        )
    classes = named or sorted(names.unique())
    unknown = sorted(set(names) - set(classes))
    if unknown:
        some_known = bool(set(names) & set(classes))
        what, fix = (
            (f"label value(s) {unknown} are not", "fix the CSV, add them to data.classes")
            if some_known  # a typo or an extra class
            else (  # data.classes names other labels, e.g. a sweep file's on a 0/1 cohort
                f"none of its labels {unknown} is",
                "set data.classes to your labels, the positive class last (a sweep file's "
                "command sets it for wandb agent)",
            )
        )
        booleans = {"True", "False"} & set(classes)  # YAML's reading of yes / no / on / off
        quote = (
            f" (data.classes {sorted(booleans)} may be YAML's reading of unquoted yes / no / "
            "on / off: quote them, e.g. \"data.classes=['no','yes']\")"
            if booleans
            else ""
        )
        raise UserError(
            f"labels CSV '{source}': {what} in data.classes {classes}{quote}; {fix}, or map "
            "them with data.label_map."
        )
    if len(classes) < 2:
        raise UserError(f"labels CSV '{source}': only class(es) {classes} present; need >= 2.")
    return classes


def map_labels(df: pd.DataFrame, cfg: DataConfig, source: str) -> tuple[pd.DataFrame, list[str]]:
    """Apply data.label_map and data.classes; print counts of kept and dropped slides.

    Numeric labels are compared as numbers (canonical_label); blank / NaN labels are an error
    naming the rows, unless data.label_map maps them (to a class, or to 'drop' to exclude)."""
    df = df.assign(raw_label=df["raw_label"].map(canonical_label))
    label_map = _canonical_map(cfg.label_map)
    _missing_labels(df, set(label_map), source)
    raw = df["raw_label"]
    if label_map:
        unknown = sorted(set(raw) - set(label_map))
        if unknown:
            raise UserError(
                f"labels CSV '{source}': label(s) {unknown} are not in data.label_map "
                f"({sorted(label_map)}); add them (map to '{DROP}' to exclude)."
            )
        mapped = raw.map(label_map)
    else:
        _case_variants(raw, [canonical_label(c) for c in cfg.classes], source)
        mapped = raw
    keep = mapped != DROP
    dropped = df.loc[~keep, "raw_label"].value_counts().to_dict()
    df = df.loc[keep].assign(label_name=mapped[keep])
    classes = _classes(df["label_name"], cfg.classes, source)
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


def _one_file_one_slide(slide_ids: pd.Series, paths: list[Path | None], root: Path) -> None:
    """Refuse one feature file standing for two slides (links, hard links, a case-insensitive
    disk): the same tiles would count twice and could sit in both a train and a test fold."""
    seen: dict[tuple[int, int], tuple[str, Path]] = {}
    for sid, path in zip(slide_ids, paths, strict=True):
        if path is None:
            continue
        st = path.stat()
        first = seen.setdefault((st.st_dev, st.st_ino), (sid, path))
        if first[0] != sid:
            raise UserError(
                f"slides '{first[0]}' and '{sid}' have the same feature file in '{root}' "
                f"({first[1].name} and {path.name} are one file, {path.resolve()}); one file "
                "cannot be two slides: fix the labels CSV or the links."
            )


def find_features(df: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    """Attach each slide's feature file; missing ones fail (listing ids) or are skipped."""
    if not cfg.features_dir:
        raise UserError("data.features_dir is not set: pass the folder of <slide_id>.h5 bags.")
    root = Path(cfg.features_dir)
    if root.exists() and not root.is_dir():
        raise UserError(
            f"data.features_dir '{root}' is a file, not a folder: pass the folder of "
            "<slide_id>.h5 bags (`extract` writes <output_dir>/<cache_key>/)."
        )
    if not root.is_dir():
        raise UserError(f"features folder '{root}' not found: check data.features_dir.")
    paths = [bag_path(root, s) for s in df["slide_id"]]
    missing = [s for s, p in zip(df["slide_id"], paths, strict=True) if p is None]
    skip = cfg.on_missing == "skip"
    if missing and (not skip or len(missing) == len(df)):
        raise UserError(
            f"{len(missing)} labelled slide(s) have no feature file in '{root}': "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}. "
            + _missing_advice(root, missing, set(df["slide_id"]), skip)
        )
    if missing:  # a typo must not drop a slide unnoticed
        typos = _near_ids(missing, sorted(set(bag_files(root)) - set(df["slide_id"])))
        log.warning("skipping %d labelled slides without features: %s %s", len(missing),
                    missing[:10], " ".join(typos))  # fmt: skip
    _one_file_one_slide(df["slide_id"], paths, root)
    df = df.assign(path=paths)
    return df[df["path"].notna()]


def _missing_advice(root: Path, missing: list[str], labelled: set[str], skip: bool) -> str:
    """The fix for labelled slides without bags: the cache subfolder the user meant, the
    feature files the ids were meant to name, or else extract / on_missing."""
    ids = set(bag_files(root))
    if not ids:
        caches = [
            str(d)
            for d in sorted(root.iterdir())
            if d.is_dir() and not d.name.startswith(".")
            and (bag_files(d) or (d / "extract.csv").is_file())
        ]  # fmt: skip
        if caches:
            meant = " or ".join(f"data.features_dir={c}" for c in caches)
            return f"It holds no feature files, its subfolders do: did you mean {meant}?"
    fix = "run `extract` for them" + ("." if skip else " or pass data.on_missing=skip.")
    typos = _near_ids(missing, sorted(ids - labelled))
    if not typos:
        return fix[0].upper() + fix[1:]
    # a near id may be another real slide, not yet extracted: the hint is a question, and the
    # extract fix stays
    return f"{' '.join(typos)} If so, fix the slide ids in data.labels_csv; otherwise {fix}"


def _near_ids(missing: list[str], unlabelled: list[str], examples: int = 3) -> list[str]:
    """A few "Labels say 's3': did you mean 's03'?" for labelled ids without bags that match an
    unlabelled bag but for case, a slide-file extension or a small typo."""
    if not unlabelled:
        return []
    by_key = {_id_key(u): u for u in unlabelled}
    found = []
    for sid in missing[: 20 * examples]:  # difflib is slow on big cohorts: a few examples do
        near = by_key.get(_id_key(sid))
        if near is None:
            close = difflib.get_close_matches(_id_key(sid), list(by_key), n=1, cutoff=0.75)
            near = by_key[close[0]] if close else None
        if near is not None:
            found.append(f"Labels say {sid!r}: did you mean {near!r}?")
        if len(found) == examples:
            break
    return found


def _id_key(slide_id: str) -> str:
    """A slide id without case or a slide-file extension ('S03.svs' -> 's03')."""
    key = slide_id.casefold()
    ext = next((e for e in SLIDE_EXTENSIONS if key.endswith(e)), "")
    return key[: len(key) - len(ext)] if ext and len(key) > len(ext) else key


def mixed_patients(df: pd.DataFrame, label: str) -> list[str]:
    """Patients whose slides carry more than one value of ``label`` (no patient-level label)."""
    counts = df.groupby("patient_id")[label].nunique()
    return counts[counts > 1].index.tolist()


def build_cohort(cfg: DataConfig) -> Cohort:
    """Labels + features -> bags at slide or patient level."""
    df = read_labels(cfg.labels_csv, cfg.label_column)
    df, classes = map_labels(df, cfg, str(cfg.labels_csv))
    df = find_features(df, cfg)
    if cfg.bag_level == "patient":
        conflict = mixed_patients(df, "label")
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
