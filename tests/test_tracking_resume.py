"""W&B runs of fits that crash, resume, replace or find their run finished (real offline runs)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import wandb
from test_tracking import OfflineRun, fresh_wandb, read_offline_run  # noqa: F401 (a fixture)

from melanoma_mil.cli import main
from melanoma_mil.config import FitConfig, load_config
from melanoma_mil.data.synthetic import make_bag_cohort
from melanoma_mil.tracking import loggers
from melanoma_mil.training.cv import run_fit
from melanoma_mil.training.module import MILModule

pytestmark = pytest.mark.usefixtures("fresh_wandb")


def _args(tmp_path: Path, run_dir: Path, *extra: str) -> list[str]:
    """A 2-fold wandb fit of a tiny synthetic cohort (made once per test)."""
    cohort = tmp_path / "cohort"
    if not (cohort / "labels.csv").is_file():
        make_bag_cohort(cohort, n_patients=12, dim=16, n_instances=(4, 12))
    features = next(p for p in cohort.iterdir() if p.is_dir())
    return [
        f"data.features_dir={features}",
        f"data.labels_csv={cohort / 'labels.csv'}",
        f"output_dir={run_dir}",
        "logger=wandb",
        "cv.folds=2",
        "trainer.max_epochs=2",
        *extra,
    ]


def _cfg(tmp_path: Path, run_dir: Path, *extra: str) -> FitConfig:
    return load_config(FitConfig, dotlist=_args(tmp_path, run_dir, *extra))


def _runs(run_dir: Path) -> list[OfflineRun]:
    """Every offline run under <run_dir>/wandb, in the order they were made."""
    wandb.teardown()
    return [read_offline_run(p) for p in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))]


def _crash_fold_1(monkeypatch: pytest.MonkeyPatch) -> None:
    """fold_1's training raises (as a CUDA OOM would) in the next fit only."""
    step = MILModule.training_step

    def crashing(self: MILModule, batch: object, batch_idx: int) -> object:
        if ".fold_1.partial" in str(self.trainer.default_root_dir):
            monkeypatch.setattr(MILModule, "training_step", step)
            raise RuntimeError("CUDA out of memory (simulated)")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(MILModule, "training_step", crashing)


def test_a_crashed_fold_closes_its_run_and_the_next_fit_logs_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crashed, nxt = tmp_path / "crashed", tmp_path / "next"
    _crash_fold_1(monkeypatch)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_fit(_cfg(tmp_path, crashed))
    assert wandb.run is None  # as a sweep goes on to its next run
    assert run_fit(_cfg(tmp_path, nxt)) == 0
    runs = _runs(nxt)
    assert sorted(r.run.job_type for r in runs) == ["fold_0", "fold_1", "summary"]
    assert {r.run.run_group for r in runs} == {"next"} and all(r.exit_code == 0 for r in runs)
    failed = [r for r in _runs(crashed) if r.run.job_type == "fold_1"]
    assert len(failed) == 1 and failed[0].exit_code == 1
    assert not any("test_auc" in row for row in failed[0].history)


def test_a_fold_never_logs_into_a_run_left_open(tmp_path: Path) -> None:
    stale = wandb.init(mode="offline", dir=str(tmp_path / "other"), project="other", job_type="x")
    run_dir = tmp_path / "run"
    assert run_fit(_cfg(tmp_path, run_dir)) == 0
    runs = _runs(run_dir)
    assert sorted(r.run.job_type for r in runs) == ["fold_0", "fold_1", "summary"]
    assert stale.id not in {r.run.run_id for r in runs}
    (left,) = [
        read_offline_run(p) for p in (tmp_path / "other").glob("wandb/offline-run-*/*.wandb")
    ]
    assert left.run.job_type == "x" and not left.history


def test_a_resumed_fit_keeps_one_wandb_run_per_fold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    _crash_fold_1(monkeypatch)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_fit(_cfg(tmp_path, run_dir))
    wandb.finish(exit_code=1)  # what the crashed process's exit does
    assert run_fit(_cfg(tmp_path, run_dir)) == 0  # resumes at fold_1
    runs = _runs(run_dir)
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == len(runs) == 3
    assert sorted(r.run.job_type for r in runs) == ["fold_0", "fold_1", "summary"]
    assert all(r.exit_code == 0 and r.run.run_group == "run" for r in runs)
    fold_1 = next(r for r in runs if r.run.job_type == "fold_1")
    assert "test_auc" in fold_1.summary


def test_an_invalid_wandb_mode_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WANDB_MODE", "ofline")
    run_dir = tmp_path / "run"
    assert main(["fit", *_args(tmp_path, run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'ofline'" in err and "WANDB_MODE" in err
    assert not run_dir.exists()
    assert main(["fit", *_args(tmp_path, run_dir, "logger=csv")]) == 0  # no W&B, no check


def test_wandb_on_a_finished_run_says_nothing_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    assert run_fit(_cfg(tmp_path, run_dir, "logger=csv")) == 0
    with caplog.at_level(logging.WARNING, logger=loggers.__name__):
        assert run_fit(_cfg(tmp_path, run_dir)) == 0
    (line,) = [r.getMessage() for r in caplog.records if "nothing logged" in r.getMessage()]
    assert str(run_dir) in line and "overwrite=true" in line
    assert not _runs(run_dir)


def test_offline_notice_of_a_replacement_names_the_final_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    assert run_fit(_cfg(tmp_path, run_dir, "logger=none")) == 0
    monkeypatch.setattr(loggers, "_offline_notice_shown", False)
    with caplog.at_level(logging.WARNING, logger=loggers.__name__):
        assert run_fit(_cfg(tmp_path, run_dir, "overwrite=true")) == 0
    (notice,) = [r.getMessage() for r in caplog.records if "wandb sync" in r.getMessage()]
    assert f"wandb sync {run_dir / 'wandb'}/offline-run-*" in notice
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 3
