"""A failed write names the file that failed (`io.atomic_path`), never a neighbour written in
the same go, and a temp name only where it is the temp name that failed (full-disk tests use a
real tmpfs; skipped without root). The temp name names its writer, so the next write of a file
removes what writers killed before their rename left, and nothing else."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import mounted_tmpfs

from melanoma_mil.fsutil import create_once
from melanoma_mil.io import temp_target, write_text, write_together


def test_a_full_disk_in_write_together_names_the_file_that_did_not_fit(tmp_path: Path) -> None:
    """Every temp file is open at once: the first's failed write went out through the last's
    context, which took it for its own and named the last file."""
    disk = tmp_path / "disk"
    if not mounted_tmpfs(disk, "256k"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        big, small = disk / "predictions.csv", disk / "summary.json"
        with pytest.raises(OSError) as failed:
            write_together({big: bytes(1 << 20), small: b"{}\n"})
        assert failed.value.errno == errno.ENOSPC
        assert failed.value.filename == str(big)
        assert not list(disk.iterdir())
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("write", [write_text, create_once])
def test_a_name_too_long_for_its_temp_name_shows_the_temp_name(
    tmp_path: Path, write: Callable[[Path, Any], object]
) -> None:
    """A 250-byte name is a legal file name, but its temp name ('.<name>.<8 random>.tmp') is
    not: naming the final file said 'File name too long' of a name the disk accepts."""
    final = tmp_path / ("a" * 246 + ".csv")
    with pytest.raises(OSError) as failed:
        write(final, b"x" if write is create_once else "x")
    assert failed.value.errno == errno.ENAMETOOLONG
    assert failed.value.filename != str(final)
    assert Path(failed.value.filename).name.startswith(f".{final.name}.")
    final.write_text("x")  # the final name itself is fine


# a process writing ``argv[2]`` with the real code, which at the rename (os.<argv[1]>) sends
# itself argv[3]: SIGKILL (a writer killed mid-write) or SIGSTOP (one still writing)
WRITER = """
import os, signal, sys
from pathlib import Path
import pandas as pd
from melanoma_mil.outdir import write_marker
from melanoma_mil.runtable import write
rename, path, sig = sys.argv[1], Path(sys.argv[2]), getattr(signal, sys.argv[3])
real = getattr(os, rename)
def stopped(*args):
    os.kill(os.getpid(), sig)
    return real(*args)
setattr(os, rename, stopped)
if rename == "replace":
    write(pd.DataFrame({"slide_id": [sys.argv[3]]}), path)
else:
    write_marker(path.parent, {"command": sys.argv[3]})
"""


def _writer(rename: str, path: Path, sig: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", WRITER, rename, str(path), sig])


def _frozen(proc: subprocess.Popen[bytes]) -> None:
    """Wait until ``proc`` stopped itself (state T), i.e. sits between its temp and its rename."""
    deadline = time.monotonic() + 120
    while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize(
    ("rename", "name"), [("replace", "tiling.csv"), ("link", ".melanoma-mil.json")]
)
def test_the_next_write_removes_a_killed_writers_temp_file_and_keeps_a_live_ones(
    tmp_path: Path, rename: str, name: str
) -> None:
    """A run table (written by whichever process ends, under no lock) or a folder marker
    (`create_once`) whose writer was SIGKILLed before its rename left `.<name>.<random>.tmp`
    for good, one per kill: a temp name told nothing of its writer. Now the next write of the
    file removes a temp whose writer on this machine is dead; a live (stopped) writer's, a
    leftover of the old unnamed kind, the user's look-alike and another machine's stay."""
    path = tmp_path / name
    killed = _writer(rename, path, "SIGKILL")
    assert killed.wait(timeout=120) == -signal.SIGKILL
    [dead] = _temps(tmp_path)  # the kill came between the temp and its rename
    assert temp_target(dead) == name  # the locked cleaners' names still cover it
    kept = [f".{name}.k3j4h5g6.tmp", f".{name}.mine.tmp", f".{name}.0123456789-{killed.pid}-ab.tmp"]
    for other in kept:  # an unnamed leftover, the user's, a dead pid's on another machine
        (tmp_path / other).write_text("x")
    live = _writer(rename, path, "SIGSTOP")
    try:
        _frozen(live)
        [ours] = set(_temps(tmp_path)) - {dead, *kept}
        assert f"-{live.pid}-" in ours and dead not in _temps(tmp_path)  # the live one's start
        (tmp_path / dead).write_text("x")  # cleaned it: left again (the same dead writer's)
        if rename == "replace":
            write_text(path, "slide_id\nmine\n")
        else:
            assert create_once(path, b"{}")
        assert _temps(tmp_path) == sorted([ours, *kept])  # the live writer's temp is kept
    finally:
        live.send_signal(signal.SIGCONT)
        assert live.wait(timeout=120) == 0
    assert _temps(tmp_path) == sorted(kept) and path.exists()


def test_a_name_too_long_for_its_writer_in_the_temp_name_is_still_written(tmp_path: Path) -> None:
    """The writer's machine and pid make the temp name longer: a name that fits with the short
    temp name '.<name>.<8 random>.tmp' is written with that (a killed writer's is left)."""
    final = tmp_path / ("a" * 236 + ".csv")
    write_text(final, "x")
    create_once(final.with_suffix(".json"), b"x")
    assert final.read_text() == "x" and final.with_suffix(".json").read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{'a' * 236}.csv", f"{'a' * 236}.json"]
