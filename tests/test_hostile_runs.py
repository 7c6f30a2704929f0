"""Run folders a kill, a full disk, a hand edit or a second process could leave half-made or
mixed: `fit` resumes or refuses, readers refuse with one line, nothing a user made is replaced.

Each case reproduces an item of issues 10 and 13 on a tiny synthetic cohort; kills happen in a
subprocess that SIGKILLs itself at a fixed training step (no timing involved).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from melanoma_mil import rundir
from melanoma_mil.cli import main
from melanoma_mil.config import FitConfig, load_config
from melanoma_mil.data.bags import read_attrs
from melanoma_mil.data.synthetic import make_bag_cohort
from melanoma_mil.errors import UserError
from melanoma_mil.locks import try_lock
from melanoma_mil.outdir import MARKER
from melanoma_mil.training.cv import run_fit

SETTINGS = [
    "cv.folds=3",
    "trainer.max_epochs=2",
    "trainer.min_epochs=2",
    "trainer.accelerator=cpu",
    "model.hidden_dim=16",
    "model.attention_dim=8",
    "optim.lr=1e-3",
    "logger=none",
]
# Runs `fit` and sends the process KILL_SIGNAL (SIGKILL; SIGINT is a Ctrl-C) in split KILL_SPLIT
# at the start of its second epoch.
KILLER = """
import os, signal, sys
from melanoma_mil.cli import main
from melanoma_mil.training import cv, module
kill_split, state = int(os.environ["KILL_SPLIT"]), {}
sig = getattr(signal, os.environ["KILL_SIGNAL"])
if sig == signal.SIGINT:  # as a terminal's foreground job has it: a job started with & (a CI
    signal.signal(signal.SIGINT, signal.default_int_handler)  # runner) inherits SIGINT ignored
run_fold, step = cv._run_fold, module.MILModule.training_step
def tracked(cfg, cohort, store, split, *args):
    state["split"] = split.fold
    return run_fold(cfg, cohort, store, split, *args)
def killing(self, batch, i):
    if state.get("split") == kill_split and self.current_epoch == 1:
        os.kill(os.getpid(), sig)
    return step(self, batch, i)
cv._run_fold, module.MILModule.training_step = tracked, killing
sys.exit(main(sys.argv[1:]))
"""


def args(cohort: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    features, labels = cohort
    return [
        "fit",
        f"data.features_dir={features}",
        f"data.labels_csv={labels}",
        f"output_dir={out}",
        *SETTINGS,
        *extra,
    ]


def fit(cohort: tuple[Path, Path], out: Path, *extra: str) -> int:
    return run_fit(load_config(FitConfig, [], args(cohort, out, *extra)[1:]))


def spawn(
    argv: list[str], tmp: Path, kill_split: int | None = None, sig: str = "SIGKILL"
) -> subprocess.Popen:
    """`fit` in a fresh process (one that sends itself ``sig`` in split ``kill_split``)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "KILL_SPLIT": str(kill_split)}
    env["KILL_SIGNAL"] = sig
    if kill_split is None:
        cmd = [sys.executable, "-m", "melanoma_mil", *argv]
    else:
        (tmp / "killer.py").write_text(KILLER)
        cmd = [sys.executable, str(tmp / "killer.py"), *argv]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: (sha256, mtime_ns)."""
    return {
        str(p.relative_to(folder)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_bag_cohort(tmp_path_factory.mktemp("cohort"), n_patients=12, dim=8, shift=4.0)


@pytest.fixture(scope="module")
def serial(cohort: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted reference run (read-only: tests copy it)."""
    out = tmp_path_factory.mktemp("serial") / "run"
    assert fit(cohort, out) == 0
    return out


def copy_run(serial: Path, dst: Path) -> Path:
    shutil.copytree(serial, dst)
    return dst


