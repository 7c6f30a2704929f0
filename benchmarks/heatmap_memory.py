"""`heatmap` drawing on a 100,000-tile slide: memory and time vs a full-resolution canvas.

A 317 x 317 grid of 512 px tiles (a 162,304 px square slide at level 0) is drawn at two
thumbnail sizes, and its QuPath GeoJSON is written (5 fold columns). Peak memory is Python +
numpy allocations (tracemalloc); a full-resolution float32 score canvas, as CLAM-style heatmaps
allocate, would need 4 bytes per level-0 pixel.

    python benchmarks/heatmap_memory.py
"""

from __future__ import annotations

import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from melanoma_mil.inference.attention import AttentionMap, write_geojson
from melanoma_mil.viz.render import draw_heatmap, percentile_scores, score_raster

SIDE, TILE = 317, 512


def main() -> None:
    ys, xs = np.mgrid[0:SIDE, 0:SIDE] * TILE
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)
    rng = np.random.default_rng(0)
    attention = rng.dirichlet(np.ones(len(coords)), size=5)
    extent = SIDE * TILE
    full = extent**2 * 4
    print(
        f"{len(coords)} tiles of {TILE} px, slide {extent} x {extent} px at level 0; "
        f"full-resolution float32 canvas = {full / 1e9:.0f} GB"
    )
    scores = percentile_scores(attention.mean(0))
    with tempfile.TemporaryDirectory() as tmp:
        for side in (1024, 2048):
            thumb = np.full((side, side, 3), 235, np.uint8)
            tissue = np.zeros((side, side), bool)
            tissue[side // 10 : -side // 10, side // 10 : -side // 10] = True
            tracemalloc.start()
            t0 = time.perf_counter()
            raster = score_raster(coords, TILE, scores, extent / side, (side, side))
            draw_heatmap(thumb, raster, tissue, "benchmark", Path(tmp) / f"h{side}.png")
            dt = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            print(
                f"heatmap.png at {side} px: {dt:.2f} s ({len(coords) / dt:.0f} tiles/s), "
                f"peak {peak / 1e6:.0f} MB; peak / full canvas = {peak / full:.1e}"
            )
        amap = AttentionMap(
            "bench",
            coords,
            TILE,
            attention,
            np.full((5, 2), 0.5),
            [f"fold_{k}" for k in range(5)],
            ["a", "b"],
        )
        tracemalloc.start()
        t0 = time.perf_counter()
        write_geojson(Path(tmp) / "tiles.geojson", amap)
        dt = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        size = (Path(tmp) / "tiles.geojson").stat().st_size
        print(
            f"tiles.geojson (5 folds): {dt:.2f} s, {size / 1e6:.0f} MB file, "
            f"peak {peak / 1e6:.1f} MB; peak / file size = {peak / size:.3f}"
        )


if __name__ == "__main__":
    main()
