"""What a `fit` killed while writing leaves in its run folder (the files' temp names, a fold moved
aside while committed) is removed by the `fit` that finishes the run. The kills are made
deterministic by leaving the files such a kill leaves (see `io.atomic_path`, `rundir.commit_fold`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from melanoma_mil import rundir
from melanoma_mil.config import FitConfig, load_config
from melanoma_mil.data.synthetic import make_bag_cohort
from melanoma_mil.fsutil import create_once
from melanoma_mil.training.cv import run_fit


def fit(cohort: tuple[Path, Path], out: Path) -> int:
    keys = [f"data.features_dir={cohort[0]}", f"data.labels_csv={cohort[1]}", f"output_dir={out}"]
    keys += ["cv.folds=2", "trainer.max_epochs=1", "trainer.accelerator=cpu", "logger=none"]
    return run_fit(load_config(FitConfig, [], [*keys, "model.hidden_dim=8"]))


def hidden(run: Path) -> list[str]:
    return sorted(
        str(p.relative_to(run)) for p in run.rglob(".*") if p.name != ".melanoma-mil.json"
    )


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_bag_cohort(tmp_path_factory.mktemp("cohort"), n_patients=12, dim=8, shift=4.0)


def test_a_fit_killed_writing_results_or_committing_a_fold_leaves_nothing(cohort, tmp_path) -> None:
    out = tmp_path / "run"
    assert fit(cohort, out) == 0 and hidden(out) == []
    expected = (out / rundir.SUMMARY).read_bytes()
    # killed writing the results: cv_summary.json never came, temp files of the three did
    (out / rundir.SUMMARY).unlink()
    for name in (rundir.PREDICTIONS, rundir.ROC, rundir.SUMMARY):
        (out / f".{name}.k3j4h5g6.tmp").write_text("half")
    # killed committing fold_1 over a damaged one: moved aside, its trained partial not yet in
    fold = out / rundir.FOLDS / "fold_1"
    fold.rename(out / rundir.FOLDS / ".fold_1.stale-0123abcd")
    shutil.copytree(
        out / rundir.FOLDS / ".fold_1.stale-0123abcd", rundir.partial_dir(out, "fold_1")
    )
    assert fit(cohort, out) == 0
    assert rundir.load_run(out).fold_names() == ["fold_0", "fold_1"]
    assert (out / rundir.SUMMARY).read_bytes() == expected
    assert hidden(out) == []


def test_a_fit_killed_writing_a_file_made_once_leaves_nothing(cohort, tmp_path) -> None:
    out = tmp_path / "run"
    assert fit(cohort, out) == 0
    # killed between writing a file made once (`fsutil.create_once`) and linking it in
    made_once = (rundir.SPLITS, rundir.PROVENANCE, rundir.CONFIG, ".melanoma-mil.json")
    for name in made_once:
        (out / f".{name}.q1w2e3r4.tmp").write_text("half")
    assert fit(cohort, out) == 0  # the run was complete: its rerun finishes nothing, yet cleans
    assert hidden(out) == []
    rundir.load_run(out)


def test_a_file_made_once_is_made_when_the_cleaner_removes_its_temp_file(tmp_path, monkeypatch):
    """A live writer's temp file removed by the finisher, taking it for a killed one's."""
    real_link = os.link
    calls: list[str] = []

    def cleaner_first(src: str, dst: str) -> None:
        if not calls:
            Path(src).unlink()
        calls.append(src)
        real_link(src, dst)

    monkeypatch.setattr(os, "link", cleaner_first)
    assert create_once(tmp_path / "splits.json", b"{}") is True
    assert len(calls) == 2 and (tmp_path / "splits.json").read_bytes() == b"{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["splits.json"]
