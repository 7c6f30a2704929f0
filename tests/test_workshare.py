"""Claims on shared slides (dead, recycled and remote owners) and placement decisions (pure)."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from melanoma_mil.errors import UserError
from melanoma_mil.features import placement
from melanoma_mil.locks import locked, shared_lock, try_lock
from melanoma_mil.workshare import GATE_STALE_S, Claim, clear_drafts, me, owner_gone, process_start


def _write_owner(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**me(), **changes}))


def test_a_claim_is_exclusive_until_released(tmp_path: Path) -> None:
    a, b = Claim(tmp_path / "s.lock"), Claim(tmp_path / "s.lock")
    assert a.acquire() and not b.acquire()
    assert b.owner["pid"] == os.getpid() and b.live_owner() is not None
    a.release()
    assert not (tmp_path / "s.lock").exists() and b.acquire()


def test_a_claim_appears_whole_and_works_without_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = Claim(tmp_path / "s.lock")
    assert a.acquire() and json.loads((tmp_path / "s.lock").read_text()) == a.owner
    assert not Claim(tmp_path / "s.lock").acquire()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.lock"]  # no draft left

    def no_links(src: object, dst: object) -> None:  # e.g. an SMB or FUSE mount
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    b = Claim(tmp_path / "t.lock")
    assert b.acquire() and json.loads((tmp_path / "t.lock").read_text()) == b.owner
    assert not Claim(tmp_path / "t.lock").acquire()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.lock", "t.lock"]


def test_dead_and_recycled_owners_are_taken_over_live_ones_are_not(tmp_path: Path) -> None:
    lock = tmp_path / "s.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_owner(lock, pid=dead.pid, start=None)
    assert owner_gone(json.loads(lock.read_text())) is True
    assert Claim(lock).acquire()  # the dead owner's claim is taken over at once

    # a pid reused by another process (containers restart pids from 1): its start time differs
    start = process_start(os.getpid())
    assert start is not None
    _write_owner(lock, start=start - 100)
    assert owner_gone(json.loads(lock.read_text())) is True and Claim(lock).acquire()

    _write_owner(lock)  # this very process: alive
    assert owner_gone(json.loads(lock.read_text())) is False and not Claim(lock).acquire()


def test_other_hosts_claims_go_stale_by_heartbeat_age(tmp_path: Path) -> None:
    lock = tmp_path / "s.lock"
    _write_owner(lock, host="node-b", machine="other")
    assert owner_gone(json.loads(lock.read_text())) is None  # cannot tell from here
    assert not Claim(lock, stale_after=60).acquire()  # fresh heartbeat: alive
    old = time.time() - 120
    os.utime(lock, (old, old))
    mine = Claim(lock, stale_after=60)
    assert mine.acquire() and mine.owner["pid"] == os.getpid()
    os.utime(lock, (old, old))
    mine.heartbeat_s = 0
    mine.heartbeat()
    assert time.time() - lock.stat().st_mtime < 30  # the heartbeat keeps it fresh


@pytest.mark.parametrize(
    ("env", "visible", "device"),
    [
        ({}, 1, 0),
        ({"LOCAL_RANK": "3"}, 4, 3),
        ({"SLURM_LOCALID": "5", "SLURM_NTASKS_PER_NODE": "8"}, 4, 1),  # 8 tasks on 4 GPUs
        ({"SLURM_LOCALID": "2"}, 1, 0),  # srun bound one GPU per task
        ({"LOCAL_RANK": "1", "SLURM_LOCALID": "0"}, 2, 1),  # torchrun inside srun
    ],
)
def test_gpu_from_local_rank_among_the_visible_gpus(
    env: dict[str, str], visible: int, device: int
) -> None:
    assert placement.gpu_index(env, visible) == device


def test_reader_workers_share_the_node_and_shm_is_checked_first() -> None:
    assert placement.local_world({"SLURM_TASKS_PER_NODE": "4(x2),3"}) == 4
    assert placement.local_world({"LOCAL_WORLD_SIZE": "8"}) == 8
    assert placement.reader_workers(32, 32, 8) == 3  # 8 ranks on an unpinned 32-core node
    assert placement.reader_workers(6, 32, 8) == 5  # the launcher pinned 6 cores to this rank
    assert placement.reader_workers(128, 128, 1) == placement.MAX_READERS
    batch = 64 * 512 * 512 * 3  # 48 MiB of uint8 tiles
    assert placement.shm_plan(8, batch, 64 << 30) == placement.ShmPlan(8, 4, "")
    small = placement.shm_plan(8, batch, 1200 << 20)  # fits 8 x 2 batches, not 8 x 4
    assert (small.workers, small.prefetch) == (8, 2) and "--shm-size" in small.note
    docker = placement.shm_plan(8, batch, 64 << 20)  # the container default: threads
    assert docker.workers == 0 and "threads" in docker.note


@pytest.mark.parametrize(
    ("batch", "side", "parts"),
    [(1024, 256, 13), (64, 256, 1), (1024, 224, 10), (1000, 512, 48), (16, 4096, 16), (7, 64, 1)],
)
def test_read_parts_split_a_batch_exactly_under_the_byte_cap(
    batch: int, side: int, parts: int
) -> None:
    tile = side * side * 3
    got = placement.read_parts(batch, tile)
    sizes = [b - a for a, b in got]
    assert len(got) == parts and got[0][0] == 0 and got[-1][1] == batch  # the whole batch
    assert all(got[i][1] == got[i + 1][0] for i in range(len(got) - 1))  # in order, no gap
    assert max(sizes) - min(sizes) <= 1  # equal parts
    assert max(sizes) * tile <= max(tile, placement.READ_PART_BYTES)  # one item stays small
    for smaller in range(32, side + 1, 32):  # /dev/shm is planned for the run's largest tile
        part = max(b - a for a, b in placement.read_parts(batch, smaller * smaller * 3))
        assert part * smaller * smaller * 3 <= placement.largest_item(batch, tile)


def test_batch_size_for_the_device() -> None:
    assert placement.batch_size("cpu") == 64
    gb = 1 << 30
    assert placement.batch_size("cuda", 70 * gb, 20 << 20) == 1024  # big GPU, small model
    assert placement.batch_size("cuda", 20 * gb, 60 << 20) == 128  # 170 fit -> 128
    assert placement.batch_size("cuda", 1 * gb, 100 << 20) == 5  # nearly full: what fits


def test_a_live_but_silent_process_on_this_host_goes_stale_too(tmp_path: Path) -> None:
    lock = tmp_path / "s.lock"
    _write_owner(lock)  # alive (this process), but its heartbeat stopped: hung
    old = time.time() - 120
    os.utime(lock, (old, old))
    assert Claim(lock, stale_after=60).acquire()


def test_claimants_sharing_a_pid_never_collide(tmp_path: Path) -> None:
    """Threads stand for containers on two hosts sharing the folder, both pid 1: exactly one
    takes each claim, the other sees it held; no error, no draft left behind."""
    outcomes = []
    for trial in range(100):
        lock = tmp_path / f"s{trial}.lock"
        claims = [Claim(lock), Claim(lock)]
        start = threading.Barrier(2)
        got: list[object] = [None, None]

        def take(i: int, claims: list[Claim] = claims, start=start, got=got) -> None:
            start.wait()
            try:
                got[i] = claims[i].acquire()
            except OSError as e:
                got[i] = e

        threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        outcomes.append(sorted(map(repr, got)))
    assert outcomes == [["False", "True"]] * 100
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"s{i}.lock" for i in range(100))
    assert oct(os.stat(tmp_path / "s0.lock").st_mode & 0o777) == "0o644"  # peers can read it


def _stale_claim(lock: Path) -> None:
    """A claim left by a process that is gone (its pid is dead)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_owner(lock, pid=dead.pid, start=None)


