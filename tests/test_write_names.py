"""A failed write names the file that failed (`io.atomic_path`), never a neighbour written in
the same go, and a temp name only where it is the temp name that failed (full-disk tests use a
real tmpfs; skipped without root)."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import mounted_tmpfs

from melanoma_mil.fsutil import create_once
from melanoma_mil.io import write_text, write_together


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
