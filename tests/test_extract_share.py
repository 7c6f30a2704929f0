"""`extract` at cohort scale: two processes, one killed; a full disk; the wrong slide; batches."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import mounted_tmpfs, read_only_bind
from test_extract import ROOT, bags, cfg_for, make_cohort

from melanoma_mil.demo.pyramid import write_pyramid
from melanoma_mil.features.run import run_extract
from melanoma_mil.tiling.coords import read_coords, write_coords
from melanoma_mil.tiling.fingerprint import slide_fingerprint
from melanoma_mil.workshare import Claim, me

SIZES = (160, 192, 224, 256, 288, 320)  # 25 ... 100 tiles of 32 px


def sized_cohort(root: Path) -> Path:
    """Six slides of different sizes, tiled, with fingerprints as `tile` records them."""
    for i, side in enumerate(SIZES):
        make_cohort(root / f"part{i}", 1, side=side, tile=32, seed=i)
        src = root / f"part{i}" / "slides" / "slide0.tif"
        slide = root / "slides" / f"s{i}.tif"
        slide.parent.mkdir(parents=True, exist_ok=True)
        src.rename(slide)
        grid = read_coords(root / f"part{i}" / "tiles" / "coords" / "slide0.h5")
        grid = type(grid)(**{**grid.__dict__, "slide_path": str(slide.resolve()),
                             "fingerprint": slide_fingerprint(slide)})  # fmt: skip
        write_coords(root / "tiles" / "coords" / f"s{i}.h5", grid)
        shutil.rmtree(root / f"part{i}")
    return root / "tiles"


def cli(tiles: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "melanoma_mil", "extract", f"coords_dir={tiles}",
            f"output_dir={out}", "encoder.name=resnet18_imagenet", "encoder.pretrained=false",
            "device=cpu", "batch_size=8", *extra]  # fmt: skip


def claimed(log: Path) -> list[str]:
    return [line.split()[1] for line in log.read_text().splitlines() if line.startswith("claimed ")]


def owner_pid(lock: Path) -> int | None:
    return Claim(lock).read().get("pid")


def _start_together(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    """Hold the first process to start (SIGSTOP) until the other has started too: under load
    one may otherwise encode the whole cohort before the other has imported torch."""
    started = [False, False]
    paused: subprocess.Popen | None = None
    deadline = time.monotonic() + 240
    while not all(started) and time.monotonic() < deadline:
        for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
            assert p.poll() is None, log.read_text()[-3000:]
            started[i] = started[i] or "slides, encoder" in log.read_text()
            if started[i] and paused is None and not all(started):
                p.send_signal(signal.SIGSTOP)
                paused = p
        time.sleep(0.01)
    if paused is not None:
        paused.send_signal(signal.SIGCONT)
    assert all(started), [log.read_text()[-3000:] for log in logs]


def test_two_processes_one_killed_every_slide_once_and_bit_identical(tmp_path: Path) -> None:
    tiles = sized_cohort(tmp_path)
    ref = tmp_path / "ref"
    assert run_extract(cfg_for(tiles, ref, batch_size=8)) == 0

    out = tmp_path / "shared"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread each
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = []
    for log in logs:
        with open(log, "w") as f:
            procs.append(subprocess.Popen(cli(tiles, out), cwd=ROOT, env=env, stdout=f, stderr=f))
    killed, before, victim = None, set(), 0
    try:
        _start_together(procs, logs)
        # kill a process while it encodes a slide, once some slide is done
        deadline = time.monotonic() + 240
        while killed is None and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), "a process ended before any kill"
            for lock in out.glob("*/*.lock"):
                pid = owner_pid(lock)
                if pid not in (procs[0].pid, procs[1].pid) or not bags(out):
                    continue
                victim = 0 if pid == procs[0].pid else 1
                # frozen while looked at: it cannot write the bag between the look and the kill
                procs[victim].send_signal(signal.SIGSTOP)
                if lock.with_suffix(".h5").exists() or owner_pid(lock) != pid:  # past its write
                    procs[victim].send_signal(signal.SIGCONT)
                    continue
                before = {k.stem for k in out.glob("*/*.lock") if owner_pid(k) == pid}
                procs[victim].send_signal(signal.SIGKILL)
                killed = lock.stem
                break
            time.sleep(0.01)
        assert killed is not None, "no process could be killed while encoding"
        a, b = procs[victim], procs[1 - victim]
        logs = [logs[victim], logs[1 - victim]]
        assert a.wait() == -signal.SIGKILL
        # every claim A held when it died: the slide it encoded and the one its readers had
        # already claimed ahead (prefetch across the slide boundary)
        after = {lock.stem for lock in out.glob("*/*.lock") if owner_pid(lock) == a.pid}
        held = before | after | {killed}
        assert b.wait(timeout=300) == 0, logs[1].read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    counts = Counter(claimed(logs[0]) + claimed(logs[1]))
    assert set(counts) == {f"s{i}" for i in range(6)}
    assert len(held) <= 2  # the slide being encoded and at most one claimed ahead
    assert {s for s, n in counts.items() if n > 1} <= held  # only A's unfinished slides twice
    (record,) = out.glob(f"*/.status/{killed}.json")
    by_b = f"pid {b.pid} " in json.loads(record.read_text())["by"]
    assert killed in claimed(logs[1]) and by_b  # taken over by B

    mine, theirs = bags(out), bags(ref)
    assert sorted(mine) == sorted(theirs)
    for sid in theirs:
        assert mine[sid].read_bytes() == theirs[sid].read_bytes(), sid
    (csv,) = out.glob("*/extract.csv")
    table = pd.read_csv(csv).set_index("slide_id")
    # done: by A during B's run; skipped: by A before B started (a slow start under load)
    assert set(table["status"]) <= {"ok", "done", "skipped"} and len(table) == 6
    assert "No space" not in logs[1].read_text()
    assert not list(out.rglob("*.lock")) and not list(out.rglob("*.tmp"))


def test_a_claim_left_on_a_finished_slide_by_a_dead_process_is_removed(tmp_path: Path) -> None:
    """A process killed between writing a slide and releasing its claim leaves a lock; the
    next run (or the survivor's end) removes it, but never a live process's claim."""
    tiles = make_cohort(tmp_path, 2, side=160, tile=32)
    out = tmp_path / "f"
    assert run_extract(cfg_for(tiles, out)) == 0
    first, second = sorted(bags(out).values())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = {**me(), "pid": dead.pid, "start": None}
    first.with_suffix(".lock").write_text(json.dumps(owner))
    second.with_suffix(".lock").write_text(json.dumps(me()))  # this live process's claim
    # drafts of claims (killed between writing the draft and linking it): the dead one goes
    dead_draft = first.with_name(f".{first.stem}.lock.{dead.pid}.claiming")
    live_draft = first.with_name(f".{first.stem}.lock.{os.getpid()}.claiming")
    dead_draft.write_text(json.dumps(owner))
    live_draft.write_text(json.dumps(me()))
    # and the dead one was killed while writing the slide's outcome record: its temp goes too
    record_tmp = first.parent / ".status" / f".{first.stem}.json.x1y2z3.tmp"
    record_tmp.write_text("{")
    # or while writing the slide's bag again (overwrite=true): that partial bag goes too
    bag_tmp = first.with_name(f".{first.name}.a1b2c3.tmp")
    bag_tmp.write_bytes(b"\x89HDF\r\n")
    assert run_extract(cfg_for(tiles, out)) == 0
    assert not first.with_suffix(".lock").exists() and not dead_draft.exists()
    assert not record_tmp.exists() and not bag_tmp.exists()
    assert second.with_suffix(".lock").exists() and live_draft.exists()


def test_features_equal_for_any_batch_size_with_or_without_the_writer_thread(
    tmp_path: Path,
) -> None:
    tiles = make_cohort(tmp_path, 1, side=288, tile=16)  # 324 tiles: 256 + a rest
    runs = {
        (1, True): cfg_for(tiles, tmp_path / "b1", batch_size=1),
        (64, True): cfg_for(tiles, tmp_path / "b64", batch_size=64),
        (256, True): cfg_for(tiles, tmp_path / "b256", batch_size=256),
        (64, False): cfg_for(tiles, tmp_path / "b64sync", batch_size=64, async_write=False),
    }
    feats = {}
    for key, cfg in runs.items():
        assert run_extract(cfg) == 0
        (path,) = bags(Path(cfg.output_dir)).values()
        with h5py.File(path, "r") as f:
            feats[key] = f["features"][:]
    first = feats[(64, True)]
    assert first.shape == (324, 512)
    for key, other in feats.items():
        if key[0] == 1:  # oneDNN runs batches of one with other kernels on some CPUs (AVX2):
            # equal up to float32 summation order, seen as one float16 step where it rounds
            np.testing.assert_allclose(other, first, rtol=2**-9, atol=1e-6, err_msg=str(key))
        else:
            np.testing.assert_array_equal(other, first, err_msg=str(key))


def test_a_same_named_slide_elsewhere_is_refused_for_that_slide_only(tmp_path: Path) -> None:
    tiles = sized_cohort(tmp_path)
    other = tmp_path / "elsewhere"
    other.mkdir()
    for i in range(6):  # same names, other pixels: the wrong slides, e.g. another cohort
        shutil.copy(tmp_path / "slides" / f"s{i}.tif", other / f"s{i}.tif")
    rng = np.random.default_rng(9)
    write_pyramid(other / "s2.tif", rng.integers(0, 255, (448, 448, 3), np.uint8), 0.5, 2)
    cfg = cfg_for(tiles, tmp_path / "f")
    cfg.slides_dir = str(other)
    assert run_extract(cfg) == 1
    (csv,) = (tmp_path / "f").glob("*/extract.csv")
    table = pd.read_csv(csv).set_index("slide_id")
    assert table.loc["s2", "status"] == "failed"
    assert "not the slide that was tiled" in table.loc["s2", "reason"]
    assert (table.drop("s2")["status"] == "ok").all()
    assert "s2" not in bags(tmp_path / "f")


def test_a_full_disk_is_a_one_line_failure_with_no_partial_file(tmp_path: Path) -> None:
    full = tmp_path / "full"
    if not mounted_tmpfs(full, "2m"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        tiles = make_cohort(tmp_path, 3, side=288, tile=32)  # 81 x 512 float16: 83 KB a bag
        with open(full / "filler", "wb") as f:  # leave ~100 KB: one bag fits, not three
            f.write(b"\0" * (2 * 1024 * 1024 - 100 * 1024))
        done = subprocess.run(cli(tiles, full / "features"), cwd=ROOT, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 1, done.stderr[-3000:]
        assert "Traceback" not in done.stderr and "Segmentation" not in done.stderr
        assert "disk full" in done.stderr
        for path in (full / "features").rglob("*.h5"):  # whatever exists is complete
            with h5py.File(path, "r") as f:
                assert f["features"].shape == (81, 512)
        assert not list(full.rglob("*.tmp")) and not list(full.rglob("*.lock"))
    finally:
        subprocess.run(["umount", str(full)], check=False)


def test_a_small_dev_shm_moves_reads_to_threads_with_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    shm = tmp_path / "shm"
    if not mounted_tmpfs(shm, "64k"):  # a container's /dev/shm, scaled to these tiny batches
        pytest.skip("needs root to mount a small tmpfs")
    try:
        import melanoma_mil.features.hardware as hardware

        monkeypatch.setattr(hardware, "SHM", shm)
        tiles = make_cohort(tmp_path, 1, side=288, tile=32)
        with caplog.at_level("WARNING"):
            assert run_extract(cfg_for(tiles, tmp_path / "f", num_workers=2, batch_size=64)) == 0
        assert "reading in threads of this process instead" in caplog.text
        assert "--shm-size" in caplog.text
    finally:
        subprocess.run(["umount", str(shm)], check=False)


def test_low_precision_weights_keep_the_features_bit_identical() -> None:
    import torch

    from melanoma_mil.config import EncoderConfig
    from melanoma_mil.encoders import build_encoder

    enc = build_encoder(EncoderConfig(name="resnet18_imagenet", pretrained=False))
    tiles = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    before = enc.encode(tiles, 32, "bf16")
    assert enc.low_precision_weights("bf16", 32)
    assert enc.module.conv1.weight.dtype == torch.bfloat16
    assert torch.equal(enc.encode(tiles, 32, "bf16"), before)
    assert not enc.low_precision_weights("fp32", 32)  # nothing to store in fp32


def test_waiting_for_a_live_peers_slide_is_logged_once_not_every_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A slide held by a live process is polled every 2 s (a dead host's lock for 900 s):
    the unchanged wait is said once (then once a minute), not 450 times. The queue's clock is
    replaced so that exactly 40 polls pass before the peer lets go; the encoder is real."""
    import types

    from melanoma_mil.features import queue

    tiles = make_cohort(tmp_path, 1, side=160, tile=32)
    out = tmp_path / "f"
    assert run_extract(cfg_for(tiles, out)) == 0
    (bag,) = bags(out).values()
    bag.unlink()  # to be made again, while a live process (this one, as a peer) holds it
    lock = bag.with_suffix(".lock")
    lock.write_text(json.dumps(me()))
    polls: list[float] = []

    def sleep(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 40:  # the peer let go without writing it: ours to do
            lock.unlink()

    clock = types.SimpleNamespace(time=time.time, monotonic=time.monotonic, sleep=sleep)
    monkeypatch.setattr(queue, "time", clock)
    with caplog.at_level("INFO", logger="melanoma_mil"):
        assert run_extract(cfg_for(tiles, out)) == 0
    assert len(polls) == 40 and bag.is_file()
    assert caplog.text.count("waiting for 1 slide(s) held by other processes") == 1


def test_a_read_only_cache_folder_is_named_not_a_temp_file_in_it(tmp_path: Path) -> None:
    """The one line named '..precision.json.<random>.tmp', a file that never exists; now the
    folder is refused before any slide is claimed."""
    tiles = make_cohort(tmp_path, 1, side=96, tile=32)
    assert run_extract(cfg_for(tiles, tmp_path / "one", batch_size=8)) == 0  # names the key
    (key,) = [p.name for p in (tmp_path / "one").iterdir() if p.is_dir()]
    cache = tmp_path / "features" / key
    with read_only_bind(cache):
        run = subprocess.run(cli(tiles, tmp_path / "features"), cwd=ROOT, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    assert f"error: `extract`'s folder '{cache}' cannot be written (Read-only" in run.stderr
    assert ".tmp" not in run.stderr


def test_a_claim_planted_as_a_link_fails_its_slide_and_the_others_are_extracted(
    tmp_path: Path,
) -> None:
    """A link where a slide's claim goes is refused (never removed as a stale claim): that slide
    fails with the reason, as in `tile`, rather than the whole run stopping midway with exit 2."""
    tiles = make_cohort(tmp_path, 3)
    out, elsewhere = tmp_path / "features", tmp_path / "elsewhere"
    assert run_extract(cfg_for(tiles, out)) == 0
    cache = bags(out)["slide1"].parent
    for bag in bags(out).values():
        bag.unlink()
    link = cache / "slide1.lock"
    link.symlink_to(elsewhere)
    assert run_extract(cfg_for(tiles, out)) == 1
    assert sorted(bags(out)) == ["slide0", "slide2"]
    rows = pd.read_csv(cache / "extract.csv").set_index("slide_id")
    assert rows.loc["slide1", "status"] == "failed"
    assert f"'{link}' is a symbolic link" in rows.loc["slide1", "reason"]
    assert link.is_symlink() and not elsewhere.exists()
