"""`heatmap`: fold attention on real slides, bounded-memory drawing, localisation scores.

The end-to-end tests share the session's tiny real pipeline (`pipe` in conftest.py).
"""

from __future__ import annotations

import json
import math
import shutil
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TILE, Pipeline
from omegaconf import OmegaConf
from PIL import Image

from melanoma_mil.config import (
    HeatmapConfig,
    load_config,
)
from melanoma_mil.data.bags import read_bag
from melanoma_mil.evaluation.localisation import (
    cohort_localisation,
    localisation_score,
    slide_localisation,
    tile_fractions,
)
from melanoma_mil.inference.attention import (
    AttentionMap,
    read_attention,
    write_attention,
    write_geojson,
)
from melanoma_mil.inference.ensemble import Ensemble
from melanoma_mil.inference.heatmap import run_heatmap
from melanoma_mil.rundir import load_run
from melanoma_mil.tiling.coords import read_coords
from melanoma_mil.tiling.slides import open_slide, read_tile
from melanoma_mil.viz.render import BAR_PX, TITLE_PX, draw_heatmap, montage_size, score_raster


def heatmap_cfg(pipe: Pipeline, out: Path, *extra: str) -> HeatmapConfig:
    keys = [
        f"run_dir={pipe.run_dir}",
        f"slides_dir={pipe.slides}",
        f"output_dir={out}",
        f"features_dir={pipe.features}",
        "device=cpu",
        "thumbnail_size=512",
        "top_k=4",
    ]
    return load_config(HeatmapConfig, [], [*keys, *extra])


