"""`fit` and `predict` given clinical data (and labels) write report.html, with the run's
provenance, CV table and heatmaps; a bad clinical CSV fails before any training."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import Pipeline
from PIL import Image
from test_evaluate import FIGURES, embedded_figures

from melanoma_mil.cli import main
from melanoma_mil.config import EvaluateConfig, FitConfig, PredictConfig, load_config
from melanoma_mil.errors import UserError
from melanoma_mil.evaluation.evaluate import evaluate
from melanoma_mil.evaluation.hooks import write_report
from melanoma_mil.ids import id_path
from melanoma_mil.inference.predict import run_predict
from melanoma_mil.outdir import claim_output
from melanoma_mil.rundir import load_run
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
    """Exit 1, not 2: the work is done (exit 2 is bad input found before any work)."""
    clinical = pd.read_csv(pipe.root / "cohort" / "clinical.csv")
    clinical.assign(patient_id="x" + clinical["patient_id"].astype(str)).to_csv(
        tmp_path / "clinical.csv", index=False
    )  # no patient of the predictions in it
    cfg = fit_cfg(pipe, tmp_path / "unused", f"clinical_csv={tmp_path / 'clinical.csv'}")
    rc = write_report(cfg, tmp_path, pipe.run_dir / "predictions.csv", pipe.run_dir)
    assert rc == 1
    assert "report not written" in caplog.text and "patient_id values must match" in caplog.text
    assert "python -m melanoma_mil evaluate predictions=" in caplog.text
    assert list(tmp_path.iterdir()) == [tmp_path / "clinical.csv"]


def _heatmaps(folder: Path, run_id: str, run_dir: Path, slides: pd.Series) -> Path:
    """A `heatmap` output folder as its marker records it: which run made the images."""
    record = {"command": "heatmap", "run_id": run_id, "run_dir": str(run_dir)}
    claim_output(folder, record, False, ())
    for i, slide in enumerate(slides):
        path = id_path(folder, slide) / "heatmap.png"
        path.parent.mkdir(parents=True)
        Image.new("RGB", (64, 48), (i * 6, 0, 0)).save(path)
    return folder


def test_heatmaps_of_another_run_are_refused_before_any_work(
    pipe: Pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """They would show that run's attention under this run's probabilities."""
    run = load_run(pipe.run_dir)
    slides = pd.read_csv(pipe.run_dir / "predictions.csv")["slide_id"]
    out = tmp_path / "out"
    argv = ["evaluate", f"predictions={pipe.run_dir / 'predictions.csv'}"]
    argv += [f"run_dir={pipe.run_dir}", f"output_dir={out}"]
    other = _heatmaps(tmp_path / "other", "0" * 32, tmp_path / "runs" / "other", slides)
    refit = _heatmaps(tmp_path / "refit", "1" * 32, pipe.run_dir, slides)
    for folder, made in ((other, f"run {tmp_path / 'runs' / 'other'}"), (refit, "fit again")):
        assert main([*argv, f"heatmaps_dir={folder}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: heatmaps_dir '{folder}' holds heatmaps made by `heatmap`")
        assert made in err and f"heatmap run_dir={pipe.run_dir} " in err
        assert len(err.strip().splitlines()) == 1 and not out.exists()
    assert main([*argv, f"heatmaps_dir={tmp_path / 'nowhere'}"]) == 2
    assert "is not a folder" in capsys.readouterr().err and not out.exists()
    own = _heatmaps(tmp_path / "own", run.run_id, pipe.run_dir.resolve(), slides)
    assert main([*argv, f"heatmaps_dir={own}", "top_heatmaps=4"]) == 0
    shown = [k for k in embedded_figures(out / "report.html") if k.startswith("heatmap:")]
    assert len(shown) == 4


def test_predictions_of_another_run_are_refused_before_any_work(
    pipe: Pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """run_dir names the classes, label_map and CV table the report applies to the predictions;
    a `predict` folder (or a `fit` run) records the run that made them."""
    run = load_run(pipe.run_dir)
    preds = pipe.run_dir / "predictions.csv"
    for made, run_id, named in (("other", "0" * 32, "other"), ("refit", "1" * 32, "fit again")):
        folder = tmp_path / made
        where = tmp_path / "runs" / "other" if made == "other" else run.run_dir
        record = {"command": "predict", "run_id": run_id, "run_dir": str(where)}
        claim_output(folder, record, False, ())
        (folder / "predictions.csv").write_bytes(preds.read_bytes())
        argv = [f"predictions={folder / 'predictions.csv'}", f"run_dir={pipe.run_dir}"]
        assert main(["evaluate", *argv, f"output_dir={tmp_path / 'out'}"]) == 2
        err = capsys.readouterr().err
        assert f"were made by run '{where}'" in err and named in err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    own = tmp_path / "own"
    claim_output(own, {"command": "predict", "run_id": run.run_id}, False, ())
    (own / "predictions.csv").write_bytes(preds.read_bytes())
    argv = [f"predictions={own / 'predictions.csv'}", f"run_dir={pipe.run_dir}"]
    assert main(["evaluate", *argv, f"output_dir={tmp_path / 'out'}"]) == 0


def test_the_command_that_redoes_a_report_names_only_the_keys_given() -> None:
    from melanoma_mil.evaluation.hooks import _command

    given = EvaluateConfig(predictions="p.csv", output_dir="o", time_column="os", threshold=0.3)
    assert _command(given) == (
        "python -m melanoma_mil evaluate predictions=p.csv time_column=os threshold=0.3 "
        "output_dir=o"
    )


def test_an_external_cohort_scored_with_another_threshold_than_the_runs_report_is_warned(
    pipe: Pipeline,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """fit's report used threshold=0.3: predict / evaluate of new slides with the default 0.5
    say so (the external and internal reports would apply two rules); with 0.3, nothing.
    predict with labels says it once, under its report's numbers."""
    run = tmp_path / "run"
    clinical = pipe.root / "cohort" / "clinical.csv"
    assert run_fit(fit_cfg(pipe, run, f"clinical_csv={clinical}", "threshold=0.3")) == 0
    own = json.loads((run / "evaluation" / "evaluation.json").read_text())["warnings"]
    assert not [w for w in own if "threshold" in w], own
    keys = [f"run_dir={run}", f"features_dir={pipe.features}", f"slides_dir={pipe.slides}"]
    keys += [f"labels_csv={pipe.root / 'cohort/labels.csv'}", "device=cpu", "heatmaps=false"]
    out = tmp_path / "pred"
    assert run_predict(load_config(PredictConfig, [], [*keys, f"output_dir={out}"])) == 0
    note = f"run '{run}' reported its own predictions with threshold=0.3; these use threshold=0.5"
    printed = capsys.readouterr().out
    assert f"  note: {note}" in printed and note not in caplog.text
    assert printed.count(note) == 1
    keys = [k for k in keys if not k.startswith("labels_csv=")]  # no report: said before the work
    assert run_predict(load_config(PredictConfig, [], [*keys, f"output_dir={out}_bare"])) == 0
    assert note in caplog.text
    warnings = json.loads((out / "evaluation" / "evaluation.json").read_text())["warnings"]
    assert any(note in w for w in warnings), warnings
    for threshold, warned in (("0.5", True), ("0.3", False)):
        keys = [
            f"predictions={out / 'predictions.csv'}",
            f"run_dir={run}",
            f"threshold={threshold}",
            f"labels_csv={pipe.root / 'cohort/labels.csv'}",
        ]
        cfg = load_config(EvaluateConfig, [], [*keys, f"output_dir={tmp_path / threshold}"])
        assert any(note[:40] in w for w in evaluate(cfg)["warnings"]) == warned, threshold
