"""`tile`'s contact sheet built as before (every QC PNG decoded, nothing kept), cold (every QC
PNG decoded, each cell kept in .qc_cells) and warm (the kept cells), on synthetic QC PNGs
of the size `tile` writes.

    python benchmarks/contact_sheet.py [--slides 500] [--dir /tmp/melanoma_mil_sheet]

Prints the times and their ratios, and checks that the sheets are pixel-identical.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from melanoma_mil.tiling.qc import CELLS, MAX_SIDE, contact_sheet, write_qc


def _qc_pngs(folder: Path, n: int) -> list[tuple[str, Path | None, str]]:
    """``n`` QC-like PNGs (long side MAX_SIDE): smooth blotches with a little grain, which PNG
    squeezes about as much as a slide overview, neither to nothing (flat) nor not at all (noise)."""
    rng = np.random.default_rng(0)
    size = (MAX_SIDE, MAX_SIDE * 3 // 4)
    blotches = Image.fromarray(rng.integers(120, 250, (24, 32, 3), dtype=np.uint8))
    grain = rng.integers(0, 2, (size[1], size[0], 3), dtype=np.uint8)
    base = np.asarray(blotches.resize(size, Image.BILINEAR)) + grain
    cells: list[tuple[str, Path | None, str]] = []
    for i in range(n):
        path = folder / f"slide_{i:05d}.png"
        write_qc(path, Image.fromarray(np.roll(base, 37 * i, axis=1)))
        cells.append((path.stem, path, f"{i}"))
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=500)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/melanoma_mil_sheet"))
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    qc = args.dir / "qc"
    start = time.perf_counter()
    cells = _qc_pngs(qc, args.slides)
    print(f"{args.slides} QC PNGs written in {time.perf_counter() - start:.1f} s")
    times, sheets = {}, []
    for run, cache in (("uncached", None), ("cold", args.dir / CELLS), ("warm", args.dir / CELLS)):
        start = time.perf_counter()
        sheet = contact_sheet(cells, args.dir / f"sheet_{run}.png", cache=cache)
        times[run] = time.perf_counter() - start
        sheets.append(np.asarray(sheet))
        print(f"{run}: {times[run]:.2f} s")
    assert all(np.array_equal(sheets[0], s) for s in sheets), "the sheets differ"
    print(f"cold / warm: {times['cold'] / times['warm']:.1f}x, uncached / warm: "
          f"{times['uncached'] / times['warm']:.1f}x (sheets pixel-identical)")  # fmt: skip


if __name__ == "__main__":
    main()
