"""Tile reads alone (no model): direct TIFF JPEG-tile decoding vs OpenSlide, per grid layout.

Each case reads every tile of a grid once (first pass, a fresh reader; best of 5; reader
threads as `extract` uses on CPU) through `SlideBatches`, with reader=auto and with
reader=openslide, and prints tiles/s and the ratio. Cases: a grid aligned with the 256-px JPEG
tiles, a 224-px grid that is not (tiles straddle up to four JPEG tiles), the same on a
45k-px-wide level (a JPEG row no longer fits a small cache), and the real Aperio
CMU-1-Small-Region when present; also how many JPEG tiles the direct reader decoded for one
pass (each once is the ideal).

Then 10x from a 40x Aperio SVS (written by tests/slide_writers.py: level 1 is w//4 x h//4, so
its downsample is about 4.001, as on scanners): reader=fast (direct JPEG reads at the
nearest level pixel, ``tiff-jpeg-subpx``) against OpenSlide's resampled reads, in speed, in
pixels (mean absolute difference, next to the JPEG error of the level itself) and in features
(cosine similarity per tile; resnet50_trunc with random weights, which responds to the same pixel
changes a trained one does, only without meaning). Last, 10x from a 0.2527 um/px (Aperio AT2)
slide, whose 4x level is 1.1% coarser than 10x: read there or from level 0, in read and resize
speed and in features.

    python benchmarks/read_tiles.py [at2]   (at2: only the 0.2527 um/px case)
"""

from __future__ import annotations

import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile
import torch
from extract_throughput import make_slide, read_rate
from PIL import Image
from scipy.ndimage import gaussian_filter

from melanoma_mil.config import EncoderConfig
from melanoma_mil.demo.pyramid import write_pyramid
from melanoma_mil.encoders import build_encoder
from melanoma_mil.features.data import SlideBatches
from melanoma_mil.tiling.coords import TileGrid
from melanoma_mil.tiling.slides import choose_level

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from slide_writers import aperio_svs  # noqa: E402

CMU = Path(__file__).resolve().parents[2] / "shared/data/cmu_small_region.svs"


def grid_of(path: Path, width: int, height: int, tile: int) -> TileGrid:
    xs, ys = np.arange(0, width - tile + 1, tile), np.arange(0, height - tile + 1, tile)
    coords = np.array([(x, y) for y in ys for x in xs], np.int64)
    return TileGrid(coords, str(path), 0, 1.0, tile, tile, 0.5, 0.5, {"tile_size": tile})


