"""Patient-level stratified k-fold splits with an inner validation split.

The test fold never influences training or model selection: early stopping and checkpoint
choice use a validation split carved, by patient, out of each training fold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from melanoma_mil.config import CVConfig
from melanoma_mil.data.cohort import is_missing, repeated
from melanoma_mil.errors import UserError
from melanoma_mil.io import read_text_csv

_CLAM = re.compile(r"splits_(\d+)\.csv")  # one fold's file in a CLAM splits folder
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    repeat: int
    fold: int
    train: list[str]  # bag ids
    val: list[str]
    test: list[str]


def _check_class_counts(bags: pd.DataFrame, folds: int, classes: list[str]) -> None:
    """Each class in every test fold. Fewer folds are advised only where they can work: a class
    needs 3 patients (one to test, two in the training part: one of them validates)."""
    patients = bags.groupby("label")["patient_id"].nunique()
    for idx, name in enumerate(classes):
        n = int(patients.get(idx, 0))
        if n < folds:
            fix = (
                f"Lower cv.folds to <= {n} or add patients"
                if n >= 3
                else "Add patients (each class needs 3: one to test, two to train and validate)"
            )
            raise UserError(
                f"class '{name}' has {n} patient(s), fewer than cv.folds={folds}: every test fold "
                f"needs each class. {fix} (patients come from the labels CSV's patient_id)."
            )


class _OneTrainingPatient(Exception):
    """A training part holds one patient of class ``label``: no validation split can hold it."""

    def __init__(self, label: int, repeat: int, fold: int) -> None:
        super().__init__(label, repeat, fold)
        self.label, self.repeat, self.fold = label, repeat, fold


def _inner_val(train: pd.DataFrame, val_fraction: float, seed: int) -> np.ndarray | int:
    """Boolean mask over ``train`` rows: a stratified, patient-grouped validation split; or
    the label of a class with a single patient there, which no such split can hold."""
    n_splits = max(2, round(1 / val_fraction))
    patients = train.groupby("label")["patient_id"].nunique()
    n_splits = min(n_splits, int(patients.min()))
    if n_splits < 2:
        return int(patients.idxmin())
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, val_idx = next(sgkf.split(train, train["label"], groups=train["patient_id"]))
    mask = np.zeros(len(train), dtype=bool)
    mask[val_idx] = True
    return mask


def make_splits(bags: pd.DataFrame, cv: CVConfig, seed: int, classes: list[str]) -> list[Split]:
    """Stratified group k-fold by patient (x repeats), each with an inner validation split."""
    if cv.folds < 2:
        raise UserError(f"cv.folds={cv.folds}: cross-validation needs at least 2 folds.")
    if not 0 < cv.val_fraction < 0.5:
        raise UserError(f"cv.val_fraction={cv.val_fraction}: use a value in (0, 0.5).")
    _check_class_counts(bags, cv.folds, classes)
    try:
        return _folds(bags, cv, seed)
    except _OneTrainingPatient as e:
        raise UserError(_one_patient_message(bags, cv, seed, classes, e)) from None


def _folds(bags: pd.DataFrame, cv: CVConfig, seed: int) -> list[Split]:
    """The splits; `_OneTrainingPatient` names the first fold that cannot have a validation
    split (so that `make_splits` can try other cv.folds for its advice)."""
    splits: list[Split] = []
    for r in range(cv.repeats):
        sgkf = StratifiedGroupKFold(n_splits=cv.folds, shuffle=True, random_state=seed + 7919 * r)
        for k, (tr, te) in enumerate(sgkf.split(bags, bags["label"], groups=bags["patient_id"])):
            train = bags.iloc[tr]
            val_mask = _inner_val(train, cv.val_fraction, seed + 7919 * r + k)
            if isinstance(val_mask, int):
                raise _OneTrainingPatient(val_mask, r, k)
            splits.append(
                Split(
                    repeat=r,
                    fold=k,
                    train=sorted(train["bag_id"][~val_mask]),
                    val=sorted(train["bag_id"][val_mask]),
                    test=sorted(bags["bag_id"].iloc[te]),
                )
            )
    return splits


def _one_patient_message(
    bags: pd.DataFrame, cv: CVConfig, seed: int, classes: list[str], e: _OneTrainingPatient
) -> str:
    """The error for a training part with one patient of a class, with the fix that works:
    more folds make test folds smaller (leaving more patients to train on), so lowering
    cv.folds never helps; more folds than the smallest class has patients cannot be made."""
    name = classes[e.label]
    n = int(bags[bags["label"] == e.label]["patient_id"].nunique())
    most = int(bags.groupby("label")["patient_id"].nunique().min())
    more = next((f for f in range(cv.folds + 1, most + 1) if _fits(bags, cv, seed, f)), None)
    fix = f"raise cv.folds (cv.folds={more} fits: smaller test folds) or add" if more else "add"
    return (
        f"repeat {e.repeat} fold {e.fold}: its training part holds 1 of the {n} patient(s) of "
        f"class '{name}', and the validation split carved from it needs 2 (one to validate, one "
        f"to train on): {fix} patients of class '{name}' (patients come from the labels CSV's "
        "patient_id)."
    )


def _fits(bags: pd.DataFrame, cv: CVConfig, seed: int, folds: int) -> bool:
    """Whether splits into ``folds`` give every training part 2 patients of each class."""
    try:
        _folds(bags, replace(cv, folds=folds), seed)
    except _OneTrainingPatient:
        return False
    return True


def splits_hash(splits: list[Split]) -> str:
    """sha256 of the canonical split content: equal hash = paired comparison possible."""
    blob = json.dumps([asdict(s) for s in splits], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def _check_shape(splits: list[Split], source: str) -> None:
    """Each split a list of bag ids per part, training and test bags, one (repeat, fold) each:
    a repeated fold shares its run folder with the first and is silently never trained."""
    seen: set[tuple[object, object]] = set()
    for s in splits:
        where = f"{source}: repeat {s.repeat} fold {s.fold}"
        for name in ("train", "val", "test"):
            ids = getattr(s, name)
            if not isinstance(ids, list) or not all(isinstance(b, str) for b in ids):
                raise UserError(f"{where}: '{name}' must be a list of bag ids (strings).")
        for name in ("train", "test"):
            if not getattr(s, name):
                raise UserError(
                    f"{where} has no {name} bags; every split needs training and test bags."
                )
        if (s.repeat, s.fold) in seen:
            raise UserError(f"{where} is listed twice; number each repeat's folds once.")
        seen.add((s.repeat, s.fold))


def check_splits(splits: list[Split], bags: pd.DataFrame, source: str) -> None:
    """No patient in two partitions of a fold; every split bag belongs to the cohort. An empty
    validation part is allowed: only early stopping needs one (`selection.run_selection`)."""
    _check_shape(splits, source)
    patient = dict(zip(bags["bag_id"], bags["patient_id"], strict=True))
    for s in splits:
        unknown = sorted(set(s.train + s.val + s.test) - set(patient))
        slides = {x for ids in bags["slide_ids"] for x in str(ids).split(";")}
        if unknown and set(unknown) <= slides - set(patient):  # patient bags, split by slide
            raise UserError(
                f"{source}: split names slides ({unknown[:3]}, ...) but data.bag_level=patient "
                "makes one bag per patient; list patient ids in the splits, or fit with "
                "data.bag_level=slide."
            )
        if unknown:
            raise UserError(
                f"{source}: split references bag(s) {unknown[:5]} that are not in the cohort "
                "(missing features or labels); add them back, or drop cv.splits_file to make "
                "new splits."
            )
        parts = {name: {patient[b] for b in getattr(s, name)} for name in ("train", "val", "test")}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            shared = parts[a] & parts[b]
            if shared:
                raise UserError(
                    f"{source}: repeat {s.repeat} fold {s.fold} has patient(s) "
                    f"{sorted(shared)[:5]} in both {a} and {b}; splits must be by patient."
                )


def read_clam_splits(path: Path) -> list[Split]:
    """CLAM's splits_<k>.csv (columns train, val, test of slide ids): the folder or one file."""
    folder = path if path.is_dir() else path.parent
    # CLAM writes splits_<k>_bool.csv and splits_<k>_descriptor.csv next to each fold's file
    numbered = {int(m[1]): p for p in folder.iterdir() if (m := _CLAM.fullmatch(p.name))}
    files = [numbered[k] for k in sorted(numbered)]
    if not files:
        raise UserError(f"{folder}: no splits_<k>.csv files (CLAM format) found.")
    splits = []
    for k, f in enumerate(files):
        df = read_text_csv(f, "CLAM splits file", "cv.splits_file", ("train", "val", "test"))
        # a shorter column's cells are blank (pandas) or NA (R's write.csv): no bag
        cols = {c: df[c][~is_missing(df[c])].tolist() for c in ("train", "val", "test") if c in df}
        if set(cols) != {"train", "val", "test"}:
            raise UserError(f"{f}: CLAM splits need columns train, val, test.")
        splits.append(Split(repeat=0, fold=k, **{c: sorted(v) for c, v in cols.items()}))
    return splits


