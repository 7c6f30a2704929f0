"""Tile reads alone (no model): direct TIFF JPEG-tile decoding vs OpenSlide, per grid layout.

Each case reads every tile of a grid once (first pass, a fresh reader; best of 5; reader
threads as `extract` uses on CPU) through `SlideBatches`, with reader=auto and with
reader=openslide, and prints tiles/s and the ratio. Cases: a grid aligned with the 256-px JPEG
tiles, a 224-px grid that is not (tiles straddle up to four JPEG tiles), the same on a
45k-px-wide level (a JPEG row no longer fits a small cache), and the real Aperio
CMU-1-Small-Region when present; also how many JPEG tiles the direct reader decoded for one
pass (each once is the ideal).

    python benchmarks/read_tiles.py
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile
import torch
from extract_throughput import make_slide, read_rate

from melanoma_mil.demo.pyramid import write_pyramid
from melanoma_mil.features.data import SlideBatches
from melanoma_mil.tiling.coords import TileGrid

CMU = Path(__file__).resolve().parents[2] / "shared/data/cmu_small_region.svs"


def grid_of(path: Path, width: int, height: int, tile: int) -> TileGrid:
    xs, ys = np.arange(0, width - tile + 1, tile), np.arange(0, height - tile + 1, tile)
    coords = np.array([(x, y) for y in ys for x in xs], np.int64)
    return TileGrid(coords, str(path), 0, 1.0, tile, tile, 0.5, 0.5, {"tile_size": tile})


def decodes(path: Path, grid: TileGrid) -> int:
    """JPEG tiles the direct reader decodes for one pass over ``grid``."""
    data = SlideBatches(path, grid, 64)
    threads = torch.get_num_threads()
    with ThreadPoolExecutor(threads) as pool:
        for i in range(len(data)):
            data.read(i, pool, threads)
    n = data.decodes
    data.close()
    return n


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        square = make_slide(root / "square", 4096)
        wide = root / "wide.tif"
        rng = np.random.default_rng(0)
        pink = np.array([235, 170, 200]) + rng.normal(0, 12, (1536, 45056, 3))
        write_pyramid(wide, np.clip(pink, 0, 255).astype(np.uint8), mpp=0.5, n_levels=1)
        cases = [
            ("4096^2, 256-px grid (aligned)", square, grid_of(square, 4096, 4096, 256)),
            ("4096^2, 224-px grid (unaligned)", square, grid_of(square, 4096, 4096, 224)),
            ("45056 x 1536, 224-px grid", wide, grid_of(wide, 45056, 1536, 224)),
        ]
        if CMU.is_file():
            cases.append(("Aperio CMU, 224-px grid", CMU, grid_of(CMU, 2220, 2967, 224)))
        print(f"{torch.get_num_threads()} reader threads, batch 64, best of 5 first passes")
        for name, path, grid in cases:
            fast, slow = (read_rate(path, grid, 64, r, repeats=5) for r in ("auto", "openslide"))
            with tifffile.TiffFile(path) as tif:
                jpeg_tiles = len(tif.pages[0].dataoffsets)
            print(
                f"  {name:33s} {len(grid.coords):5d} tiles: direct {fast:6.0f} tiles/s, "
                f"OpenSlide {slow:6.0f} tiles/s, x{fast / slow:.1f}; "
                f"{decodes(path, grid)} decodes of {jpeg_tiles} JPEG tiles"
            )


if __name__ == "__main__":
    main()
