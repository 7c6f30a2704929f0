"""Every JSON file a run writes is strict JSON (jq, JavaScript): a number that cannot be
computed, such as the AUC of a user's test fold with one class, is null, and every reader takes
null as it took NaN, including run folders written before, which hold NaN."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from melanoma_mil import rundir
from melanoma_mil.config import FitConfig, load_config
from melanoma_mil.data.synthetic import make_bag_cohort
from melanoma_mil.tracking.loggers import summary_metrics
from melanoma_mil.training.cv import run_fit


def _strict(text: str) -> object:
    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _fit(root: Path, out: Path) -> int:
    """Two user folds of 24 patients (class = patient number % 2): fold 0 tests class 0 only."""
    features, labels = make_bag_cohort(root / "cohort", n_patients=24, dim=8, shift=4.0)
    ids = [f"P{p:04d}" for p in range(24)]
    tests = [ids[0:12:2], ids[12:]]
    splits = [
        {"repeat": 0, "fold": k, "train": [b for b in ids if b not in t], "val": [], "test": t}
        for k, t in enumerate(tests)
    ]
    (root / "splits.json").write_text(json.dumps({"splits": splits}))
    keys = [f"data.features_dir={features}", f"data.labels_csv={labels}", f"output_dir={out}",
            f"cv.splits_file={root / 'splits.json'}", "trainer.max_epochs=1",
            "trainer.accelerator=cpu", "logger=none", "model.hidden_dim=8"]  # fmt: skip
    return run_fit(load_config(FitConfig, [], keys))


def test_an_undefined_fold_auc_is_null_and_read_as_nan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert _fit(tmp_path, out) == 0
    written = sorted(out.rglob("*.json"))
    assert out / rundir.SUMMARY in written and out / "folds/fold_0" / rundir.DONE in written
    for path in written:
        _strict(path.read_text())
    auc = json.loads((out / rundir.SUMMARY).read_text())["auc"]
    assert auc["per_fold"][0] is None and math.isfinite(auc["mean"])
    summary = rundir.load_run(out).summary
    assert math.isnan(summary["auc"]["per_fold"][0])
    assert all(isinstance(v, float) for v in summary_metrics(summary).values())
    capsys.readouterr()
    assert _fit(tmp_path, out) == 0  # the finished run: its table printed from the file
    printed = capsys.readouterr().out
    assert "auc                   n/a  " in printed and not re.search(r"\bnan\b", printed)
    assert "n/a: a test fold lacking a class has no AUC" in printed


def test_a_run_written_with_nan_is_still_read(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _fit(tmp_path, out) == 0
    summary = rundir.load_run(out).summary
    (out / rundir.SUMMARY).write_text(json.dumps(summary))  # Python's default: NaN
    assert "NaN" in (out / rundir.SUMMARY).read_text()
    assert math.isnan(rundir.load_run(out).summary["auc"]["per_fold"][0])
    assert _fit(tmp_path, out) == 0