def check_covers(splits: list[Split], bags: pd.DataFrame, source: str) -> None:
    """Every labelled bag of the cohort appears in the splits: none is silently left out. Test
    folds that do not partition the cohort (Monte Carlo splits, as CLAM's) are said: the pooled
    out-of-fold results then leave out the untested bags and average the twice-tested ones."""
    seen = {b for s in splits for b in (*s.train, *s.val, *s.test)}
    left_out = sorted(set(bags["bag_id"]) - seen)
    if left_out:
        raise UserError(
            f"{source}: {len(left_out)} labelled bag(s) of the cohort are in no split "
            f"({left_out[:5]}{' ...' if len(left_out) > 5 else ''}); drop them from the labels "
            "CSV (or map them to 'drop') to use these splits, or make new splits."
        )
    for repeat in sorted({s.repeat for s in splits}):
        tested = pd.Series([b for s in splits if s.repeat == repeat for b in s.test])
        never = sorted(set(bags["bag_id"]) - set(tested))
        twice = sorted(repeated(tested))
        if never or twice:
            log.warning(
                "%s: its test folds%s do not partition the cohort: %d bag(s) tested in no fold "
                "(%s), %d in more than one (%s); the pooled out-of-fold predictions and AUC "
                "leave out the first and average the others, the per-fold metrics are as usual",
                source,
                f" (repeat {repeat})" if repeat else "",
                len(never),
                never[:3],
                len(twice),
                twice[:3],
            )


def cohort_sha256(bags: pd.DataFrame, classes: list[str]) -> str:
    """Identity of a labelled cohort (bags, patients, slides, labels, class order)."""
    cols = ["bag_id", "patient_id", "slide_ids", "label"]
    rows = bags[cols].sort_values("bag_id").astype(str).values.tolist()
    return hashlib.sha256(json.dumps([classes, rows]).encode()).hexdigest()