def test_a_late_breaker_never_drops_the_claim_that_replaced_the_stale_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B saw the stale claim; A broke it first and holds; B breaks late, and C claims the
    moment the path is free. One thread drives the three; C steps in right after any move of
    the claim away (the real rename runs), so no timing decides the order."""
    lock = tmp_path / "s.lock"
    _stale_claim(lock)
    a, b, c = Claim(lock), Claim(lock), Claim(lock)
    seen = b.read()
    assert b.stale(seen)  # B sees the stale claim ...
    assert a.acquire()  # ... A breaks it first and holds
    real_replace = os.replace
    c_tried: list[bool] = []

    def replace_then_c_claims(src: object, dst: object) -> None:
        real_replace(src, dst)  # type: ignore[arg-type]
        if Path(str(src)) == lock and not c_tried:
            c_tried.append(c.acquire())

    monkeypatch.setattr(os, "replace", replace_then_c_claims)
    b._break(seen)  # B, late, breaks what it saw
    monkeypatch.setattr(os, "replace", real_replace)
    c_tried.append(c.acquire())
    assert [x.held for x in (a, b, c)] == [True, False, False]
    assert json.loads(lock.read_text()) == a.owner  # A's claim is where it was
    a.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no gate or aside left


def test_a_claim_whose_heartbeat_resumed_after_it_was_seen_stale_is_kept(tmp_path: Path) -> None:
    """A hung owner on another host beats again before a breaker gets to it: not taken."""
    lock = tmp_path / "s.lock"
    _write_owner(lock, host="node-b", machine="other")
    old = time.time() - 120
    os.utime(lock, (old, old))
    breaker = Claim(lock, stale_after=60)
    seen = breaker.read()
    assert breaker.stale(seen)
    os.utime(lock)  # its owner's heartbeat
    breaker._break(seen)
    assert json.loads(lock.read_text()) == seen and not breaker.acquire()


def test_a_breakers_gate_holds_off_others_only_while_its_breaker_lives(tmp_path: Path) -> None:
    """A peer breaking the stale claim (its gate fresh) is left to it; a gate whose breaker
    is gone (dead pid, or silent past GATE_STALE_S on another host) is removed and the claim
    taken; clear_drafts tidies a gate left behind."""
    lock, gate = tmp_path / "s.lock", tmp_path / ".s.lock.breaking"
    _stale_claim(lock)
    _write_owner(gate, host="node-b", machine="other")
    mine = Claim(lock)
    assert not mine.acquire() and lock.exists()  # node-b is breaking it: left to node-b
    old = time.time() - GATE_STALE_S - 1
    os.utime(gate, (old, old))
    assert mine.acquire() and not gate.exists()  # node-b died meanwhile
    mine.release()
    _stale_claim(lock)
    _stale_claim(gate)
    assert Claim(lock).clear_stale() and not gate.exists()  # dead on this host: at once
    _stale_claim(gate)
    clear_drafts(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_draft_that_cannot_be_removed_is_one_warning_and_the_others_go(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """clear_drafts stopped at the first dead claimant's draft it could not remove (another
    user's, an immutable file), leaving the others and failing its caller; it now removes the
    others and names the leftover in one warning."""
    stuck, other = tmp_path / ".a.lock.x1.claiming", tmp_path / ".b.lock.x2.claiming"
    _stale_claim(stuck)
    _stale_claim(other)
    subprocess.run(["chattr", "+i", str(stuck)], check=True)  # root on ext4: even root cannot
    try:
        with caplog.at_level(logging.WARNING):
            clear_drafts(tmp_path)
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [stuck.name]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(stuck) in warnings[0], warnings


@pytest.mark.parametrize(
    "take", [try_lock, shared_lock, lambda p: locked(p).__enter__()], ids=["try", "shared", "wait"]
)
def test_a_lock_file_planted_as_a_dangling_link_is_refused_and_nothing_made_where_it_points(
    tmp_path: Path, take: Callable[[Path], object]
) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    lock = out / ".sweep.lock"
    lock.symlink_to(elsewhere / "made")
    with pytest.raises(UserError) as e:
        take(lock)
    assert str(lock) in str(e.value) and "symbolic link" in str(e.value)
    assert "\n" not in str(e.value)
    assert list(elsewhere.iterdir()) == [] and lock.is_symlink()


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_claim_planted_as_a_link_is_refused_not_broken_as_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hard_links: bool
) -> None:
    """O_EXCL and link() never write where a link points; but the link read as a claim without
    an owner, and was removed as a stale one: the user's link is kept, and named."""
    if not hard_links:
        monkeypatch.setattr(os, "link", lambda *_: (_ for _ in ()).throw(OSError(errno.EPERM, "")))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    claim = tmp_path / "s.lock"
    claim.symlink_to(elsewhere / "made")
    with pytest.raises(UserError, match=f"'{claim}' is a symbolic link"):
        Claim(claim).acquire()
    assert list(elsewhere.iterdir()) == [] and claim.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "s.lock"]  # no draft left