# --------------------------------------------------------------------------- issue 13: 2, 3
def test_fit_killed_in_fold_2_resumes_byte_identical(cohort, serial, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    proc = spawn(args(cohort, out), tmp_path, kill_split=2)
    assert proc.wait(timeout=600) == -9, proc.stderr.read().decode()[-2000:]
    assert not (out / rundir.SUMMARY).exists() and not (out / rundir.FOLDS / "fold_2").exists()
    kept = {k: snapshot(out / rundir.FOLDS / k) for k in ("fold_0", "fold_1")}
    # readers refuse the half-made run, naming what is missing
    one_line_error(capsys, ["compare", str(out), str(serial)], "fold_2 missing")
    assert fit(cohort, out) == 0  # the same command resumes
    for name in ("fold_0", "fold_1"):
        assert snapshot(out / rundir.FOLDS / name) == kept[name]  # not retrained
    for name in (rundir.PREDICTIONS, rundir.SUMMARY):
        assert (out / name).read_bytes() == (serial / name).read_bytes()
    assert sorted(p.name for p in (out / rundir.FOLDS).iterdir()) == ["fold_0", "fold_1", "fold_2"]


def test_fold_parallel_processes_equal_a_serial_run(cohort, serial, tmp_path) -> None:
    out = tmp_path / "run"
    procs = [spawn(args(cohort, out, f"cv.run_folds={f}"), tmp_path) for f in ("[0]", "[1,2]")]
    for proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-2000:]
    stamp = (out / rundir.SUMMARY).stat().st_mtime_ns  # the last process to finish wrote it
    assert fit(cohort, out) == 0  # a plain fit afterwards: nothing left to do
    assert (out / rundir.SUMMARY).stat().st_mtime_ns == stamp
    for name in (rundir.PREDICTIONS, rundir.SUMMARY, rundir.SPLITS):
        assert (out / name).read_bytes() == (serial / name).read_bytes(), name
    assert rundir.load_run(out).fold_names() == ["fold_0", "fold_1", "fold_2"]
    assert not [p for p in (out / rundir.FOLDS).iterdir() if p.name.startswith(".")]


