"""A run's report (evaluation/, report.html: made from predictions.csv by `evaluate`) never
outlives the predictions it was made from: the `fit` that completes the run again with other
predictions removes it, and keeps it when the predictions came out the same."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from melanoma_mil import rundir
from melanoma_mil.config import FitConfig, load_config
from melanoma_mil.data.synthetic import make_bag_cohort
from melanoma_mil.io import sha256_file
from melanoma_mil.training.cv import run_fit


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("cohort")
    features, labels = make_bag_cohort(root, n_patients=12, dim=8, shift=4.0)
    patients = pd.read_csv(labels)["patient_id"]
    clinical = pd.DataFrame(
        {"patient_id": patients, "time": range(1, 13), "event": [i % 2 for i in range(12)]}
    )
    clinical.to_csv(root / "clinical.csv", index=False)
    return features, labels, root / "clinical.csv"


def fit(cohort: tuple[Path, Path, Path], out: Path, *extra: str) -> int:
    keys = [f"data.features_dir={cohort[0]}", f"data.labels_csv={cohort[1]}", f"output_dir={out}"]
    keys += ["cv.folds=2", "trainer.max_epochs=1", "trainer.accelerator=cpu", "logger=none"]
    return run_fit(load_config(FitConfig, [], [*keys, "model.hidden_dim=8", *extra]))


def retrained_otherwise(run: Path, name: str) -> None:
    """A fold trained again that came out otherwise (another GPU, another version), as its
    record says; the run's results are then remade."""
    fold = run / rundir.FOLDS / name
    preds = pd.read_csv(fold / rundir.PREDICTIONS)
    probs = [c for c in preds.columns if c.startswith("prob_")]
    preds[probs] = preds[probs[::-1]].to_numpy()
    preds.to_csv(fold / rundir.PREDICTIONS, index=False)
    record = json.loads((fold / rundir.DONE).read_text())
    record["files"][rundir.PREDICTIONS] = sha256_file(fold / rundir.PREDICTIONS)
    (fold / rundir.DONE).write_text(json.dumps(record))
    (run / rundir.SUMMARY).unlink()


def test_a_run_completed_again_keeps_no_report_of_its_earlier_predictions(cohort, tmp_path):
    out = tmp_path / "run"
    assert fit(cohort, out, f"clinical_csv={cohort[2]}") == 0
    report = (out / rundir.REPORT).read_bytes()
    assert (out / rundir.EVALUATION / "evaluation.json").is_file()
    # the results remade from the same predictions: the report still describes them
    (out / rundir.SUMMARY).unlink()
    assert fit(cohort, out) == 0
    assert (out / rundir.REPORT).read_bytes() == report
    # other predictions: the report goes (with what a finisher killed while dropping one left)
    (out / ".report.html.stale-0123abcd").write_text("half")
    retrained_otherwise(out, "fold_1")
    assert fit(cohort, out) == 0
    run = rundir.load_run(out)
    assert not (out / rundir.REPORT).exists() and not (out / rundir.EVALUATION).exists()
    assert sorted(p.name for p in out.glob(".*")) == [".melanoma-mil.json"]
    # remade for the new predictions when asked
    assert fit(cohort, out, f"clinical_csv={cohort[2]}") == 0
    assert (out / rundir.REPORT).is_file() and run.run_id == rundir.load_run(out).run_id
