"""make_splits' errors name a fix that works for the cohort at hand."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import pytest

from melanoma_mil.cli import main
from melanoma_mil.config import CVConfig
from melanoma_mil.data.splits import make_splits
from melanoma_mil.data.synthetic import make_bag_cohort
from melanoma_mil.errors import UserError


def bags(n_a: int, n_b: int) -> pd.DataFrame:
    """One bag per patient: ``n_a`` patients of class 'A' (label 0), ``n_b`` of 'B'."""
    rows = [(f"a{i}", f"pa{i}", 0) for i in range(n_a)]
    rows += [(f"b{i}", f"pb{i}", 1) for i in range(n_b)]
    return pd.DataFrame(rows, columns=["bag_id", "patient_id", "label"])


def test_one_training_patient_advises_more_folds_not_fewer() -> None:
    """3 patients of 'A' in 2 folds leave 1 to train on in some fold: fewer folds would make
    that worse (and 2 is the least), more folds fix it; the advice names the value that fits."""
    cohort, cv = bags(3, 8), CVConfig(folds=2)
    with pytest.raises(UserError) as e:
        make_splits(cohort, cv, 0, ["A", "B"])
    message = str(e.value)
    assert "\n" not in message and "lower" not in message
    assert "1 of the 3 patient(s) of class 'A'" in message
    assert "raise cv.folds (cv.folds=3 fits" in message
    assert "add patients of class 'A'" in message
    assert len(make_splits(cohort, replace(cv, folds=3), 0, ["A", "B"])) == 3


def test_one_training_patient_with_no_folds_left_advises_only_patients() -> None:
    with pytest.raises(UserError, match=r"class 'A'.*: add patients of class 'A'") as e:
        make_splits(bags(2, 8), CVConfig(folds=2), 0, ["A", "B"])
    assert "cv.folds" not in str(e.value)
    assert len(make_splits(bags(4, 8), CVConfig(folds=2), 0, ["A", "B"])) == 2


def test_too_few_patients_for_the_folds_advises_only_folds_that_fit() -> None:
    """A class of 2 patients fits no cv.folds (2 folds leave 1 of them to train and validate
    on): the advice is to add patients, not 'cv.folds <= 2', which then fails in turn."""
    with pytest.raises(UserError) as e:
        make_splits(bags(2, 8), CVConfig(folds=3), 0, ["A", "B"])
    advice = str(e.value).split(": ", 1)[1]  # after "fewer than cv.folds=3"
    assert "cv.folds" not in advice and "add patients" in advice.lower()
    with pytest.raises(UserError, match="class 'A'"):  # what 'cv.folds <= 2' would lead to
        make_splits(bags(2, 8), CVConfig(folds=2), 0, ["A", "B"])
    with pytest.raises(UserError, match=r"Lower cv.folds to <= 3 or add patients") as e:
        make_splits(bags(3, 8), CVConfig(folds=4), 0, ["A", "B"])
    assert len(make_splits(bags(3, 8), CVConfig(folds=3), 0, ["A", "B"])) == 3  # and it fits


def test_fit_names_the_fix_in_one_line_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    features, labels = make_bag_cohort(tmp_path, n_patients=6, dim=8)  # 3 patients a class
    out = tmp_path / "run"
    args = [f"data.features_dir={features}", f"data.labels_csv={labels}", f"output_dir={out}"]
    rc = main(["fit", *args, "cv.folds=2", "logger=none", "trainer.accelerator=cpu"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "raise cv.folds (cv.folds=3 fits" in lines[0] and "lower" not in lines[0]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ({"fold": 0}, "repeat 0 fold 0 is listed twice"),  # its run folder is the first's
        ({"test": []}, "repeat 0 fold 1 has no test bags"),
        ({"train": []}, "repeat 0 fold 1 has no train bags"),
        ({"val": "P0000"}, "'val' must be a list of bag ids"),
    ],
)
def test_a_malformed_user_splits_file_is_one_line_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: dict[str, object], needle: str
) -> None:
    """A second fold 0 was silently never trained (left out of predictions.csv); an empty
    test part crashed after training, an empty train part trained on the validation bags."""
    features, labels = make_bag_cohort(tmp_path, n_patients=12, dim=8)
    made = make_splits(pd.read_csv(labels).assign(bag_id=lambda d: d["slide_id"],
                                                  label=lambda d: d["label"].factorize()[0]),
                       CVConfig(folds=3), 0, ["A", "B"])  # fmt: skip
    doc = [asdict(s) for s in made]
    doc[1].update(edit)
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"splits": doc}))
    out = tmp_path / "run"
    args = [f"data.features_dir={features}", f"data.labels_csv={labels}", f"output_dir={out}",
            f"cv.splits_file={splits}", "trainer.max_epochs=1"]  # fmt: skip
    rc = main(["fit", *args, "logger=none", "trainer.accelerator=cpu"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0] and str(splits) in lines[0]
    assert not (out / "folds").exists()


def test_a_user_splits_file_without_validation_bags_trains_when_no_selection_needs_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Splits with an empty val part (CLAM's with val_frac=0, plain k-fold files) were refused
    as 'needed for model selection', even where the run selects nothing (selection=last, or
    auto, which then trains on train + val); only early stopping needs them."""
    features, labels = make_bag_cohort(tmp_path, n_patients=12, dim=8)
    made = make_splits(pd.read_csv(labels).assign(bag_id=lambda d: d["slide_id"],
                                                  label=lambda d: d["label"].factorize()[0]),
                       CVConfig(folds=3), 0, ["A", "B"])  # fmt: skip
    doc = [{**asdict(s), "train": sorted(s.train + s.val), "val": []} for s in made]
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"splits": doc}))
    base = [f"data.features_dir={features}", f"data.labels_csv={labels}", "logger=none",
            f"cv.splits_file={splits}", "trainer.max_epochs=1",
            "trainer.accelerator=cpu"]  # fmt: skip
    assert main(["fit", *base, f"output_dir={tmp_path / 'auto'}"]) == 0
    assert (tmp_path / "auto" / "cv_summary.json").is_file()
    out = tmp_path / "early"
    rc = main(["fit", *base, f"output_dir={out}", "trainer.selection=early_stopping"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "fold_0: its validation split is empty" in lines[0]
    assert "trainer.selection=last" in lines[0]
    assert not (out / "folds").exists()


def test_slide_splits_for_patient_bags_name_the_bag_level() -> None:
    """A CLAM splits folder names slides; with data.bag_level=patient the bags are patients,
    and 'missing features or labels' sent the user after files that are there."""
    from melanoma_mil.data.splits import Split, check_splits

    bags = pd.DataFrame(
        {
            "bag_id": ["p1", "p2", "p3"],
            "patient_id": ["p1", "p2", "p3"],
            "slide_ids": ["s1;s2", "s3", "s4;s5"],
            "label": [0, 1, 0],
        }
    )
    by_slide = [Split(0, 0, ["s1", "s2"], ["s3"], ["s4", "s5"])]
    with pytest.raises(UserError, match=r"data\.bag_level=patient makes one bag per patient"):
        check_splits(by_slide, bags, "splits/")
    with pytest.raises(UserError, match="not in the cohort"):  # a really unknown bag
        check_splits([Split(0, 0, ["p1", "x9"], ["p2"], ["p3"])], bags, "splits/")
    check_splits([Split(0, 0, ["p1"], ["p2"], ["p3"])], bags, "splits/")