def test_attention_of_every_fold_model_sums_to_one(pipe: Pipeline) -> None:
    run = load_run(pipe.run_dir)
    ensemble = Ensemble(run, torch.device("cpu"))
    feats, _ = read_bag(pipe.features / "slide_000.h5")
    probs, attention = ensemble(feats)
    assert attention.shape == (2, len(feats)) and probs.shape == (2, 2)
    np.testing.assert_allclose(attention.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (attention > 0).all() and attention.std(1).min() > 0  # not a constant map


def test_heatmap_files_sizes_geojson_and_rerun(pipe: Pipeline, tmp_path: Path) -> None:
    out = tmp_path / "hm"
    ids = ["slide_000", "slide_001"]
    cfg = heatmap_cfg(pipe, out, f"slide_ids={json.dumps(ids)}", "geojson=true")
    assert run_heatmap(cfg) == 0
    table = pd.read_csv(out / "heatmaps.csv")
    assert table["slide_id"].tolist() == ids and (table["status"] == "ok").all()
    sid = "slide_000"
    amap = read_attention(out / sid / "attention.h5")
    grid = read_coords(pipe.features / f"{sid}.h5")
    n = len(grid.coords)
    with h5py.File(out / sid / "attention.h5", "r") as f:
        assert f["coords"].shape == (n, 2) and f["attention_folds"].shape == (n, 2)
        np.testing.assert_allclose(f["attention_folds"][:].sum(0), 1.0, atol=1e-5)
        np.testing.assert_allclose(f["attention"][:], f["attention_folds"][:].mean(1), atol=1e-6)
        assert 0.0 <= f.attrs["prob"] <= 1.0
    # heatmap: the 512 px thumbnail (1024 px slide) plus colour bar and title margins
    assert Image.open(out / sid / "heatmap.png").size == (512 + BAR_PX, 512 + TITLE_PX)
    # montage: 2 rows of 4 full-resolution tiles; the first is the most attended tile, exactly
    montage = Image.open(out / sid / "montage.png").convert("RGB")
    assert montage.size == montage_size(4, TILE)
    top = int(np.argmax(amap.mean_attention))
    slide = open_slide(pipe.slides / f"{sid}.tiff")
    expected = np.asarray(read_tile(slide, grid, *grid.coords[top]))
    slide.close()
    left, upper = 6, 6 + 18  # GAP_PX, GAP_PX + LABEL_PX
    got = np.asarray(montage)[upper : upper + TILE, left : left + TILE]
    np.testing.assert_array_equal(got, expected)
    # GeoJSON: one level-0 polygon per tile, attention as QuPath measurements
    gj = json.loads((out / sid / "tiles.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == n
    ring = gj["features"][0]["geometry"]["coordinates"][0]
    x, y = grid.coords[0]
    s = grid.level0_size
    assert ring == [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
    total = sum(f["properties"]["measurements"]["attention"] for f in gj["features"])
    assert total == pytest.approx(1.0, abs=1e-4)
    # a rerun keeps existing heatmaps, and its table still holds every slide's result
    before = (out / sid / "heatmap.png").stat().st_mtime_ns
    assert run_heatmap(cfg) == 0
    again = pd.read_csv(out / "heatmaps.csv")
    assert set(again["status"]) == {"skipped"}
    assert (out / sid / "heatmap.png").stat().st_mtime_ns == before
    same = ["slide_id", "n_tiles", "prob", "prob_fold_0", "prob_fold_1", "pred", "heatmap",
            "montage", "geojson"]  # fmt: skip
    pd.testing.assert_frame_equal(again[same], table[same])


def test_failed_slides_are_explained_when_heatmap_ends(
    pipe: Pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A feature cache without these slides fails every one (exit 1); the command names the
    reason, a few ids and the table, not only a status count."""
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(pipe.features / "slide_000.h5", cache)
    ids = [f"slide_{i:03d}" for i in range(1, 9)]
    out = tmp_path / "hm"
    cfg = heatmap_cfg(pipe, out, f"features_dir={cache}", f"slide_ids={json.dumps(ids)}")
    assert run_heatmap(cfg) == 1
    printed = capsys.readouterr().out
    reason = pd.read_csv(out / "heatmaps.csv")["reason"].iloc[0]
    assert f"no features for it in '{cache}'" in reason
    lines = [line for line in printed.splitlines() if reason in line]
    assert len(lines) == 1, printed  # one line per reason, not per slide
    assert "slide_001, slide_002" in lines[0] and "3 more" in lines[0]
    assert "8 failed of 8 slides" in printed and str(out / "heatmaps.csv") in printed


def test_100k_tile_slide_renders_without_a_full_resolution_canvas(tmp_path: Path) -> None:
    side = 317  # 100,489 tiles of 512 level-0 px: a 162,304 px wide slide
    ys, xs = np.mgrid[0:side, 0:side] * 512
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)
    scores = (xs.ravel() / xs.max()).astype(np.float32)  # left to right 0 -> 1
    thumb = np.full((1024, 1024, 3), 230, np.uint8)
    ds = side * 512 / 1024
    tracemalloc.start()
    raster = score_raster(coords, 512, scores, ds, thumb.shape[:2])
    draw_heatmap(thumb, raster, None, "100k tiles", tmp_path / "big.png")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    full_canvas = (side * 512) ** 2 * 4  # one float32 per level-0 pixel: ~105 GB
    assert peak < 200e6, f"peak {peak / 1e6:.0f} MB"
    assert peak < full_canvas / 500
    assert Image.open(tmp_path / "big.png").size == (1024 + BAR_PX, 1024 + TITLE_PX)
    assert not np.isnan(raster).any()
    assert raster[500, 0] == pytest.approx(0.0, abs=0.01)
    assert raster[500, 1023] == pytest.approx(1.0, abs=0.01)
    assert raster[500, 512] == pytest.approx(0.5, abs=0.01)


def test_geojson_writes_a_nan_as_null_and_numpy_sizes_as_numbers(tmp_path: Path) -> None:
    """Each feature is strict JSON: a NaN attention is null (QuPath and jq refuse NaN) and a
    tile size read back from h5 (a numpy integer) is written as a plain number."""
    att = np.array([[0.25, np.nan, 0.75], [0.5, 0.25, 0.25]], np.float32)
    coords = np.array([[0, 0], [256, 0], [0, 256]], np.int64)
    amap = AttentionMap(
        "s", coords, np.int64(256), att, np.full((2, 2), 0.5), ["a", "b"], ["x", "y"]
    )
    write_geojson(tmp_path / "t.geojson", amap)

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in the GeoJSON")

    gj = json.loads((tmp_path / "t.geojson").read_text(), parse_constant=refuse)
    first, second = (f["properties"]["measurements"] for f in gj["features"][:2])
    assert first == {"attention": 0.375, "attention_percentile": None, "attention_a": 0.25,
                     "attention_b": 0.5}  # fmt: skip
    assert second["attention"] is None and second["attention_a"] is None
    assert gj["features"][2]["geometry"]["coordinates"][0][2] == [256, 512]


def test_score_raster_averages_overlaps_and_leaves_gaps_empty() -> None:
    coords = np.array([[0, 0], [50, 0], [300, 300]])
    raster = score_raster(coords, 100, np.array([1.0, 3.0, 5.0]), 10.0, (40, 40))
    assert raster[2, 2] == 1.0 and raster[2, 7] == 2.0 and raster[2, 12] == 3.0
    assert raster[32, 32] == 5.0 and np.isnan(raster[20, 20])


def grid4() -> np.ndarray:
    """A 4 x 4 grid of 100 px tiles (row-major), as level-0 top-left corners."""
    ys, xs = np.mgrid[0:4, 0:4] * 100
    return np.stack([xs.ravel(), ys.ravel()], 1)


def test_localisation_score_known_answers() -> None:
    coords = grid4()
    region = np.zeros((40, 40), bool)  # downsample 10: tile (col, row) = mask[10r:10r+10, ...]
    region[0:10, 0:20] = True  # tiles 0 and 1: 2 of 16 tiles
    uniform = np.full(16, 1 / 16)
    assert localisation_score(coords, 100, uniform, region, 10) == pytest.approx(1.0)
    on_first = np.eye(16)[0]
    assert localisation_score(coords, 100, on_first, region, 10) == pytest.approx(8.0)
    half = np.full(16, 0.5 / 15)
    half[0] = 0.5  # 0.5 + 0.5/15 of the mass inside, 1/8 of the tissue
    expected = (0.5 + 0.5 / 15) / (2 / 16)
    assert localisation_score(coords, 100, half, region, 10) == pytest.approx(expected)
    # unnormalised weights give the same score
    assert localisation_score(coords, 100, half * 7, region, 10) == pytest.approx(expected)
    # partial tile: half of tile 10 (col 2, row 2) is region too
    region[20:25, 20:30] = True
    np.testing.assert_allclose(
        tile_fractions(coords, 100, region, 10)[[0, 1, 10, 11]], [1, 1, 0.5, 0]
    )
    assert localisation_score(coords, 100, np.eye(16)[10], region, 10) == pytest.approx(
        0.5 / (2.5 / 16)
    )
    # nearly flat attention that ranks tiles 0 and 5 first: chance by mass, 4x by ranking
    region[20:25] = False
    flat = np.ones(16)
    flat[[0, 5]] = 1.01
    assert localisation_score(coords, 100, flat, region, 10) == pytest.approx(1.0, abs=0.01)
    top = localisation_score(coords, 100, flat, region, 10, top_fraction=2 / 16)
    assert top == pytest.approx(0.5 / (2 / 16))
    # a tissue mask (other resolution): the top half of the slide is tissue
    tissue = np.zeros((20, 20), bool)
    tissue[:10] = True
    assert localisation_score(coords, 100, on_first, region, 10, tissue) == pytest.approx(4.0)
    assert math.isnan(localisation_score(coords, 100, uniform, np.zeros((40, 40), bool), 10))


def test_demo_slide_localisation_from_attention_h5(pipe: Pipeline, tmp_path: Path) -> None:
    cohort = pipe.cohort
    high = cohort[cohort["label"] == "immune_high"].iloc[0]
    low = cohort[cohort["label"] == "immune_low"].iloc[0]
    mask = np.asarray(Image.open(high["mask_path"])) > 0
    for row, name in ((high, "uniform"), (low, "uniform"), (high, "oracle")):
        grid = read_coords(pipe.features / f"{row['slide_id']}.h5")
        n = len(grid.coords)
        inside = tile_fractions(grid.coords, grid.level0_size, mask, 16)
        attention = np.full(n, 1 / n) if name == "uniform" else np.eye(n)[np.argmax(inside)]
        amap = AttentionMap(
            row["slide_id"],
            grid.coords,
            grid.level0_size,
            attention[None],
            np.array([[0.5, 0.5]]),
            ["fold_0"],
            ["a", "b"],
        )
        h5 = tmp_path / name / row["slide_id"] / "attention.h5"
        write_attention(h5, amap)
        score = slide_localisation(h5, row["mask_path"], row["mask_downsample"])
        if row is low:
            assert math.isnan(score)  # no planted regions
        elif name == "uniform":
            assert score == pytest.approx(1.0)
        else:
            assert score == pytest.approx(inside.max() / inside.mean()) and score >= 3
    table = cohort_localisation(pipe.root / "cohort" / "cohort.csv", tmp_path / "uniform")
    assert sorted(table["slide_id"]) == sorted([high["slide_id"], low["slide_id"]])
    uniform_high = table.set_index("slide_id").loc[high["slide_id"]]
    assert uniform_high["localisation"] == pytest.approx(1.0)
    assert not math.isnan(uniform_high["localisation_top"])


def test_heatmaps_logged_to_wandb_offline_when_the_run_used_wandb(
    pipe: Pipeline, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(pipe.run_dir, run_dir)
    config = OmegaConf.load(run_dir / "config.yaml")
    config.logger, config.wandb.mode = "wandb", "offline"
    OmegaConf.save(config, run_dir / "config.yaml")
    out = tmp_path / "hm"
    cfg = heatmap_cfg(pipe, out, f"run_dir={run_dir}", "slide_ids=[slide_002]")
    assert run_heatmap(cfg) == 0
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
