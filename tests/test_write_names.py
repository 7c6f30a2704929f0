"""A failed write names the file that failed (`io.atomic_path`), never a neighbour written in
the same go, nor a temp name the user never sees (a real tmpfs; skipped without root)."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest
from conftest import mounted_tmpfs

from melanoma_mil.io import write_together


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
