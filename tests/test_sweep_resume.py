"""Resuming a local sweep: same fixed settings only, failed runs retried, random draws continued,
and inputs every run shares checked before any run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from subprocess import PIPE

import pandas as pd
import pytest
import yaml
from conftest import mounted_tmpfs, one_thread_env

from melanoma_mil.cli import main
from melanoma_mil.data.synthetic import make_bag_cohort
from melanoma_mil.evaluation.sweep import LOCK
from melanoma_mil.evaluation.sweep_ledger import unpaired
from melanoma_mil.locks import shared_lock, try_lock


def cohort(root: Path) -> tuple[Path, Path]:
    """12 patients (P0000..P0011, alternating labels), tiny bags: a 2-fold fit in seconds."""
    return make_bag_cohort(root, n_patients=12, dim=16, n_instances=(4, 10), encoder=root.name)


def sweep_file(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def fast(out: Path) -> list[str]:
    return [f"output_dir={out}", "cv.folds=2", "trainer.max_epochs=2", "logger=none"]


def ledger(out: Path) -> list[dict]:
    return json.loads((out / "sweep.json").read_text())["runs"]


def two_seed_sweep(tmp_path: Path) -> tuple[list[str], Path, list[str]]:
    """A grid sweep over seeds 0 and 1 on a small cohort: its argv, output_dir and data keys."""
    features, labels = cohort(tmp_path / "coh")
    grid = sweep_file(tmp_path, {"method": "grid", "parameters": {"seed": {"values": [0, 1]}}})
    out = tmp_path / "out"
    data = [f"data.features_dir={features}", f"data.labels_csv={labels}"]
    return ["sweep", str(grid), *fast(out), *data], out, data


def test_a_resume_with_other_fixed_settings_is_refused_naming_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    features, labels = cohort(tmp_path / "coh")
    metric = {"name": "cv/auc_mean", "goal": "maximize"}
    spec = {"method": "grid", "metric": metric, "parameters": {"seed": {"values": [0, 1]}}}
    grid = sweep_file(tmp_path, spec)
    out = tmp_path / "out"
    base = ["sweep", str(grid), *fast(out), f"data.features_dir={features}"]
    base.append(f"data.labels_csv={labels}")
    assert main([*base, "--count", "1", "optim.lr=0.01", "model.name=abmil"]) == 0
    before = (out / "sweep.json").read_bytes()
    capsys.readouterr()
    assert main([*base, "optim.lr=0.0001", "model.name=transmil"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "other fixed settings" in err, err
    assert "optim.lr=0.01 (now 0.0001)" in err and "model.name='abmil'" in err, err
    assert (out / "sweep.json").read_bytes() == before
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "000_seed-0",
        "sweep.json",
        "sweep_results.csv",
    ]
    # keys that change no result may differ; the swept key's own fixed value is not compared
    same = [*base, "optim.lr=0.01", "model.name=abmil", "data.num_workers=1", "seed=5"]
    assert main([*same, "--count", "1"]) == 0
    # one column order, whether a run's metrics came from this call or from sweep.json
    header = (out / "sweep_results.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["run", "state", "seed", "cv/auc_mean"], header
    assert header[4:] == sorted(header[4:]) and len(header) > 6, header


def test_a_resumed_random_sweep_continues_the_draws_of_one_invocation(tmp_path: Path) -> None:
    """1 run, then 1 more, draw what `--count 2` draws at once (not the first value again).
    The sampled learning rates are invalid, so each run fails at once, before any training."""
    features, labels = cohort(tmp_path / "coh")
    spec = {
        "method": "random",
        "parameters": {"optim.lr": {"distribution": "normal", "mu": -1.0, "sigma": 0.1}},
    }
    rand = sweep_file(tmp_path, spec)
    fixed = [f"data.features_dir={features}", f"data.labels_csv={labels}", "logger=none"]
    resumed, once = tmp_path / "resumed", tmp_path / "once"
    assert main(["sweep", str(rand), "--count", "1", f"output_dir={resumed}", *fixed]) == 1
    assert main(["sweep", str(rand), "--count", "2", f"output_dir={resumed}", *fixed]) == 1
    assert main(["sweep", str(rand), "--count", "2", f"output_dir={once}", *fixed]) == 1
    drawn = [r["params"]["optim.lr"] for r in ledger(resumed)]
    assert drawn == [r["params"]["optim.lr"] for r in ledger(once)]
    assert len(set(drawn)) == 2


def test_while_no_run_has_finished_the_fixed_settings_may_change(tmp_path: Path) -> None:
    """Changing them may be what fixes the failed runs; nothing finished is mixed with them."""
    features, labels = cohort(tmp_path / "coh")
    spec = {  # a sampled learning rate that is invalid: the run fails before any training
        "method": "random",
        "parameters": {"optim.lr": {"distribution": "normal", "mu": -1.0, "sigma": 0.1}},
    }
    rand = sweep_file(tmp_path, spec)
    out = tmp_path / "out"
    argv = ["sweep", str(rand), "--count", "1", *fast(out), f"data.features_dir={features}"]
    argv.append(f"data.labels_csv={labels}")
    assert main([*argv, "optim.weight_decay=0.0"]) == 1
    assert main([*argv, "optim.weight_decay=0.1"]) == 1  # retried (and failed), not refused
    assert json.loads((out / "sweep.json").read_text())["fixed"]["optim.weight_decay"] == 0.1


def test_failed_runs_are_retried_when_the_sweep_is_resumed(tmp_path: Path) -> None:
    """A run whose feature cache was missing finishes once the cache exists; the finished run
    is kept, and the retried run is paired with it (same splits)."""
    features, labels = cohort(tmp_path / "enc_a")
    later = tmp_path / "enc_b" / "features"  # made after the first invocation
    spec = {
        "method": "grid",
        "parameters": {"data.features_dir": {"values": [str(features), str(later)]}},
    }
    grid = sweep_file(tmp_path, spec)
    out = tmp_path / "out"
    argv = ["sweep", str(grid), *fast(out), f"data.labels_csv={labels}"]
    assert main(argv) == 1
    assert [r["state"] for r in ledger(out)] == ["finished", "failed"]
    first = out / ledger(out)[0]["name"] / "cv_summary.json"
    stamp = first.stat().st_mtime_ns
    cohort(tmp_path / "enc_b")
    assert main(argv) == 0
    runs = ledger(out)
    assert [r["state"] for r in runs] == ["finished", "finished"]
    assert "error" not in runs[1] and runs[0]["splits_sha256"] == runs[1]["splits_sha256"]
    assert first.stat().st_mtime_ns == stamp
    assert (out / "comparison" / "comparison.csv").is_file()


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("data.labels_csv", "nope.csv", "labels CSV 'nope.csv' not found"),
        ("data.features_dir", "nope", "features folder 'nope' not found"),
    ],
)
def test_a_bad_fixed_input_stops_the_sweep_before_any_run(
    tmp_path: Path, key: str, value: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    features, labels = cohort(tmp_path / "coh")
    grid = sweep_file(tmp_path, {"method": "grid", "parameters": {"seed": {"values": [0, 1]}}})
    out = tmp_path / "out"
    inputs = {"data.features_dir": str(features), "data.labels_csv": str(labels), key: value}
    argv = ["sweep", str(grid), *fast(out), *(f"{k}={v}" for k, v in inputs.items())]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and problem in err and "\n" not in err, err
    assert not out.exists()


def test_a_bad_wandb_mode_stops_the_sweep_before_any_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    features, labels = cohort(tmp_path / "coh")
    grid = sweep_file(tmp_path, {"method": "grid", "parameters": {"seed": {"values": [0, 1]}}})
    out = tmp_path / "out"
    monkeypatch.setenv("WANDB_MODE", "ofline")
    inputs = [f"data.features_dir={features}", f"data.labels_csv={labels}", "logger=wandb"]
    assert main(["sweep", str(grid), *fast(out), *inputs]) == 2
    err = capsys.readouterr().err.strip()
    assert "W&B mode 'ofline' from the WANDB_MODE" in err and "\n" not in err, err
    assert not out.exists()


def test_ddp_in_a_local_sweep_is_refused_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The local sweep runs its fits in one process, which Lightning's DDP launcher cannot
    follow past the first fit: refused, pointing to `wandb agent`."""
    features, labels = cohort(tmp_path / "coh")
    grid = sweep_file(tmp_path, {"method": "grid", "parameters": {"seed": {"values": [0, 1]}}})
    out = tmp_path / "out"
    ddp = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
    inputs = [f"data.features_dir={features}", f"data.labels_csv={labels}", *ddp]
    assert main(["sweep", str(grid), *fast(out), *inputs]) == 2
    err = capsys.readouterr().err.strip()
    assert "wandb agent" in err and "\n" not in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    ("fixed", "problem"),
    [
        (["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"], "wandb agent"),
        (["logger=wandb"], "W&B mode 'ofline'"),  # WANDB_MODE=ofline
    ],
)
def test_fixed_keys_are_checked_when_other_keys_of_their_section_are_swept(
    tmp_path: Path,
    fixed: list[str],
    problem: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Sweeping trainer.patience (or wandb.tags) leaves trainer.devices (wandb.mode) fixed: still
    refused before any run, not by every run once its folder exists."""
    monkeypatch.setenv("WANDB_MODE", "ofline")
    features, labels = cohort(tmp_path / "coh")
    params = {"trainer.patience": {"values": [1, 2]}, "wandb.tags": {"values": [["a"], ["b"]]}}
    grid = sweep_file(tmp_path, {"method": "grid", "parameters": params})
    out = tmp_path / "out"
    inputs = [f"data.features_dir={features}", f"data.labels_csv={labels}", *fixed]
    assert main(["sweep", str(grid), *fast(out), *inputs]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and problem in err and "\n" not in err, err
    assert not out.exists()


def test_a_sweep_with_a_reworded_description_resumes_but_other_runs_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    features, labels = cohort(tmp_path / "coh")
    spec = {
        "name": "seeds",
        "description": "first wording",
        "method": "grid",
        "metric": {"name": "cv/auc_mean", "goal": "maximize"},
        "parameters": {"seed": {"values": [0, 1]}},
    }
    out = tmp_path / "out"
    fixed = [*fast(out), f"data.features_dir={features}", f"data.labels_csv={labels}"]
    assert main(["sweep", str(sweep_file(tmp_path, spec)), "--count", "1", *fixed]) == 0
    reworded = spec | {"name": "seeds v2", "description": "second wording"}
    assert main(["sweep", str(sweep_file(tmp_path, reworded)), *fixed]) == 0
    assert [e["state"] for e in ledger(out)] == ["finished", "finished"]
    assert json.loads((out / "sweep.json").read_text())["sweep"]["description"] == "second wording"
    capsys.readouterr()
    other = reworded | {"parameters": {"seed": {"values": [0, 2]}}}
    assert main(["sweep", str(sweep_file(tmp_path, other)), *fixed]) == 2
    assert "belongs to a different sweep" in capsys.readouterr().err


def test_a_sweep_started_anew_leaves_no_comparison_of_the_earlier_runs(tmp_path: Path) -> None:
    """overwrite=true with a sweep of one run kept comparison/ of the two earlier runs beside a
    sweep_results.csv that no longer lists them."""
    features, labels = cohort(tmp_path / "coh")
    metric = {"name": "cv/auc_mean", "goal": "maximize"}
    out = tmp_path / "out"
    inputs = [*fast(out), f"data.features_dir={features}", f"data.labels_csv={labels}"]
    two = {"method": "grid", "metric": metric, "parameters": {"seed": {"values": [0, 1]}}}
    assert main(["sweep", str(sweep_file(tmp_path, two)), *inputs]) == 0
    assert (out / "comparison" / "comparison.md").is_file()
    assert (out / "comparison" / "comparison_settings.csv").is_file()  # seeds 0, 1: one setting
    (out / "comparison" / "notes.txt").write_text("mine")
    one = {"method": "grid", "metric": metric, "parameters": {"seed": {"values": [5]}}}
    assert main(["sweep", str(sweep_file(tmp_path, one)), *inputs, "overwrite=true"]) == 0
    assert [r["name"] for r in ledger(out)] == ["000_seed-5"]
    left = sorted(p.name for p in (out / "comparison").iterdir())
    assert left == [".melanoma-mil.json", "notes.txt"]


def sweep_process(argv: list[str]) -> subprocess.Popen[str]:
    """A `python -m melanoma_mil sweep` process of its own, as each task of an array job is."""
    command = [sys.executable, "-m", "melanoma_mil", *argv]
    return subprocess.Popen(command, env=one_thread_env(), stdout=PIPE, stderr=PIPE, text=True)


def recorded(out: Path) -> list[dict]:
    """The ledger's runs as another process sees them while a sweep writes (none yet)."""
    try:
        return ledger(out)
    except FileNotFoundError:
        return []


def test_two_sweep_processes_in_one_folder_share_the_grid_and_run_each_run_once(
    tmp_path: Path,
) -> None:
    """A second `sweep` into a folder in use was refused (parallel runs needed `wandb agent`):
    the tasks of an array job now share the grid, each run trained by one process only, and
    the last to finish writes the report of all."""
    argv, out, _ = two_seed_sweep(tmp_path)
    tasks = [sweep_process(argv) for _ in range(2)]
    outputs = [task.communicate(timeout=600) for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs
    names = ["000_seed-0", "001_seed-1"]
    runs = ledger(out)
    assert sorted(r["name"] for r in runs) == names
    assert [r["state"] for r in runs] == ["finished"] * 2
    assert runs[0]["splits_sha256"] == runs[1]["splits_sha256"]
    logs = "".join(err for _, err in outputs)
    for name in names:  # each fit started once, by one of the two processes
        assert logs.count(f"sweep run {name}: ") == 1, logs
        assert (out / name / "cv_summary.json").is_file()
    assert logs.count("comparison written to") >= 1, logs
    assert sorted(pd.read_csv(out / "sweep_results.csv")["run"]) == names
    assert sorted(pd.read_csv(out / "comparison" / "comparison.csv")["run"]) == names
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_a_run_whose_sweep_process_was_killed_is_taken_over_by_the_next(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A process killed while training a run leaves it recorded as running; its lock died with
    it, so the next `sweep` into the folder trains that run (once) and reports both."""
    argv, out, _ = two_seed_sweep(tmp_path)
    first = sweep_process(argv)
    try:
        deadline = time.monotonic() + 300
        while not any(r.get("state") == "running" for r in recorded(out)):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    killed = [r["name"] for r in ledger(out) if r["state"] == "running"]
    assert len(killed) == 1
    assert main(argv) == 0
    runs = ledger(out)
    assert sorted(r["name"] for r in runs) == ["000_seed-0", "001_seed-1"]
    assert [r["state"] for r in runs] == ["finished", "finished"]
    assert f"sweep run {killed[0]}: the process training it is gone; taken over" in caplog.messages
    assert sorted(pd.read_csv(out / "sweep_results.csv")["run"]) == ["000_seed-0", "001_seed-1"]


def test_a_random_sweep_beside_a_running_process_draws_count_runs_in_all_and_leaves_the_report(
    tmp_path: Path,
) -> None:
    """`--count N` is the sweep's total, not each process's: beside a run another process
    still trains, a process draws the rest (the draws one process would make, each its own
    name) and leaves the report to the last to finish. The sampled learning rates are
    invalid, so each run fails at once."""
    shared, once = tmp_path / "shared", tmp_path / "once"
    argv = invalid_lr_sweep(tmp_path, shared)
    alone = [f"output_dir={once}" if a.startswith("output_dir=") else a for a in argv]
    assert main([*alone, "--count", "3"]) == 1
    assert main([*argv, "--count", "1"]) == 1
    data = json.loads((shared / "sweep.json").read_text())
    data["runs"][0] = {k: data["runs"][0][k] for k in ("name", "params")} | {"state": "running"}
    (shared / "sweep.json").write_text(json.dumps(data))  # as a peer training it records it
    report = (shared / "sweep_results.csv").read_bytes()
    peer = try_lock(shared / ".sweep-runs" / f"{data['runs'][0]['name']}.lock")
    assert peer is not None
    try:
        assert main([*argv, "--count", "3"]) == 1
    finally:
        peer.release()
    assert [r["state"] for r in ledger(shared)] == ["running", "failed", "failed"]
    assert (shared / "sweep_results.csv").read_bytes() == report  # left to the peer
    assert main([*argv, "--count", "3"]) == 1  # the peer died: its run taken over, reported
    drawn = [(r["name"], r["params"]) for r in ledger(shared)]
    assert drawn == [(r["name"], r["params"]) for r in ledger(once)]
    assert len({name for name, _ in drawn}) == 3
    assert [r["state"] for r in ledger(shared)] == ["failed"] * 3
    assert list(pd.read_csv(shared / "sweep_results.csv")["run"]) == [n for n, _ in drawn]


def test_a_sweep_with_overwrite_beside_running_processes_joins_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """overwrite=true starts a sweep anew only in a process that finds no other sweeping into
    the folder: the tasks of an array started with it start anew once, not each other's runs
    over again."""
    argv, out, _ = two_seed_sweep(tmp_path)
    assert main([*argv, "--count", "1"]) == 0
    kept = (out / "000_seed-0" / "cv_summary.json").stat().st_mtime_ns
    other = shared_lock(out / LOCK)  # a `sweep` process still working in the folder
    try:
        assert main([*argv, "overwrite=true"]) == 0
    finally:
        other.release()
    assert [r["state"] for r in ledger(out)] == ["finished", "finished"]
    assert (out / "000_seed-0" / "cv_summary.json").stat().st_mtime_ns == kept
    assert "this one joins them" in caplog.text


def test_a_finished_run_whose_folder_is_gone_runs_again_on_resume(tmp_path: Path) -> None:
    """A run folder deleted to be redone was still ranked from the ledger's metrics, and the
    comparison failed on it (exit 2) after every other fit; it now runs again, as a failed
    run does, and the comparison is of runs that exist."""
    argv, out, _ = two_seed_sweep(tmp_path)
    assert main(argv) == 0
    gone = out / ledger(out)[1]["name"]
    shutil.rmtree(gone)
    assert main(argv) == 0
    assert [r["state"] for r in ledger(out)] == ["finished", "finished"]
    assert (gone / "predictions.csv").is_file()
    table = pd.read_csv(out / "comparison" / "comparison.csv")
    assert sorted(table["run"]) == sorted(r["name"] for r in ledger(out))


def test_a_run_refitted_with_other_settings_is_not_ranked_and_says_how_to_redo_it_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A `fit overwrite=true` of yours into a sweep run's folder left the ledger's metrics of the
    earlier run in sweep_results.csv beside a comparison of the new one; the run is now run
    again on resume, which fit refuses (other settings), so it is listed as failed. The refusal
    was fit's "pass overwrite=true to replace it", which for a sweep starts every run over; it
    now names the run's folder to delete, which the resumed sweep redoes."""
    argv, out, data = two_seed_sweep(tmp_path)
    assert main(argv) == 0
    first, second = (out / r["name"] for r in ledger(out))
    refit = ["fit", *fast(second), *data, "seed=1", "optim.lr=0.01", "overwrite=true"]
    assert main([*refit, f"cv.splits_file={first / 'splits.json'}"]) == 0
    assert main(argv) == 1
    assert [r["state"] for r in ledger(out)] == ["finished", "failed"]
    table = pd.read_csv(out / "sweep_results.csv")
    assert table.set_index("run")["state"][second.name] == "failed"
    assert table.set_index("run")["cv/auc_mean"].isna()[second.name]
    error = ledger(out)[1]["error"]
    assert error.startswith(f"'{second}' holds a run made with other settings (optim.lr: ")
    assert error.endswith(
        "; to redo this run, delete that folder and re-run this sweep (it "
        "resumes), or pass overwrite=true to start the whole sweep over."
    )
    assert f"sweep run {second.name} failed: {error}" in caplog.messages
    kept = (first / ".melanoma-mil.json").read_bytes()  # its run_id: a refit makes another
    shutil.rmtree(second)
    assert main(argv) == 0  # that run redone alone, the first kept
    assert [r["state"] for r in ledger(out)] == ["finished", "finished"]
    assert (first / ".melanoma-mil.json").read_bytes() == kept


def test_a_ledger_recording_fewer_metrics_is_resumed_without_rerunning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A finished run is checked against the metrics its ledger recorded, on those keys only: a
    ledger of an older version (no cv/n_bags) must not make every finished run look refitted."""
    argv, out, _ = two_seed_sweep(tmp_path)
    assert main([*argv, "--count", "1"]) == 0
    data = json.loads((out / "sweep.json").read_text())
    del data["runs"][0]["metrics"]["cv/n_bags"]
    (out / "sweep.json").write_text(json.dumps(data))
    caplog.clear()
    assert main(argv) == 0
    assert "no longer finished" not in caplog.text
    assert "cv/n_bags" not in ledger(out)[0]["metrics"]  # kept as recorded, not run again


def test_a_finished_run_with_a_missing_metric_is_resumed_without_rerunning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A metric a run could not compute (an AUC of a fold lacking a class) is NaN in the run and
    null in the strict JSON of sweep.json: the two are one value, not a sign of a refit."""
    argv, out, _ = two_seed_sweep(tmp_path)
    assert main([*argv, "--count", "1"]) == 0
    data = json.loads((out / "sweep.json").read_text())
    run = out / data["runs"][0]["name"]
    summary = json.loads((run / "cv_summary.json").read_text())
    summary["auc"]["std"] = None  # as a run lacking a class in a fold writes it
    (run / "cv_summary.json").write_text(json.dumps(summary))
    data["runs"][0]["metrics"]["cv/auc_std"] = None
    (out / "sweep.json").write_text(json.dumps(data))
    caplog.clear()
    assert main(argv) == 0
    assert "no longer finished" not in caplog.text
    assert ledger(out)[0]["metrics"]["cv/auc_std"] is None


def test_a_full_disk_stops_the_sweep_in_one_line_and_a_rerun_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Each run after the disk filled was started anyway, and each failed with a traceback."""
    disk = tmp_path / "disk"
    if not mounted_tmpfs(disk, "8m"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        features, labels = cohort(tmp_path / "coh")
        seeds = {"method": "grid", "parameters": {"seed": {"values": [0, 1, 2]}}}
        data = [f"data.features_dir={features}", f"data.labels_csv={labels}"]
        argv = ["sweep", str(sweep_file(tmp_path, seeds)), *fast(disk / "sw"), *data]
        one = tmp_path / "one"
        assert main(["sweep", str(sweep_file(tmp_path, seeds)), *fast(one), *data,
                     "--count", "1"]) == 0  # fmt: skip
        size = sum(p.stat().st_size for p in one.rglob("*") if p.is_file())
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(bytes(free - size * 3 // 2))  # room for 1.5 runs
        capsys.readouterr()
        caplog.clear()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: No space left on device"), err
        assert str(disk / "sw") in err, err
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
        runs = ledger(disk / "sw")
        assert [r["state"] for r in runs] == ["finished", "failed"]  # the third never started
        assert "No space left on device" in runs[1]["error"]
        assert not (disk / "sw" / "002_seed-2").exists()
        assert not [p for p in disk.rglob("*") if p.name.endswith(".tmp")]
        (disk / "filler").unlink()
        assert main(argv) == 0
        assert [r["state"] for r in ledger(disk / "sw")] == ["finished"] * 3
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_run_trained_beside_the_first_on_other_folds_is_recorded_as_failed_saying_why() -> None:
    """Runs started before any has finished make their own folds; where a swept key changed
    the cohort they differ, and a comparison of them would not be paired."""
    first = {"name": "000_a", "state": "finished", "splits_sha256": "a" * 64}
    same = {"name": "001_b", "state": "finished", "splits_sha256": "a" * 64}
    other = {"name": "001_b", "state": "finished", "splits_sha256": "b" * 64}
    assert unpaired(first, [first | {"state": "running"}]) is None  # the first to finish
    assert unpaired(same, [first, same | {"state": "running"}]) is None
    why = unpaired(other, [first, other | {"state": "running"}])
    assert why is not None and "bbbbbbbbbbbb, not the sweep's aaaaaaaaaaaa" in why
    assert "delete this run's folder and re-run this sweep" in why


def waits_on(lock_file: Path) -> bool:
    """Whether a process waits for the flock on ``lock_file`` (a '->' line in /proc/locks)."""
    inode = f":{lock_file.stat().st_ino} "
    return any(
        "->" in line and inode in line for line in Path("/proc/locks").read_text().splitlines()
    )


def test_a_peer_that_dies_after_the_last_look_for_work_has_its_run_taken_over_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer killed after this process last looked for work (while it waited to report) left
    its run 'running': this process ended saying the last of the others would report, and
    nobody did. It now sees the run's lock is free, trains the run and writes the report."""
    import threading

    argv, out, _ = two_seed_sweep(tmp_path)
    assert main([*argv, "--count", "1"]) == 0
    data = json.loads((out / "sweep.json").read_text())
    data["runs"].append({"name": "001_seed-1", "params": {"seed": 1}, "state": "running"})
    (out / "sweep.json").write_text(json.dumps(data))  # as a peer training it records it
    peer = try_lock(out / ".sweep-runs" / "001_seed-1.lock")
    reporting = try_lock(out / ".sweep-report.lock")  # a peer checking whether to report
    assert peer is not None and reporting is not None
    codes: list[int] = []
    sweep = threading.Thread(target=lambda: codes.append(main(argv)))
    sweep.start()
    try:
        deadline = time.monotonic() + 120
        while not waits_on(out / ".sweep-report.lock"):  # no run left to take: waits to report
            assert sweep.is_alive() and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        peer.release()  # the peer is killed
        reporting.release()
        sweep.join(timeout=600)
    assert codes == [0]
    assert [r["state"] for r in ledger(out)] == ["finished", "finished"]
    assert "still training in other processes" not in caplog.text
    assert sorted(pd.read_csv(out / "sweep_results.csv")["run"]) == ["000_seed-0", "001_seed-1"]


def invalid_lr_sweep(tmp_path: Path, out: Path | None = None) -> list[str]:
    """A random sweep into ``out`` (tmp_path/out) whose sampled learning rates are invalid:
    each run fails at once."""
    features, labels = cohort(tmp_path / "coh")
    spec = {
        "method": "random",
        "parameters": {"optim.lr": {"distribution": "normal", "mu": -1.0, "sigma": 0.1}},
    }
    rand = str(sweep_file(tmp_path, spec))
    data = [f"data.features_dir={features}", f"data.labels_csv={labels}", "logger=none"]
    return ["sweep", rand, f"output_dir={out or tmp_path / 'out'}", *data]


def test_a_process_joining_a_peer_does_not_retry_the_run_the_peer_just_failed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Array tasks that start one after another (a busy queue) each retried every run an
    earlier task had failed, as each started after that failure: a run failing for hours was
    tried once per task. A process joining others still sweeping retries none they failed;
    a later invocation (no process left sweeping) retries it once."""
    argv = [*invalid_lr_sweep(tmp_path), "--count", "1"]
    out = tmp_path / "out"
    assert main(argv) == 1
    [failed] = ledger(out)
    peer = shared_lock(out / LOCK)  # the task that failed it still sweeps (another run)
    try:
        caplog.clear()
        assert main(argv) == 1  # joins: nothing left to take (the report: 1 run failed)
    finally:
        peer.release()
    assert f"sweep run {failed['name']} failed" not in caplog.text
    assert ledger(out)[0]["state"] == "failed"
    caplog.clear()
    assert main(argv) == 1  # a re-run on its own retries it once
    assert caplog.text.count(f"sweep run {failed['name']} failed") == 1


def test_a_task_of_an_array_started_with_overwrite_after_the_others_ended_does_not_start_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With overwrite=true in an array's command line, a task that started after the others had
    finished the sweep (queued, or --array=0-7%1) started it anew: every finished run trained
    again, once per such task. overwrite=true now starts a sweep anew once per array job
    (SLURM_ARRAY_JOB_ID); a later task of that job resumes, and a new submission starts anew."""
    argv, out, _ = two_seed_sweep(tmp_path)
    assert main([*argv, "--count", "1"]) == 0
    before = (out / "000_seed-0" / "cv_summary.json").stat().st_mtime_ns
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    assert main([*argv, "overwrite=true"]) == 0  # task 0 of job 77: anew
    anew = (out / "000_seed-0" / "cv_summary.json").stat().st_mtime_ns
    assert anew != before
    caplog.clear()
    assert main([*argv, "overwrite=true"]) == 0  # task 1 of job 77, after task 0 ended
    assert (out / "000_seed-0" / "cv_summary.json").stat().st_mtime_ns == anew
    assert [r["state"] for r in ledger(out)] == ["finished", "finished"]
    assert "array job 77 already started" in caplog.text
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "78")
    assert main([*argv, "overwrite=true"]) == 0  # a new submission starts anew
    assert (out / "000_seed-0" / "cv_summary.json").stat().st_mtime_ns != anew


def test_temp_files_of_a_killed_sweep_process_are_removed_by_the_next_alone_in_the_folder(
    tmp_path: Path,
) -> None:
    """A process killed while replacing sweep.json, sweep_results.csv or .sweep-session left its
    temp file in the folder for good. sweep.json and sweep_results.csv are written under their
    locks, so the next process to take one removes its dead writer's temp file, beside a live
    peer too; .sweep-session is written alone in the folder, so only the next process alone
    there removes it. Only those temp names."""
    import tempfile

    argv, out, _ = two_seed_sweep(tmp_path)
    out.mkdir()
    left = [
        Path(tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out)[1])
        for name in ("sweep.json", "sweep_results.csv", ".sweep-session")
    ]
    mine = [out / ".sweep.json.notes", out / "sweep.json.tmp", out / ".other.json.abc.tmp"]
    for path in mine:
        path.write_text("the user's")
    peer = shared_lock(out / LOCK)  # a `sweep` process still working in the folder
    try:
        assert main([*argv, "--count", "1"]) == 0
    finally:
        peer.release()
    assert [path.exists() for path in left] == [False, False, True]
    assert main([*argv, "--count", "1"]) == 0
    assert not any(path.exists() for path in left)
    assert all(path.read_text() == "the user's" for path in mine)
