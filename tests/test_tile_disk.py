"""`tile` on a full disk and beside another `tile` process: one line, no partial files, real
tile counts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import mounted_tmpfs, read_only_bind, tissue_image

from melanoma_mil.config import TileConfig, TilingConfig
from melanoma_mil.demo.pyramid import write_pyramid
from melanoma_mil.tiling.coords import read_coords
from melanoma_mil.tiling.job import Task, tile_one
from melanoma_mil.tiling.run import run_tile

ROOT = Path(__file__).resolve().parents[1]
TILING = TilingConfig(mpp=1.0, tile_size=64)


def _slides(root: Path, n: int) -> Path:
    slides = root / "slides"
    slides.mkdir(parents=True)
    for i in range(n):
        write_pyramid(slides / f"s{i}.tiff", tissue_image(768, i), mpp=0.5, n_levels=1)
    return slides


def _fill(folder: Path, room: int) -> None:
    """Fill the disk up to ``room`` bytes, as an earlier run would have."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while f.write(b"\0" * 4096):
                pass
        except OSError:
            pass
    os.truncate(filler, filler.stat().st_size - room)


def test_a_full_disk_fails_the_slide_in_one_line_and_stops_claiming(tmp_path: Path) -> None:
    full = tmp_path / "full"
    if not mounted_tmpfs(full, "2m"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        slides = _slides(tmp_path, 5)
        (full / "tiles" / "coords").mkdir(parents=True)
        _fill(full, 16 * 1024)  # room for the folder's marker and claims
        done = subprocess.run(
            [sys.executable, "-m", "melanoma_mil", "tile", f"slides_dir={slides}",
             f"output_dir={full / 'tiles'}", "workers=2", "tiling.mpp=1.0",
             "tiling.tile_size=64"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 1, done.stderr[-3000:]
        assert "Traceback" not in done.stderr and "OSError" not in done.stderr
        assert "disk full (No space left on device)" in done.stderr
        assert "tile stopped early" in done.stderr and "re-run" in done.stderr
        assert "not started: disk full" in done.stdout  # slides not claimed after it
        assert "coords:" not in done.stdout and "QC images:" not in done.stdout
        left = [p.name for p in full.rglob("*") if p.is_file() and p.name != "filler"]
        assert not [n for n in left if n.endswith((".tmp", ".lock", ".h5", ".png"))], left
    finally:
        subprocess.run(["umount", str(full)], check=False)


def test_a_slide_a_peer_just_tiled_is_reported_with_its_tiles(tmp_path: Path) -> None:
    slides = _slides(tmp_path, 1)
    out = tmp_path / "tiles"
    cfg = TileConfig(slides_dir=str(slides), output_dir=str(out), workers=1, tiling=TILING)
    assert run_tile(cfg) == 0
    n = len(read_coords(out / "coords" / "s0.h5").coords)
    assert n > 0
    # this process started before the peer wrote s0's coords, and claims s0 after the peer
    task = Task("s0", str(slides / "s0.tiff"), str(out), TILING, None, 900.0, since=0.0)
    row = tile_one(task)
    assert (row["status"], row["n_tiles"], row["reason"]) == (
        "skipped",
        n,
        "tiled by another process",
    )
    assert row["mpp"] == 0.5 and row["mpp_source"]
    assert pd.read_csv(out / "tiling.csv").loc[0, "n_tiles"] == n
    assert not list((out / "coords").glob("*.lock"))


def test_a_read_only_qc_folder_is_named_not_a_temp_file_in_it(tmp_path: Path) -> None:
    """The slides' reasons named '.s0.png.<random>.tmp', a file that never exists. (`tile`
    refuses a read-only qc/ before any work: this is a folder made read-only while it runs.)"""
    slides = _slides(tmp_path, 1)
    out = tmp_path / "tiles"
    qc = out / "qc"
    with read_only_bind(qc):
        row = tile_one(Task("s0", str(slides / "s0.tiff"), str(out), TILING, None, 900.0, 0.0))
    assert row["reason"] == f"OSError: [Errno 30] Read-only file system: '{qc / 's0.png'}'"
