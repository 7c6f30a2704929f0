"""Direct TIFF JPEG-tile reads give exactly OpenSlide's pixels, or are not used at all."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from conftest import CMU, textured

from melanoma_mil.config import ExtractConfig
from melanoma_mil.demo.pyramid import write_pyramid
from melanoma_mil.errors import UserError
from melanoma_mil.features.data import SlideBatches, to_rgb
from melanoma_mil.features.run import run_extract
from melanoma_mil.features.tiffjpeg import open_fast_tiles
from melanoma_mil.tiling.coords import TileGrid


def openslide_tile(slide: openslide.OpenSlide, x: int, y: int, level: int, size: int) -> np.ndarray:
    return to_rgb(np.asarray(slide.read_region((x, y), level, (size, size))))


def check_positions(path: Path, level: int, size: int, positions: list[tuple[int, int]]) -> int:
    """Compare direct reads to OpenSlide at ``positions``; returns how many were served direct."""
    slide = openslide.OpenSlide(path)
    fast = open_fast_tiles(path, slide, level, size, positions[:2])
    assert fast is not None, f"{path} level {level} should be read directly"
    served = 0
    for x, y in positions:
        tile = fast.read(x, y, size)
        if tile is None:
            continue
        served += 1
        np.testing.assert_array_equal(tile, openslide_tile(slide, x, y, level, size), f"{x},{y}")
    fast.close()
    slide.close()
    return served


@pytest.mark.skipif(not CMU.is_file(), reason=f"real Aperio slide not found at {CMU}")
def test_aperio_svs_reads_match_openslide_exactly() -> None:
    rng = np.random.default_rng(1)
    w, h = 2220, 2967
    inside = [(int(x), int(y)) for x, y in rng.integers(0, [w - 224, h - 224], (40, 2))]
    edges = [(w - 100, h - 50), (-30, 10), (0, 0), (w - 224, 0), (480, 720), (w + 5, 0)]
    assert check_positions(CMU, 0, 224, inside + edges) == len(inside + edges)


def test_generic_tiff_all_levels_match_and_fractional_offsets_defer(tmp_path: Path) -> None:
    path = tmp_path / "s.tif"
    write_pyramid(path, textured(1000, 1300), mpp=0.5, n_levels=3)
    rng = np.random.default_rng(2)
    level0 = [(int(x), int(y)) for x, y in rng.integers(-50, 1200, (30, 2))]
    assert check_positions(path, 0, 256, level0) == 30
    even = [(x - x % 2, y - y % 2) for x, y in level0]
    assert check_positions(path, 1, 128, even) == 30  # 1000 / 500 = exactly 2
    odd = [(x | 1, y | 1) for x, y in level0]  # level offset x / 2 is fractional
    assert check_positions(path, 1, 128, even[:2] + odd) == 2


def test_odd_sized_pyramid_level_falls_back_to_openslide(tmp_path: Path) -> None:
    path = tmp_path / "odd.tif"
    write_pyramid(path, textured(1001, 777), mpp=0.5, n_levels=2)
    slide = openslide.OpenSlide(path)
    assert slide.level_downsamples[1] != 2.0
    fast = open_fast_tiles(path, slide, 1, 128, [(0, 0)])
    assert fast is not None and fast.read(2, 2, 128) is None  # 2 / 2.00x is not a level pixel


def test_non_jpeg_tiff_and_forced_openslide_give_identical_batches(tmp_path: Path) -> None:
    img = textured(700, 900)
    zlib = tmp_path / "zlib.tif"
    with tifffile.TiffWriter(zlib, bigtiff=True) as tif:
        tif.write(img, tile=(256, 256), photometric="rgb", compression="zlib",
                  resolution=(2e4, 2e4), resolutionunit="CENTIMETER")  # fmt: skip
    jpeg = tmp_path / "jpeg.tif"
    write_pyramid(jpeg, img, mpp=0.5, n_levels=2)
    xs = np.arange(-20, 700, 150)
    coords = np.array([(x, y) for y in xs for x in xs], np.int64)
    for path, expected in ((zlib, "openslide"), (jpeg, "tiff-jpeg")):
        grid = TileGrid(coords, str(path), 0, 1.0, 224, 224, 0.5, 0.5, {"tile_size": 224})
        auto = SlideBatches(path, grid, 16)
        forced = SlideBatches(path, grid, 16, reader="openslide")
        for i in range(len(auto)):
            np.testing.assert_array_equal(auto.read(i).numpy(), forced.read(i).numpy())
        assert (auto.reader, forced.reader) == (expected, "openslide")
        auto.close()
        forced.close()


def test_unknown_reader_is_refused_before_any_work() -> None:
    with pytest.raises(UserError, match=r"reader='pillow' is not one of auto\|fast\|openslide"):
        run_extract(ExtractConfig(reader="pillow"))


def test_threads_decode_each_jpeg_tile_once_on_an_unaligned_grid(tmp_path: Path) -> None:
    path = tmp_path / "s.tif"
    img = textured(1000, 1300)
    write_pyramid(path, img, mpp=0.5, n_levels=1)
    xs, ys = np.arange(0, 1300 - 224 + 1, 224), np.arange(0, 1000 - 224 + 1, 224)
    coords = np.array([(x, y) for y in ys for x in xs], np.int64)  # 5 x 4 tiles over 6 x 4
    grid = TileGrid(coords, str(path), 0, 1.0, 224, 224, 0.5, 0.5, {"tile_size": 224})
    data = SlideBatches(path, grid, 20)
    with ThreadPoolExecutor(4) as pool:
        tiles = data.read(0, pool, 4).numpy()
    assert data.reader == "tiff-jpeg"
    assert data.decodes == 20  # 5 x 4 JPEG tiles touched, each decoded once
    for (x, y), tile in zip(coords, tiles, strict=True):
        np.testing.assert_array_equal(tile, img_via_openslide(path, int(x), int(y)))
    data.close()


def img_via_openslide(path: Path, x: int, y: int) -> np.ndarray:
    slide = openslide.OpenSlide(path)
    try:
        return openslide_tile(slide, x, y, 0, 224)
    finally:
        slide.close()
