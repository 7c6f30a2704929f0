"""`tile` throughput and peak memory on a 40k x 40k pyramidal slide and on the CMU Aperio slide.

    python benchmarks/tile_throughput.py [--size 40000] [--cache /tmp/melanoma_mil_bench]

The big slide (0.25 um/px, levels 1/4/16, JPEG) repeats a synthetic tissue patch and is cached.
Each measurement runs in a fresh process so its peak RSS is the tiling's own: level 0 of the big
slide is 4.8 GB of RGB, so a peak of a few hundred MB shows the thumbnail never loads level 0.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

CMU = Path(__file__).resolve().parents[2] / "shared/data/cmu_small_region.svs"
PATTERN = 4096  # level-0 px period of the repeated tissue patch
LEVELS = (1, 4, 16)
TILE = 256


def _tiles(pattern: np.ndarray, shape: tuple[int, int]) -> Iterator[np.ndarray]:
    """Row-major 256 px tiles of ``pattern`` repeated over ``shape`` (edge tiles padded)."""
    period = pattern.shape[0]
    for ty in range(0, shape[0], TILE):
        for tx in range(0, shape[1], TILE):
            y, x = ty % period, tx % period
            yield pattern[y : y + TILE, x : x + TILE]


def make_big_slide(path: Path, size: int) -> None:
    """A ``size``-square BigTIFF pyramid built tile by tile (never all of level 0 in memory)."""
    from melanoma_mil.demo.synth import synth_slide

    rgb, _ = synth_slide(np.random.default_rng(0), PATTERN, immune_high=True)
    tmp = path.with_suffix(".part")
    res = 1e4 / 0.25  # px per cm at 0.25 um/px
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for i, ds in enumerate(LEVELS):
            pattern = np.asarray(Image.fromarray(rgb).resize((PATTERN // ds,) * 2, Image.BOX))
            shape = (-(-size // ds), -(-size // ds))
            tif.write(_tiles(pattern, shape), shape=(*shape, 3), dtype=np.uint8,
                      tile=(TILE, TILE), photometric="rgb", compression="jpeg",
                      compressionargs={"level": 85}, resolution=(res / ds, res / ds),
                      resolutionunit="CENTIMETER", subfiletype=1 if i else 0)  # fmt: skip
    tmp.rename(path)


def _peak_rss_mb() -> float:
    """Peak RSS of this process image (VmHWM; ru_maxrss would include the parent's peak)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(path: str, mpp: float, tile_size: int, reps: int) -> None:
    """Tile ``path`` ``reps`` times in this process; print timings and memory as JSON."""
    from melanoma_mil.config import TilingConfig
    from melanoma_mil.tiling.grid import tile_slide
    from melanoma_mil.tiling.qc import qc_image
    from melanoma_mil.tiling.slides import open_slide

    cfg = TilingConfig(mpp=mpp, tile_size=tile_size)
    base_rss = _peak_rss_mb()
    tracemalloc.start()
    seconds, n_tiles = [], 0
    for _ in range(reps):
        start = time.perf_counter()
        slide = open_slide(path)
        tiles = tile_slide(slide, path, "bench", cfg)
        qc_image(tiles, "bench")  # the QC drawing is part of every slide's cost
        slide.close()
        seconds.append(time.perf_counter() - start)
        n_tiles = len(tiles.grid.coords)
    _, traced_peak = tracemalloc.get_traced_memory()
    w, h = open_slide(path).dimensions
    result = {"seconds": float(np.median(seconds)), "tiles": n_tiles, "dims": [w, h],
              "level": tiles.grid.patch_level, "base_rss_mb": base_rss,
              "peak_rss_mb": _peak_rss_mb(), "traced_peak_mb": traced_peak / 2**20}  # fmt: skip
    print(json.dumps(result))


def measure(path: Path, mpp: float, tile_size: int, reps: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(path), str(mpp), str(tile_size), str(reps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(name: str, r: dict) -> None:
    level0_mb = r["dims"][0] * r["dims"][1] * 3 / 2**20
    print(
        f"{name}: {r['dims'][0]}x{r['dims'][1]} px, {r['tiles']} tiles (level {r['level']}), "
        f"{r['seconds']:.2f} s/slide = {1 / r['seconds']:.2f} slides/s, "
        f"{r['tiles'] / r['seconds']:.0f} tiles/s\n"
        f"  memory: peak RSS {r['peak_rss_mb']:.0f} MB (after imports {r['base_rss_mb']:.0f} MB),"
        f" numpy/Python peak {r['traced_peak_mb']:.0f} MB; level 0 as RGB = {level0_mb:.0f} MB;"
        f" (peak RSS - imports) / level 0 = {(r['peak_rss_mb'] - r['base_rss_mb']) / level0_mb:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=40_000)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/melanoma_mil_bench"))
    parser.add_argument("--child", nargs=4, metavar=("PATH", "MPP", "TILE", "REPS"))
    args = parser.parse_args()
    if args.child:
        path, mpp, tile_size, reps = args.child
        child(path, float(mpp), int(tile_size), int(reps))
        return
    args.cache.mkdir(parents=True, exist_ok=True)
    big = args.cache / f"synthetic_{args.size}.tiff"
    if not big.is_file():
        start = time.perf_counter()
        make_big_slide(big, args.size)
        print(f"generated {big} ({big.stat().st_size / 2**20:.0f} MB) in "
              f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    for mpp in (0.5, 1.0):
        report(f"synthetic 40x slide, tiling.mpp={mpp}, tile 256", measure(big, mpp, 256, 2))
    if CMU.is_file():
        for mpp in (0.5, 1.0):
            report(f"CMU Aperio slide, tiling.mpp={mpp}, tile 256", measure(CMU, mpp, 256, 5))
    else:
        print(f"CMU slide not found at {CMU}: skipped")


if __name__ == "__main__":
    main()
