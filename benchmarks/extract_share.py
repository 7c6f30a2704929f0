"""Load balance of `extract` processes sharing a cohort, against a static split.

Two `extract` processes with one thread each on 9 slides, one of them 4x the others' tiles.
Shared (today): both run on the same coords folder and claim slides, largest first. Static (the
split `extract` used before, ``jobs[rank::world]`` over sorted slide ids): each process gets its
own folder of every other slide. Prints when each process ended, the gap between the two, and
that gap in units of one small slide's encoding time (target: <= 1).

    python benchmarks/extract_share.py [--small-tiles 36] [--tile 128]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from melanoma_mil.demo.pyramid import write_pyramid
from melanoma_mil.tiling.coords import TileGrid, write_coords
from melanoma_mil.tiling.fingerprint import slide_fingerprint

ROOT = Path(__file__).resolve().parents[1]


def cohort(root: Path, small: int, tile: int) -> Path:
    """s0 (4x the tiles) and s1..s8, tiled on a regular grid at level 0."""
    rng = np.random.default_rng(0)
    for i in range(9):
        n = int(round(np.sqrt(small * (4 if i == 0 else 1))))
        side = n * tile
        blocks = rng.integers(0, 255, (side // 32, side // 32, 3), dtype=np.uint8)
        slide = root / "slides" / f"s{i}.tif"
        slide.parent.mkdir(parents=True, exist_ok=True)
        write_pyramid(slide, np.kron(blocks, np.ones((32, 32, 1), np.uint8)), 0.5, n_levels=1)
        xs = np.arange(0, side - tile + 1, tile)
        coords = np.array([(x, y) for y in xs for x in xs], np.int64)
        grid = TileGrid(coords, str(slide.resolve()), 0, 1.0, tile, tile, 0.5, 0.5,
                        {"mpp": 0.5, "tile_size": tile, "overlap": 0},
                        fingerprint=slide_fingerprint(slide))  # fmt: skip
        write_coords(root / "tiles" / "coords" / f"s{i}.h5", grid)
    return root / "tiles"


def run_two(coords: list[Path], out: Path) -> list[float]:
    """Start two extract processes at once; seconds until each one ended."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "melanoma_mil", "extract", f"output_dir={out}",
           "encoder.name=resnet18_imagenet", "encoder.pretrained=false", "device=cpu",
           "batch_size=16", "num_workers=0"]  # fmt: skip
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [*cmd, f"coords_dir={c}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )  # fmt: skip
        for c in coords
    ]
    ends: list[float | None] = [None, None]
    while any(e is None for e in ends):
        for i, p in enumerate(procs):
            if ends[i] is None and p.poll() is not None:
                assert p.returncode == 0, p.returncode
                ends[i] = time.perf_counter() - start
        time.sleep(0.05)
    return [e for e in ends if e is not None]


def small_slide_seconds(out: Path) -> float:
    rows = pd.concat(pd.read_csv(p) for p in out.glob("*/extract.csv"))
    return float(rows[(rows["slide_id"] != "s0") & (rows["status"] == "ok")]["seconds"].median())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small-tiles", type=int, default=36)
    ap.add_argument("--tile", type=int, default=128)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiles = cohort(root, args.small_tiles, args.tile)
        static = []
        for rank in range(2):  # the old split: sorted ids, every other one
            folder = root / f"static{rank}" / "coords"
            folder.mkdir(parents=True)
            for path in sorted((tiles / "coords").glob("*.h5"))[rank::2]:
                shutil.copy(path, folder / path.name)
            static.append(folder.parent)
        print(f"9 slides: s0 {4 * args.small_tiles} tiles, s1-s8 {args.small_tiles} tiles of "
              f"{args.tile} px; resnet18 (random weights), 2 processes x 1 thread")  # fmt: skip
        for name, coords, out in (
            ("shared (claims, largest first)", [tiles, tiles], root / "f_shared"),
            ("static split (jobs[rank::2])", static, root / "f_static"),
        ):
            ends = run_two(coords, out)
            unit = small_slide_seconds(out)
            gap = abs(ends[0] - ends[1])
            print(f"  {name:32s} ended at {ends[0]:6.1f} s and {ends[1]:6.1f} s: gap {gap:5.1f} s"
                  f" = {gap / unit:4.1f} small-slide times ({unit:.1f} s each)")  # fmt: skip


if __name__ == "__main__":
    main()
