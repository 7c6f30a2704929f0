"""`evaluate` on patient-level predictions with labels_csv: `fit`'s patient bags
(data.bag_level=patient, slide_id 'S0;S1') and `predict`'s patient_predictions.csv take each
patient's label, with the run's label_map, from its slides; conflicting labels are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from test_evaluate import evaluate_cli

from melanoma_mil.config import FitConfig, PredictConfig, load_config
from melanoma_mil.data.synthetic import make_bag_cohort
from melanoma_mil.evaluation.evaluate import summary_line
from melanoma_mil.inference.predict import run_predict
from melanoma_mil.training.cv import run_fit

LABEL_MAP = "data.label_map={a: low, b: high, c: drop}"  # P0002, P0005, ... are dropped
KEPT = 8  # patients of classes a (low) and b (high)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 patients, even ones with two slides, odd ones with one; a bag_level=patient `fit`
    (run/) and `predict` of its patients (pred/patient_predictions.csv)."""
    root = tmp_path_factory.mktemp("patients")
    features, labels = make_bag_cohort(
        root, n_patients=12, dim=8, classes=("a", "b", "c"), slides_per_patient=2, shift=4.0
    )
    table = pd.read_csv(labels)
    single = table["patient_id"].str[-1].astype(int) % 2 == 1
    for sid in table.loc[single & table["slide_id"].str.endswith("_S1"), "slide_id"]:
        (features / f"{sid}.h5").unlink()
    table[~single | table["slide_id"].str.endswith("_S0")].to_csv(labels, index=False)
    keys = [f"data.features_dir={features}", f"data.labels_csv={labels}", f"output_dir={root}/run",
            "cv.folds=2", "trainer.max_epochs=1", "logger=none", "trainer.accelerator=cpu",
            "data.bag_level=patient", LABEL_MAP, "data.classes=[low,high]"]  # fmt: skip
    assert run_fit(load_config(FitConfig, [], keys)) == 0
    keys = [f"run_dir={root}/run", f"output_dir={root}/pred", "device=cpu", "num_workers=0",
            f"features_dir={features}", f"patients_csv={labels}", "heatmaps=false"]  # fmt: skip
    assert run_predict(load_config(PredictConfig, [], keys)) == 0
    return root


def _evaluate(
    capsys: pytest.CaptureFixture[str], root: Path, predictions: str, labels: Path, out: str
) -> tuple[int, str, dict]:
    rc, err = evaluate_cli(
        capsys, f"predictions={root / predictions}", f"run_dir={root / 'run'}",
        f"labels_csv={labels}", f"output_dir={root / out}",
    )  # fmt: skip
    path = root / out / "evaluation.json"
    return rc, err, json.loads(path.read_text()) if path.exists() else {}


def test_fit_patient_bags_take_their_slides_labels(
    cohort: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two-slide bags ('P0000_S0;P0000_S1') were left unlabelled: AUC on the one-slide ones."""
    preds = pd.read_csv(cohort / "run/predictions.csv")
    assert preds["slide_id"].str.contains(";").sum() == 4 and preds["patient_id"].nunique() == KEPT
    rc, err, ev = _evaluate(capsys, cohort, "run/predictions.csv", cohort / "labels.csv", "e1")
    assert rc == 0, err
    assert ev["classification"]["n"] == ev["counts"]["patients_scored"] == KEPT
    assert not ev["excluded"] and "labelled" not in summary_line(ev)
    pooled = preds.groupby("patient_id")[["y", "prob_high"]].mean()
    auc = roc_auc_score(pooled["y"], pooled["prob_high"])
    assert ev["classification"]["auc"]["value"] == pytest.approx(auc)


def test_patient_predictions_apply_drop_and_say_how_many_are_labelled(
    cohort: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """'drop' patients leave every analysis (as dropped slides do), not "no label"; the
    summary says when the AUC is over fewer patients than were scored."""
    labels = pd.read_csv(cohort / "labels.csv")
    labels.loc[labels["patient_id"] == "P0001", "label"] = "NA"
    labels.to_csv(cohort / "blank.csv", index=False)
    rc, err, ev = _evaluate(
        capsys, cohort, "pred/patient_predictions.csv", cohort / "blank.csv", "e2"
    )
    assert rc == 0, err
    assert ev["counts"]["patients_scored"] == KEPT and ev["classification"]["n"] == KEPT - 1
    reasons = {x["id"]: x["reason"] for x in ev["excluded"]}
    assert reasons.pop("P0001") == "blank or NA label in labels_csv"
    assert set(reasons) == {"P0002", "P0005", "P0008", "P0011"}
    assert all("'drop'" in r for r in reasons.values())
    assert f"on the {KEPT - 1} labelled patients" in summary_line(ev)


@pytest.mark.parametrize("predictions", ["run/predictions.csv", "pred/patient_predictions.csv"])
def test_a_patient_with_disagreeing_slides_is_refused(
    cohort: Path, capsys: pytest.CaptureFixture[str], predictions: str
) -> None:
    labels = pd.read_csv(cohort / "labels.csv")
    labels.loc[labels["slide_id"] == "P0004_S1", "label"] = "a"  # P0004_S0 is b
    labels.to_csv(cohort / "mixed.csv", index=False)
    out = f"e3_{predictions.split('/')[0]}"
    rc, err, _ = _evaluate(capsys, cohort, predictions, cohort / "mixed.csv", out)
    assert rc == 2 and "mixed.csv" in err and "['P0004']" in err
    assert "different labels" in err and len(err.strip().splitlines()) == 1
    assert not (cohort / out).exists()
