"""`fit` and `predict` given clinical data (and labels) write report.html, with the run's
provenance, CV table and heatmaps; a bad clinical CSV fails before any training."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import Pipeline
from test_evaluate import FIGURES, embedded_figures

from melanoma_mil.cli import main
from melanoma_mil.config import FitConfig, PredictConfig, load_config
from melanoma_mil.errors import UserError
from melanoma_mil.evaluation.hooks import write_report
from melanoma_mil.inference.predict import run_predict
from melanoma_mil.training.cv import run_fit


def fit_cfg(pipe: Pipeline, out: Path, *extra: str) -> FitConfig:
    keys = [
        f"data.features_dir={pipe.features}",
        f"data.labels_csv={pipe.root / 'cohort/labels.csv'}",
        f"output_dir={out}",
        "cv.folds=2",
        "trainer.max_epochs=2",
        "logger=none",
        "trainer.accelerator=cpu",
    ]
    return load_config(FitConfig, [], [*keys, *extra])


def test_fit_with_clinical_csv_writes_the_report(pipe: Pipeline, tmp_path: Path) -> None:
    out = tmp_path / "run"
    clinical = pipe.root / "cohort" / "clinical.csv"  # the demo cohort's planted survival
    assert run_fit(fit_cfg(pipe, out, f"clinical_csv={clinical}", "groups=median")) == 0
    ev = json.loads((out / "evaluation" / "evaluation.json").read_text())
    assert ev["kind"] == "fit" and ev["run_dir"] == str(out)
    rule = f"prob_{ev['positive_class']} >= the cohort's median"
    assert ev["survival"]["group_rule"].startswith(rule)
    assert ev["survival"]["patients_used"] == pd.read_csv(clinical)["patient_id"].nunique()
    figures = embedded_figures(out / "report.html")
    assert set(figures) == FIGURES | {"cv_roc"}  # the run's own ROC in the CV section
    html = (out / "report.html").read_text()
    provenance = json.loads((out / "provenance.json").read_text())
    for needle in ("fold 0", "Pooled out-of-fold AUC", provenance["splits_sha256"], "random"):
        assert needle in html


def test_evaluate_never_writes_into_a_folder_another_command_made(
    pipe: Pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """evaluate writes roc.png, like fit: pointed at a fit run, even with overwrite=true, it
    refuses before any work instead of replacing the run's files."""
    run = tmp_path / "run"
    assert run_fit(fit_cfg(pipe, run)) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    preds = run / "predictions.csv"
    argv = ["evaluate", f"predictions={preds}", f"output_dir={run}", "overwrite=true"]
    assert main(argv) == 2
    assert "holds output of `fit`" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    out = tmp_path / "evaluation"  # its own folder: written, then refused without overwrite
    assert main(["evaluate", f"predictions={preds}", f"output_dir={out}"]) == 0
    assert (out / "roc.png").is_file() and (out / ".melanoma-mil.json").is_file()
    assert main(["evaluate", f"predictions={preds}", f"output_dir={out}"]) == 2
    assert "overwrite=true" in capsys.readouterr().err


def test_bad_clinical_csv_fails_before_fit_trains(pipe: Pipeline, tmp_path: Path) -> None:
    bad = tmp_path / "clinical.csv"
    pd.read_csv(pipe.root / "cohort" / "clinical.csv").drop(columns="time").to_csv(bad)
    with pytest.raises(UserError, match=r"lacks column\(s\) \['time'\]"):
        run_fit(fit_cfg(pipe, tmp_path / "run", f"clinical_csv={bad}"))
    assert not (tmp_path / "run").exists()


def test_predict_with_labels_and_clinical_data_writes_the_report(
    pipe: Pipeline, tmp_path: Path
) -> None:
    out = tmp_path / "pred"
    # everyone has an event, so both median groups do, whichever way the model ranks them
    clinical = pd.read_csv(pipe.root / "cohort" / "clinical.csv").assign(event=1)
    clinical.to_csv(tmp_path / "clinical.csv", index=False)
    cfg = load_config(
        PredictConfig,
        [],
        [
            f"run_dir={pipe.run_dir}",
            f"output_dir={out}",
            f"features_dir={pipe.features}",
            f"slides_dir={pipe.slides}",
            f"labels_csv={pipe.root / 'cohort/labels.csv'}",
            f"clinical_csv={tmp_path / 'clinical.csv'}",
            "groups=median",
            "device=cpu",
            "num_workers=0",
            "thumbnail_size=256",
            "top_k=2",
        ],
    )
    assert run_predict(cfg) == 0
    ev = json.loads((out / "evaluation" / "evaluation.json").read_text())
    assert ev["kind"] == "predict" and ev["classification"]["auc"]["value"] is not None
    # labels_csv's patient ids group the two slides of each paired patient
    assert ev["counts"]["slides_scored"] == 12 and ev["counts"]["patients_scored"] == 10
    figures = embedded_figures(out / "report.html")
    heatmaps = {k for k in figures if k.startswith("heatmap:")}
    assert FIGURES | {"cv_roc"} <= set(figures) and len(heatmaps) == 6


def test_a_report_that_cannot_be_made_leaves_the_predictions_and_says_how_to_redo_it(
    pipe: Pipeline, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clinical = pd.read_csv(pipe.root / "cohort" / "clinical.csv")
    clinical.to_csv(tmp_path / "clinical.csv", index=False)
    clinical_csv, threshold = f"clinical_csv={tmp_path / 'clinical.csv'}", "threshold=0.9999"
    cfg = fit_cfg(pipe, tmp_path / "unused", clinical_csv, threshold)  # one group left empty
    rc = write_report(cfg, tmp_path, pipe.run_dir / "predictions.csv", pipe.run_dir)
    assert rc == 2
    assert "report not written" in caplog.text and "no patient falls in" in caplog.text
    assert "python -m melanoma_mil evaluate predictions=" in caplog.text
    assert list(tmp_path.iterdir()) == [tmp_path / "clinical.csv"]