def test_run_folds_out_of_range_refused_before_work(cohort, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    one_line_error(capsys, args(cohort, out, "cv.run_folds=[3]"), "3 splits", "0-2")
    one_line_error(capsys, args(cohort, out, "cv.run_folds=[0]", "overwrite=true"), "run_folds")
    assert not out.exists()


def test_run_folds_repeats_and_other_settings(cohort, serial, tmp_path, capsys, caplog) -> None:
    """A fold named twice is trained once, by this process (not 'left to another process'); a
    fold process meeting a run made otherwise is told what works (not overwrite=true)."""
    out = copy_run(serial, tmp_path / "run")
    shutil.rmtree(out / rundir.FOLDS / "fold_1")
    (out / rundir.SUMMARY).unlink()
    caplog.set_level(logging.INFO, logger="melanoma_mil")
    assert fit(cohort, out, "cv.run_folds=[1,1]") == 0
    assert "another process" not in caplog.text and (out / rundir.SUMMARY).is_file()
    capsys.readouterr()
    for other in ("seed=5", "cv.seed=5"):  # other settings; other splits
        assert main(args(cohort, out, "cv.run_folds=[1]", other)) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert "made" in line and "remove that run" in line and "never replaces" in line, line
        assert "overwrite=true" not in line


# --------------------------------------------------------------------------- issue 10: 4
def test_ctrl_c_exits_130_and_says_how_to_resume(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    """Lightning ends a Ctrl-C with exit(1), the code of a failure; fit says it was interrupted
    and how to go on."""
    out = tmp_path / "run"
    proc = spawn(args(cohort, out), tmp_path, kill_split=0, sig="SIGINT")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert "interrupted: re-run the same command: it resumes at the first unfinished fold" in (
        err.decode()
    )
    assert not (out / rundir.SUMMARY).exists()


def test_killed_overwrite_keeps_the_old_complete_run(cohort, serial, tmp_path, caplog) -> None:
    out = copy_run(serial, tmp_path / "run")
    (out / "NOTES.txt").write_text("why this run")
    before = snapshot(out)
    proc = spawn(args(cohort, out, "overwrite=true", "seed=1"), tmp_path, kill_split=1)
    assert proc.wait(timeout=600) == -9, proc.stderr.read().decode()[-2000:]
    assert snapshot(out) == before  # the old run, whole and untouched
    assert rundir.load_run(out).config.seed == 0
    leftover = tmp_path / ".run.fit-new"
    assert (leftover / rundir.FOLDS / "fold_0" / rundir.DONE).is_file()
    kept = snapshot(leftover / rundir.FOLDS / "fold_0")
    caplog.set_level(logging.INFO, logger="melanoma_mil")
    assert fit(cohort, out, "overwrite=true", "seed=1") == 0  # resumes the replacement
    assert f"resuming the replacement of {out} (1 fold(s) already finished)" in caplog.text
    run = rundir.load_run(out)
    assert run.config.seed == 1 and run.fold_names() == ["fold_0", "fold_1", "fold_2"]
    assert snapshot(out / rundir.FOLDS / "fold_0") == kept
    assert (out / "NOTES.txt").read_text() == "why this run"  # carried over once replaced
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "killer.py") == ["run"]


def test_leftover_of_a_crashed_replacement_is_cleaned_by_the_next_fit(
    cohort, serial, tmp_path
) -> None:
    out = copy_run(serial, tmp_path / "run")
    copy_run(serial, tmp_path / ".run.fit-new")  # as a killed `fit overwrite=true` leaves it
    copy_run(serial, tmp_path / ".run.fit-old")  # as a kill after the swap leaves it
    user = tmp_path / ".run.notes"
    user.write_text("mine")
    (tmp_path / ".run.fit-new.drop-123" / "folds").mkdir(parents=True)  # a delete killed midway
    assert fit(cohort, out) == 0  # complete, same settings: nothing to train
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.notes", "run"]
    # a crash between the two renames of a swap without RENAME_EXCHANGE
    (tmp_path / "run").rename(tmp_path / ".run.fit-old")
    assert fit(cohort, out) == 0
    assert rundir.load_run(out).run_id and not (tmp_path / ".run.fit-old").exists()


def test_a_complete_replacement_a_crash_left_unswapped_is_swapped_in(
    cohort, serial, tmp_path
) -> None:
    out = copy_run(serial, tmp_path / "run")
    assert fit(cohort, tmp_path / "b", "seed=1") == 0
    (tmp_path / "b").rename(tmp_path / ".run.fit-new")  # results written, then killed
    kept = snapshot(tmp_path / ".run.fit-new")
    assert fit(cohort, out, "seed=1") == 0  # the replacement asked for, not deleted
    assert rundir.load_run(out).config.seed == 1 and snapshot(out) == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    shutil.rmtree(out)  # the run it was to replace, removed by the user since
    copy_run(serial, tmp_path / ".run.fit-new")
    kept = snapshot(tmp_path / ".run.fit-new")
    assert fit(cohort, out) == 0  # it is the run now: kept, not deleted
    assert snapshot(out) == kept and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_removing_an_unfinished_replacement_is_said(cohort, serial, tmp_path, caplog) -> None:
    out = copy_run(serial, tmp_path / "run")
    leftover = copy_run(serial, tmp_path / ".run.fit-new")  # killed after fold_0 and fold_2
    for name in (rundir.SUMMARY, rundir.PREDICTIONS):
        (leftover / name).unlink()
    shutil.rmtree(leftover / rundir.FOLDS / "fold_1")
    caplog.set_level(logging.WARNING, logger="melanoma_mil")
    assert fit(cohort, out) == 0
    assert f"removed the unfinished replacement of '{out}' (finished: fold_0, fold_2)" in (
        caplog.text
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_run_a_process_still_trains_is_not_replaced_under_it(
    cohort, serial, tmp_path, capsys, caplog
) -> None:
    """While a process trains a fold of a run (it holds the fold's lock), `overwrite=true` is
    refused and a complete replacement waits: swapped in, that process would write its fold
    into the new run."""
    out = copy_run(serial, tmp_path / "run")
    before = snapshot(out)
    training = try_lock(rundir.fold_lock(out, "fold_1"))  # as a live `fit` process holds it
    one_line_error(capsys, args(cohort, out, "overwrite=true", "seed=1"), "fold_1", "right now")
    assert fit(cohort, tmp_path / "b", "seed=1") == 0
    (tmp_path / "b").rename(tmp_path / ".run.fit-new")  # complete, left unswapped by a crash
    caplog.set_level(logging.WARNING, logger="melanoma_mil")
    assert fit(cohort, out, "cv.run_folds=[1]") == 0  # the old run's fold 1: left to its process
    assert "fold_1 of the run there is still being trained" in caplog.text
    assert snapshot(out) == before and (tmp_path / ".run.fit-new").is_dir()
    training.release()
    assert fit(cohort, out, "seed=1") == 0  # now swapped in
    assert rundir.load_run(out).config.seed == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_fold_is_never_committed_into_a_run_that_replaced_its_own(serial, tmp_path) -> None:
    run = copy_run(serial, tmp_path / "run")
    fold = run / rundir.FOLDS / "fold_0"
    before = snapshot(fold)
    partial = rundir.partial_dir(run, "fold_0")
    shutil.copytree(fold, partial)
    preds = pd.read_csv(fold / rundir.PREDICTIONS)
    with pytest.raises(UserError, match="replaced by another run while this process trained"):
        rundir.commit_fold(run, "fold_0", partial, preds, {"run_id": "the replaced run"})
    assert snapshot(fold) == before


# --------------------------------------------------------------------------- issue 14
def add_user_entries(run: Path) -> dict[str, tuple[str, int]]:
    """What a user adds to a run folder (notes, a folder of their own, a hidden folder); their
    files' snapshot."""
    (run / "NOTES.txt").write_text("why this run")
    (run / "my_eval").mkdir()
    (run / "my_eval" / "keep.txt").write_text("mine")
    (run / ".ipynb_checkpoints").mkdir()
    return {k: v for k, v in snapshot(run).items() if k.startswith(("NOTES", "my_eval"))}


def logged(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and "fit: " in r.message]


def test_overwrite_replaces_the_run_and_keeps_what_the_user_added(
    cohort, serial, tmp_path, caplog
) -> None:
    out = copy_run(serial, tmp_path / "run")
    other = tmp_path / "other"
    assert fit(cohort, other, "seed=4") == 0
    assert main(["compare", str(out), str(other), f"output_dir={out / 'cmp'}"]) == 0
    mine = {**add_user_entries(out), **{f"cmp/{k}": v for k, v in snapshot(out / "cmp").items()}}
    (out / ".predictions.csv.k3j4h5g6.tmp").write_text("x")  # the run's: an interrupted write
    (out / "report.html").write_text("old")  # the run's: its report (clinical_csv)
    caplog.set_level(logging.INFO, logger="melanoma_mil")
    assert fit(cohort, out, "overwrite=true", "seed=1") == 0
    assert rundir.load_run(out).config.seed == 1
    now = snapshot(out)
    assert {k: now[k] for k in mine if k in now} == mine  # same bytes, same mtime
    assert (out / ".ipynb_checkpoints").is_dir()
    assert not (out / "report.html").exists() and not list(out.glob(".predictions*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "run"]
    assert logged(caplog, logging.WARNING) == []
    [kept] = [m for m in logged(caplog, logging.INFO) if "kept" in m]
    assert kept.endswith(": .ipynb_checkpoints/, NOTES.txt, cmp/, my_eval/"), kept


def test_a_crash_after_the_swap_still_carries_the_users_entries_over(
    cohort, serial, tmp_path, caplog
) -> None:
    """Killed between the swap and the carry: the next `fit` finishes the carry. An entry the
    new run folder also has is never overwritten: the old folder is kept, visible, and said."""
    out = tmp_path / "run"
    assert fit(cohort, out, "seed=1") == 0  # the new run, swapped in
    old = copy_run(serial, tmp_path / ".run.fit-old")  # the replaced run, not yet retired
    mine = add_user_entries(old)
    (out / "NOTES.txt").write_text("about the new run")  # written since
    caplog.set_level(logging.INFO, logger="melanoma_mil")
    assert fit(cohort, out, "seed=1") == 0  # complete: nothing to train
    assert snapshot(out / "my_eval") == {"keep.txt": mine["my_eval/keep.txt"]}
    assert (out / "NOTES.txt").read_text() == "about the new run"
    aside = tmp_path / f"run.replaced-{rundir.load_run(serial).run_id[:8]}"
    assert (aside / "NOTES.txt").read_text() == "why this run"
    assert rundir.load_run(aside).config.seed == 0  # the old run, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", aside.name]
    [warning] = logged(caplog, logging.WARNING)
    assert "NOTES.txt" in warning and str(aside) in warning, warning
    assert fit(cohort, out, "seed=1") == 0  # a later fit leaves it alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", aside.name]


def test_a_kill_right_after_the_exchange_keeps_the_new_run(cohort, serial, tmp_path) -> None:
    """The atomic exchange puts the new run in place and the replaced one in `.run.fit-new`,
    which a rename then moves to `.run.fit-old`. Killed between the two, the next `fit` must
    not take the replaced run for a complete replacement and swap it back in."""
    out = tmp_path / "run"
    assert fit(cohort, out, "seed=1") == 0  # the new run, just exchanged in
    (out / rundir.REPLACE_LOCK).touch()  # held by the replacement until the very end
    copy_run(serial, tmp_path / ".run.fit-new")  # the replaced run, where the exchange left it
    new_id = rundir.load_run(out).run_id
    assert fit(cohort, out, "seed=1") == 0  # complete: nothing to train
    assert rundir.load_run(out).run_id == new_id and rundir.load_run(out).config.seed == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_lock_a_crash_left_in_a_run_never_swaps_an_old_run_back(cohort, serial, tmp_path) -> None:
    """Killed after the swap but before its lock was removed, a replacement leaves the lock in
    the run. Once recovered, the lock must be gone: else, when that run is replaced in turn and
    the next kill comes right after the exchange, it reads as a replacement and is swapped back
    over the newer run."""
    out = tmp_path / "run"
    assert fit(cohort, out, "seed=1") == 0  # B, just swapped in
    (out / rundir.REPLACE_LOCK).touch()  # the kill left its lock behind
    copy_run(serial, tmp_path / ".run.fit-old")  # A, not yet retired
    assert fit(cohort, out, "seed=1") == 0  # recovers: A retired
    assert not (out / rundir.REPLACE_LOCK).exists()
    assert fit(cohort, tmp_path / "c", "seed=2") == 0  # C replaces B, killed after the exchange:
    out.rename(tmp_path / ".run.fit-new")  # B where the exchange put it
    (tmp_path / "c").rename(out)
    (out / rundir.REPLACE_LOCK).touch()  # C was built holding the lock
    new_id = rundir.load_run(out).run_id
    assert fit(cohort, out, "seed=2") == 0
    assert rundir.load_run(out).run_id == new_id and rundir.load_run(out).config.seed == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_fit_refuses_a_run_whose_folds_folder_is_a_link(cohort, serial, tmp_path) -> None:
    out = copy_run(serial, tmp_path / "run")
    shutil.move(out / "folds", tmp_path / "elsewhere")
    (out / "folds").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="folds' is a link"):
        fit(cohort, out)
    shutil.move(tmp_path / "elsewhere", tmp_path / "x")
    (out / "folds").unlink()
    shutil.move(tmp_path / "x", out / "folds")
    (out / "wandb").symlink_to(tmp_path, target_is_directory=True)  # logger=none: not written
    assert fit(cohort, out) == 0
    assert fit(cohort, out, "overwrite=true", "seed=1") == 0  # built apart, then swapped in


@pytest.mark.parametrize("target", ["a fold of the user's", "gone"])
def test_a_linked_fold_that_is_retrained_replaces_the_link_only(
    cohort, serial, tmp_path, target: str
) -> None:
    """folds/fold_0 a link (to a copy kept elsewhere, or dangling): the fold is not this run's,
    so it is retrained; committing it ended in a traceback after the training (rmtree refuses a
    link; a folder is not renamed onto one). The link goes, never what it points to."""
    out = copy_run(serial, tmp_path / "run")
    mine = tmp_path / "mine"
    shutil.move(out / "folds" / "fold_0", mine)
    (mine / "done.json").write_text("{}")  # another run's, or damaged
    kept = {p.name: p.read_bytes() for p in mine.iterdir()}
    if target == "gone":
        shutil.rmtree(mine)
    (out / "folds" / "fold_0").symlink_to(mine, target_is_directory=True)
    assert fit(cohort, out) == 0
    fold = out / "folds" / "fold_0"
    assert fold.is_dir() and not fold.is_symlink() and (fold / "done.json").stat().st_size > 2
    assert not list((out / "folds").glob(".fold_0.stale-*"))
    if target != "gone":
        assert {p.name: p.read_bytes() for p in mine.iterdir()} == kept


def test_no_command_writes_into_a_runs_own_entries(cohort, serial, tmp_path, capsys) -> None:
    """Those are replaced with the run; a folder of its own inside the run folder is fine."""
    out = copy_run(serial, tmp_path / "run")
    before = snapshot(out)
    preds = out / rundir.PREDICTIONS
    one_line_error(capsys, ["compare", str(serial), str(out), f"output_dir={out / 'folds/c'}"],
                   "inside 'folds' of the `fit` run", "choose a folder of its own")  # fmt: skip
    one_line_error(capsys, ["evaluate", f"predictions={preds}", f"output_dir={out / 'logs'}"],
                   "inside 'logs'")  # fmt: skip
    argv = ["predict", f"run_dir={serial}", f"slides_dir={tmp_path}", f"output_dir={out / 'wandb'}"]
    one_line_error(capsys, argv, "inside 'wandb'")
    one_line_error(capsys, args(cohort, out / "folds" / "x"), "inside 'folds'")
    assert snapshot(out) == before and not (out / "wandb").exists()


def test_incomplete_stale_mixed_or_damaged_runs_are_refused(serial, tmp_path, capsys) -> None:
    def broken(name: str) -> Path:
        return copy_run(serial, tmp_path / name)

    cases = []
    run = broken("deleted")
    shutil.rmtree(run / rundir.FOLDS / "fold_1")
    cases.append((run, "fold_1 missing"))
    run = broken("stale")  # as left by a run with more folds
    shutil.copytree(run / rundir.FOLDS / "fold_0", run / rundir.FOLDS / "fold_3")
    cases.append((run, "folds/fold_3 is not in splits.json (delete it)"))
    run = broken("mixed")
    done = run / rundir.FOLDS / "fold_2" / rundir.DONE
    done.write_text(done.read_text().replace(rundir.load_run(serial).run_id, "0" * 32))
    cases.append((run, "fold_2 made by another run"))
    run = broken("truncated")
    model = run / rundir.FOLDS / "fold_1" / rundir.MODEL
    model.write_bytes(model.read_bytes()[:100])
    cases.append((run, "fold_1 damaged (model.pt"))
    run = broken("provenance")
    (run / rundir.PROVENANCE).write_text('{"classes": [')
    cases.append((run, "provenance.json is unreadable"))
    run = broken("edited")
    (run / rundir.CONFIG).write_text(
        (run / rundir.CONFIG).read_text().replace("hidden_dim: 16", "hidden_dim: 32")
    )
    cases.append((run, "model.hidden_dim"))
    for run, needle in cases:
        with pytest.raises(UserError, match=r"\w"):
            rundir.load_run(run)
        one_line_error(
            capsys, ["compare", str(run), str(serial), f"output_dir={tmp_path / 'c'}"], needle
        )
        argv = [
            "predict",
            f"run_dir={run}",
            f"slides_dir={tmp_path}",
            f"output_dir={tmp_path / 'p'}",
        ]
        one_line_error(capsys, argv, needle)
        one_line_error(capsys, ["heatmap", *argv[1:3], f"output_dir={tmp_path / 'h'}"], needle)
    assert not any((tmp_path / d).exists() for d in ("c", "p", "h"))


def test_a_run_recorded_before_a_key_was_renamed_still_loads(serial, tmp_path) -> None:
    """A run made by an earlier version (trainer.average_epochs, no average_fraction) stays
    readable by predict, heatmap and compare; a user who passes the old key is told its new name."""
    run = copy_run(serial, tmp_path / "old")
    config = run / rundir.CONFIG
    config.write_text(config.read_text().replace("average_fraction: 0.5", "average_epochs: 25"))
    marker = run / MARKER
    record = json.loads(marker.read_text())
    kept = record["settings"]
    kept["trainer.average_epochs"] = kept.pop("trainer.average_fraction")
    marker.write_text(json.dumps(record))
    assert rundir.load_run(run).fold_names() == rundir.load_run(serial).fold_names()
    with pytest.raises(UserError, match="replaced by trainer.average_fraction"):
        load_config(FitConfig, [], ["trainer.average_epochs=25"])


def test_compare_the_same_run_twice_is_refused(serial, tmp_path, capsys) -> None:
    one_line_error(capsys, ["compare", str(serial), str(serial)], "same run twice")
    copy = copy_run(serial, tmp_path / "copy")
    one_line_error(capsys, ["compare", str(serial), str(copy)], "same run twice")


def test_refit_with_other_settings_refused_fewer_folds_leave_no_stale_fold(
    cohort, serial, tmp_path, capsys
) -> None:
    out = copy_run(serial, tmp_path / "run")
    before = snapshot(out)
    one_line_error(capsys, args(cohort, out, "cv.folds=2"), "cv.folds: 3 in splits.json, 2 now")
    one_line_error(capsys, args(cohort, out, "model.dropout=0.5"), "model.dropout: 0.25")
    assert snapshot(out) == before
    assert fit(cohort, out, "cv.folds=2", "overwrite=true") == 0
    assert rundir.load_run(out).fold_names() == ["fold_0", "fold_1"]
    assert sorted(p.name for p in (out / rundir.FOLDS).iterdir()) == ["fold_0", "fold_1"]
    assert sorted(pd.read_csv(out / rundir.PREDICTIONS)["fold"].unique()) == [0, 1]


# --------------------------------------------------------------------------- issue 10: 5
def test_failed_validation_writes_nothing_and_stale_splits_are_refused(
    cohort, serial, tmp_path, capsys
) -> None:
    one_line_error(capsys, args(cohort, tmp_path / "a", "cv.folds=7"), "fewer than cv.folds=7")
    assert not (tmp_path / "a").exists()
    # a later cohort with two more labelled slides
    features, labels = cohort
    grown = tmp_path / "grown"
    shutil.copytree(features, grown / "features")
    table = pd.read_csv(labels)
    for i, src in ((90, "P0000"), (91, "P0001")):
        shutil.copy(features / f"{src}.h5", grown / "features" / f"P{i:04d}.h5")
        row = table[table["slide_id"] == src].assign(slide_id=f"P{i:04d}", patient_id=f"P{i:04d}")
        table = pd.concat([table, row])
    table.to_csv(grown / "labels.csv", index=False)
    bigger = (grown / "features", grown / "labels.csv")
    out = copy_run(serial, tmp_path / "run")
    before = snapshot(out)
    one_line_error(capsys, args(bigger, out), "2 labelled bag(s) in no split", "P0090")
    assert snapshot(out) == before
    splits = serial / rundir.SPLITS
    one_line_error(
        capsys,
        args(bigger, tmp_path / "b", f"cv.splits_file={splits}"),
        "2 labelled bag(s)",
        "P0090",
    )
    assert not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- issue 10: 7
def test_output_folders_are_not_shared_between_commands(cohort, serial, tmp_path, capsys) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("draft")
    for extra in ([], ["overwrite=true"]):
        one_line_error(capsys, args(cohort, mine, *extra), "not empty", "choose another output_dir")
    assert [p.name for p in mine.iterdir()] == ["thesis.txt"]
    cmp = tmp_path / "cmp"
    a, b = serial, tmp_path / "other"
    assert fit(cohort, b, "seed=4") == 0
    assert main(["compare", str(a), str(b), f"output_dir={cmp}"]) == 0
    one_line_error(capsys, args(cohort, cmp), "`compare`")
    one_line_error(capsys, ["compare", str(a), str(b), f"output_dir={serial}"], "`fit`")
    argv = ["predict", f"run_dir={serial}", f"slides_dir={tmp_path}", f"output_dir={cmp}"]
    one_line_error(capsys, argv, "`compare`")
    assert json.loads((cmp / ".melanoma-mil.json").read_text()) == {"command": "compare"}


# --------------------------------------------------------------------------- issue 10: 9
def test_disk_full_during_fit_leaves_no_partial_file(cohort, tmp_path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)])
    if mounted.returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        out = disk / "run"
        with pytest.raises(OSError):
            fit(cohort, out, "model.hidden_dim=512")  # best.ckpt / model.pt do not fit
        leftovers = [p for p in out.rglob("*") if p.is_file() and ".tmp" in p.name]
        assert not leftovers and not list((out / rundir.FOLDS).glob(".*.partial"))
        assert not list((out / rundir.FOLDS).glob("fold_*"))
        with pytest.raises(UserError, match="fold_0 missing"):
            rundir.load_run(out)
    finally:
        busy = subprocess.run(["umount", str(disk)]).returncode
        if busy:
            subprocess.run(["umount", "-l", str(disk)], check=True)
    assert not busy, "fit left files open on the full disk"


def test_heatmap_and_predict_keep_to_their_own_folders_and_runs(
    pipe, cohort, tmp_path, capsys
) -> None:
    common = [
        f"features_dir={pipe.features}",
        f"slides_dir={pipe.slides}",
        "slide_ids=[slide_000]",
        "device=cpu",
        "thumbnail_size=256",
        "top_k=2",
    ]

    def heatmap(run: Path, out: Path, *extra: str) -> list[str]:
        return ["heatmap", f"run_dir={run}", f"output_dir={out}", *common, *extra]

    pred = tmp_path / "pred"
    assert (
        main(
            ["predict", f"run_dir={pipe.run_dir}", f"output_dir={pred}", "heatmaps=false", *common]
        )
        == 0
    )
    before = snapshot(pred)
    one_line_error(capsys, heatmap(pipe.run_dir, pred), "`predict`", "choose another output_dir")
    one_line_error(capsys, args(cohort, pred), "`predict`")
    assert snapshot(pred) == before
    other = tmp_path / "other"  # a second run on the same features
    labels = pipe.root / "cohort" / "labels.csv"
    assert fit((pipe.features, labels), other, "cv.folds=2", "trainer.max_epochs=1") == 0
    run_a, run_b = rundir.load_run(pipe.run_dir).run_id, rundir.load_run(other).run_id
    hm_a, hm_b = tmp_path / "hm_a", tmp_path / "hm_b"
    assert main(heatmap(pipe.run_dir, hm_a)) == 0
    one_line_error(capsys, heatmap(other, hm_a), "for run", "overwrite=true")
    assert main(heatmap(other, hm_b)) == 0
    attention = Path("slide_000") / "attention.h5"
    assert read_attrs(hm_b / attention)["run_id"] == run_b
    shutil.rmtree(hm_a / "slide_000")  # another run's slide in run A's folder: never resumed from
    shutil.copytree(hm_b / "slide_000", hm_a / "slide_000")
    assert main(heatmap(pipe.run_dir, hm_a)) == 0
    assert pd.read_csv(hm_a / "heatmaps.csv")["status"].tolist() == ["ok"]
    assert read_attrs(hm_a / attention)["run_id"] == run_a
    assert main(heatmap(pipe.run_dir, hm_a)) == 0  # its own slides are resumed
    assert pd.read_csv(hm_a / "heatmaps.csv")["status"].tolist() == ["skipped"]