def tissue(h: int, w: int) -> np.ndarray:
    """40x-like H&E texture: pink/purple at ~30 um, nuclei-sized detail at ~2 um."""
    rng = np.random.default_rng(0)
    low = gaussian_filter(rng.random((h // 64 + 1, w // 64 + 1)), 1.5)
    mask = np.kron((low - low.min()) / np.ptp(low), np.ones((64, 64)))[:h, :w, None]
    detail = gaussian_filter(rng.standard_normal((h, w)), 3)[..., None]
    img = np.array([235, 170, 200]) * (1 - mask) + np.array([120, 70, 150]) * mask
    return np.clip(img + 60 * detail / detail.std(), 0, 255).astype(np.uint8)


def all_tiles(path: Path, grid: TileGrid, reader: str) -> tuple[np.ndarray, str]:
    data = SlideBatches(path, grid, 64, reader)
    tiles = np.concatenate([data.read(i).numpy() for i in range(len(data))])
    used = data.reader
    data.close()
    return tiles, used


def subpixel_case(root: Path) -> None:
    """10x (1.0 um/px, 224 px) from a 40x (0.25 um/px) Aperio slide's ~4.001x level."""
    h, w = 6001, 9002
    img = tissue(h, w)
    svs = aperio_svs(root / "40x.svs", img, mpp=0.25, mag=40)
    with tifffile.TiffFile(svs) as tif:
        lw, lh = tif.pages[1].imagewidth, tif.pages[1].imagelength
    ds = (w / lw + h / lh) / 2  # OpenSlide's level downsample
    choice = choose_level([1.0, ds], 0.25, 1.0, 224)
    step = choice.level0_size
    xs, ys = np.arange(0, w - step, step), np.arange(0, h - step, step)
    coords = np.round([(x, y) for y in ys for x in xs]).astype(np.int64)
    grid = TileGrid(coords, str(svs), choice.level, choice.downsample, choice.read_size, 224,
                    0.25, 1.0, {"tile_size": 224})  # fmt: skip
    fast, slow = (
        read_rate(svs, grid, 64, r, repeats=3, expect=e)
        for r, e in (("fast", "tiff-jpeg-subpx"), ("openslide", "openslide"))
    )
    mine, used = all_tiles(svs, grid, "fast")
    ref, _ = all_tiles(svs, grid, "openslide")
    assert used == "tiff-jpeg-subpx", used
    diff = np.abs(mine.astype(np.float32) - ref.astype(np.float32))
    level = np.asarray(Image.fromarray(img).resize((lw, lh), Image.BILINEAR), np.float32)
    jpeg = []  # the level's own JPEG error: direct reads (stored pixels) vs the level's source
    for k in range(0, len(coords), max(1, len(coords) // 40)):
        lx, ly = round(coords[k, 0] / ds), round(coords[k, 1] / ds)
        src = level[ly : ly + 224, lx : lx + 224]
        jpeg.append(np.abs(mine[k, : src.shape[0], : src.shape[1]] - src).mean())
    enc = build_encoder(EncoderConfig(name="resnet50_trunc", pretrained=False))

    def feats(t: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(t).permute(0, 3, 1, 2)
        return torch.cat([enc.encode(x[i : i + 32], 224, "fp32") for i in range(0, len(x), 32)])

    a, b = feats(mine), feats(ref)
    cos = torch.nn.functional.cosine_similarity(a, b).numpy()
    print(
        f"  10x from 40x Aperio (level downsample {ds:.5f}) {len(coords)} tiles: direct at the "
        f"nearest level pixel {fast:6.0f} tiles/s, OpenSlide (resampled) {slow:6.0f} tiles/s, "
        f"x{fast / slow:.1f}\n"
        f"    pixels vs OpenSlide: mean abs diff {diff.mean():.2f} (of 255), 99th pct "
        f"{np.percentile(diff, 99):.0f}; the level's own JPEG error: "
        f"{np.mean(jpeg):.2f}\n"
        f"    resnet50_trunc features (random weights, fp32): cosine similarity mean "
        f"{cos.mean():.5f}, min {cos.min():.5f}"
    )


def at2_case(root: Path) -> None:
    """10x (1.0 um/px, 224 px) from an Aperio AT2-like 0.2527 um/px slide: its ~4.001x level is
    1.1% coarser than 10x. Read from there (`LEVEL_TOLERANCE` 2%) or from level 0 (1%, before)."""
    h, w, mpp = 6001, 9002, 0.2527
    img = tissue(h, w)
    svs = aperio_svs(root / "at2.svs", img, mpp=mpp, mag=40)
    with tifffile.TiffFile(svs) as tif:
        lw, lh = tif.pages[1].imagewidth, tif.pages[1].imagelength
    ds = (w / lw + h / lh) / 2
    now = choose_level([1.0, ds], mpp, 1.0, 224)
    assert now.level == 1, now
    before = choose_level([1.0], mpp, 1.0, 224)  # the 1% tolerance left level 0 alone
    step = now.level0_size
    xs, ys = np.arange(0, w - step, step), np.arange(0, h - step, step)
    coords = np.round([(x, y) for y in ys for x in xs]).astype(np.int64)
    grids = {
        name: TileGrid(
            coords, str(svs), c.level, c.downsample, c.read_size, 224, mpp, 1.0, {"tile_size": 224}
        )  # fmt: skip
        for name, c in (("level 1", now), ("level 0", before))
    }
    print(f"  10x from 0.2527 um/px Aperio, {len(coords)} tiles of 224 px:")
    for reader in ("auto", "fast"):
        rates = {}
        for name, grid in grids.items():
            used = all_tiles(svs, grid, reader)[1]
            rates[name] = read_rate(svs, grid, 64, reader, repeats=3, expect=used)
            print(f"    reader={reader:5s} {name} (reads of {grid.read_size:3d} px) "
                  f"{rates[name]:6.0f} tiles/s")  # fmt: skip
        print(
            f"    reader={reader}: level 1 / level 0 = x{rates['level 1'] / rates['level 0']:.1f}"
        )
    one, zero = (all_tiles(svs, g, "auto")[0] for g in grids.values())
    enc = build_encoder(EncoderConfig(name="resnet50_trunc", pretrained=False))
    x1, x0 = (torch.from_numpy(t).permute(0, 3, 1, 2) for t in (one, zero))
    for name, x in (("level 1", x1), ("level 0", x0)):  # extract resizes each read to 224 px
        start = time.perf_counter()
        for i in range(0, len(x), 32):
            enc.transform(x[i : i + 32], 224)
        print(
            f"    resize to 224 px, {name}: {len(x) / (time.perf_counter() - start):6.0f} tiles/s"
        )
    f1, f0 = (torch.cat([enc.encode(x[i : i + 32], 224, "fp32") for i in range(0, len(x), 32)])
              for x in (x1, x0))  # fmt: skip
    cos = torch.nn.functional.cosine_similarity(f1, f0).numpy()
    print(f"    level 1 vs level 0 tiles: resnet50_trunc features (random weights, fp32) cosine "
          f"mean {cos.mean():.5f}, min {cos.min():.5f}")  # fmt: skip


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
        if sys.argv[1:] == ["at2"]:
            at2_case(root)
            return
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
        subpixel_case(root)
        at2_case(root)


if __name__ == "__main__":
    main()
