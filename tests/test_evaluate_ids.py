"""`evaluate` (and predict's report) on ids that do not match between the predictions, labels_csv
and clinical_csv: every row left out is said, with the near misses (case, '.0', leading zeros)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import Pipeline, inference_cfg
from test_evaluate import _args, evaluate_cli, write_small

from melanoma_mil.config import PredictConfig
from melanoma_mil.inference.predict import run_predict


def _evaluation(root: Path) -> dict:
    return json.loads((root / "out" / "evaluation.json").read_text())


def test_labelled_slides_without_a_prediction_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A labels row for a slide predict never scored, or spelled otherwise, is said, not lost."""
    write_small(tmp_path)
    labels = pd.read_csv(tmp_path / "labels.csv", dtype=str)
    labels.loc[3, "slide_id"] = "S03"  # case
    labels.loc[len(labels)] = ["s77", "high"]  # a slide that was not predicted
    labels.to_csv(tmp_path / "labels.csv", index=False)
    rc, err = evaluate_cli(capsys, *_args(tmp_path, "clinical_csv="))
    assert rc == 0, err
    [note] = [w for w in _evaluation(tmp_path)["warnings"] if "match no prediction" in w]
    assert note.startswith("2 labelled slide(s) of labels_csv")
    assert "['S03', 's77']" in note and "'S03' ~ 's03'" in note and "'s77' ~" not in note


def test_clinical_patients_without_a_prediction_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """clinical_csv rows no prediction names were only a count in evaluation.json."""
    write_small(tmp_path)
    clinical = pd.read_csv(tmp_path / "clinical.csv", dtype=str)
    clinical.loc[5, "patient_id"] = "S05"  # case
    clinical.loc[7, "patient_id"] = "s7"  # leading zero lost in a spreadsheet
    clinical.loc[len(clinical)] = ["x99", "12.0", "1"]
    clinical.to_csv(tmp_path / "clinical.csv", index=False)
    rc, err = evaluate_cli(capsys, *_args(tmp_path))
    assert rc == 0, err
    ev = _evaluation(tmp_path)
    [note] = [n for n in ev["survival"]["notes"] if "match no prediction" in n]
    assert note.startswith("3 patient(s) of clinical_csv") and "['S05', 's7', 'x99']" in note
    assert "'S05' ~ 's05', 's7' ~ 's07'" in note and "'x99' ~" not in note
    assert ev["survival"]["patients_used"] == 38
    assert "S05" in (tmp_path / "out" / "report.html").read_text()


def test_predict_names_slides_patients_csv_leaves_alone_or_misspells(
    pipe: Pipeline, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A predicted slide patients_csv does not list is scored as a patient of its own, and a
    listed slide spelled otherwise is not pooled: both are said, not only seen in the table."""
    cache = tmp_path / "cache"
    cache.mkdir()
    for sid in ("slide_000", "slide_001", "slide_002"):
        shutil.copy(pipe.features / f"{sid}.h5", cache)
    patients = tmp_path / "patients.csv"
    patients.write_text("slide_id,patient_id\nslide_000,P1\nSlide_001,P1\n")
    cfg = inference_cfg(PredictConfig, pipe, tmp_path / "pred", f"features_dir={cache}",
                        "heatmaps=false", f"patients_csv={patients}")  # fmt: skip
    assert run_predict(cfg) == 0
    table = pd.read_csv(tmp_path / "pred" / "patient_predictions.csv")
    assert sorted(table["patient_id"]) == ["P1", "slide_001", "slide_002"]
    assert "does not list 2 predicted slide(s) (e.g. ['slide_001', 'slide_002'])" in caplog.text
    assert (
        "1 slide(s) of patients_csv" in caplog.text and "'Slide_001' ~ 'slide_001'" in caplog.text
    )
