"""`sweep` processes killed (SIGKILL) mid-sweep: what the next process, or a plain re-run, keeps
of their work."""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
from test_sweep_resume import cohort, ledger, sweep_file, sweep_process, two_seed_sweep, waits_on

from melanoma_mil.cli import main
from melanoma_mil.evaluation.sweep import REPORT_LOCK
from melanoma_mil.locks import try_lock
from melanoma_mil.outdir import MARKER
from melanoma_mil.rundir import DONE, FOLDS, staging


def finished_folds(run: Path) -> dict[str, int]:
    """fold -> mtime of its done.json."""
    return {p.parent.name: p.stat().st_mtime_ns for p in run.glob(f"{FOLDS}/fold_*/{DONE}")}


@pytest.mark.parametrize("earlier", [False, True], ids=["new-folder", "earlier-sweeps-run"])
def test_a_run_taken_over_in_a_sweep_with_overwrite_resumes_its_finished_folds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, earlier: bool
) -> None:
    """With overwrite=true, a task of an array taking over the run of a task killed mid-run
    passed overwrite=true on to its fit too, which trained the whole run again, its finished
    folds included. Only a run's first start replaces what its folder held (an earlier sweep's
    run); a takeover resumes the folds finished, in the folder or in the replacement."""
    features, labels = cohort(tmp_path / "coh")
    grid = sweep_file(tmp_path, {"method": "grid", "parameters": {"seed": {"values": [0]}}})
    out = tmp_path / "out"
    run = out / "000_seed-0"
    data = [f"data.features_dir={features}", f"data.labels_csv={labels}", "logger=none"]
    argv = ["sweep", str(grid), f"output_dir={out}", "cv.folds=3", "trainer.max_epochs=3", *data]
    if earlier:
        assert main([*argv, "optim.lr=0.001"]) == 0
    replaced = json.loads((run / MARKER).read_text())["run_id"] if earlier else None
    built = staging(run)[0] if earlier else run  # where the sweep's fit trains the run
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "9")  # both tasks of one array job
    task = sweep_process([*argv, "overwrite=true"])
    try:
        deadline = time.monotonic() + 300
        while not finished_folds(built):
            assert task.poll() is None and time.monotonic() < deadline, task.communicate()
            time.sleep(0.02)
    finally:
        task.send_signal(signal.SIGKILL)
        task.communicate()
    done = finished_folds(built)
    assert len(done) < 3 and ledger(out)[0]["state"] == "running"
    caplog.set_level(logging.INFO, logger="melanoma_mil")
    assert main([*argv, "overwrite=true"]) == 0
    assert [r["state"] for r in ledger(out)] == ["finished"]
    assert {k: (run / FOLDS / k / DONE).stat().st_mtime_ns for k in done} == done
    assert f"training {3 - len(done)} of 3 splits" in caplog.text
    assert json.loads((run / MARKER).read_text())["run_id"] != replaced


def test_a_plain_rerun_after_the_last_process_was_killed_reports_without_training(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The last `sweep` process killed after its last run, before its report (it waits here on
    the report's lock, held by the test): a plain re-run writes sweep_results.csv and the
    comparison of every run and trains none of them again."""
    argv, out, _ = two_seed_sweep(tmp_path)
    out.mkdir()
    reporting = try_lock(out / REPORT_LOCK)
    assert reporting is not None
    task = sweep_process(argv)
    try:
        deadline = time.monotonic() + 300
        while not waits_on(out / REPORT_LOCK):
            assert task.poll() is None and time.monotonic() < deadline, task.communicate()
            time.sleep(0.05)
    finally:
        task.send_signal(signal.SIGKILL)
        task.communicate()
        reporting.release()
    assert [r["state"] for r in ledger(out)] == ["finished", "finished"]
    assert not (out / "sweep_results.csv").exists()
    summaries = {p: p.stat().st_mtime_ns for p in out.glob("0*/cv_summary.json")}
    caplog.set_level(logging.INFO, logger="melanoma_mil")
    assert main(argv) == 0
    assert "sweep run " not in caplog.text  # no fit started
    assert {p: p.stat().st_mtime_ns for p in summaries} == summaries and len(summaries) == 2
    assert sorted(pd.read_csv(out / "sweep_results.csv")["run"]) == ["000_seed-0", "001_seed-1"]
    assert sorted(pd.read_csv(out / "comparison" / "comparison.csv")["run"]) == sorted(
        p.parent.name for p in summaries
    )
