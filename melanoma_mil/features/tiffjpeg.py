"""Direct reads of JPEG-tiled TIFF levels (generic TIFF, Aperio SVS), ~3x cheaper than OpenSlide.

OpenSlide decodes a JPEG tile, composites it through cairo into premultiplied ARGB and Python
converts that back to RGBA: for a 256-px tile that costs ~1.5 ms, against ~0.45 ms for the JPEG
decode alone (libjpeg-turbo via imagecodecs), and on a 2-core CPU every read millisecond is taken
from the encoder. This reader decodes the level's JPEG tiles itself and crops them
(`tiling.tiffpages`). It is only used for a whitelisted vendor, a level stored as one tiled 8-bit
RGB/YCbCr JPEG page of exactly the level's size, and probe tiles that match OpenSlide.

Reduced levels of 40x scans have non-integer downsamples (e.g. 4.0002, from rounded level
sizes), so a level-0 tile corner falls between level pixels and OpenSlide resamples the region
by that sub-pixel offset. In ``subpixel`` mode this reader takes the nearest level pixel instead
(<= 0.5 px away): the same tissue, not the same bits (the difference is measured in
`benchmarks/read_tiles.py`); otherwise (reader=auto) those reads are left to OpenSlide.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import openslide
import tifffile

from melanoma_mil.tiling.tiffpages import TiffTiles, is_jpeg_rgb

log = logging.getLogger(__name__)

# Vendors whose levels are plain tiled TIFF pages; others (Ventana overlaps, Philips sparse
# tiles, Leica multi-image) place tiles in ways only OpenSlide knows.
VENDORS = ("generic-tiff", "aperio")


class FastTiles:
    """One OpenSlide level read straight from its TIFF page's JPEG tiles."""

    def __init__(
        self, path: Path, page: tifffile.TiffPage, read_size: int, downsample: float, subpixel: bool
    ) -> None:
        self.tiles = TiffTiles(path, page, read_size)
        self.downsample = downsample
        self.subpixel = subpixel

    @property
    def decodes(self) -> int:
        return self.tiles.decodes

    def read(self, x: int, y: int, size: int) -> np.ndarray | None:
        """Tile at level-0 (x, y); where the level offset is fractional, the nearest level
        pixel's tile in subpixel mode, else None (OpenSlide resamples those)."""
        lx, ly = x / self.downsample, y / self.downsample
        if not self.subpixel and (lx != int(lx) or ly != int(ly)):
            return None
        return self.tiles.region(round(lx), round(ly), size, size)

    def close(self) -> None:
        self.tiles.close()


def _level_page(path: Path, dims: tuple[int, int]) -> tifffile.TiffPage | None:
    """The one tiled 8-bit RGB/YCbCr JPEG page of size ``dims`` (w, h), if the file has it."""
    with tifffile.TiffFile(path) as tif:
        pages = [p for p in tif.pages if isinstance(p, tifffile.TiffPage)]
        same = [p for p in pages if (p.imagewidth, p.imagelength) == dims]
        if len(same) != 1:
            return None
        p = same[0]
        return p if p.is_tiled and is_jpeg_rgb(p) else None


def open_fast_tiles(
    path: Path,
    slide: openslide.OpenSlide,
    level: int,
    size: int,
    probes: Sequence[tuple[int, int]],
    subpixel: bool = False,
) -> FastTiles | None:
    """A verified direct reader for ``level`` of ``slide``, or None (then OpenSlide reads).

    ``probes`` are level-0 tile positions of this slide's grid, read both ways: where the level
    offset is integral they must match bit for bit (so reader=auto never changes a feature);
    fractional ones (subpixel mode) must be closer to OpenSlide's pixels than the same read one
    pixel off. The level's origin is always probed exactly.
    """
    if getattr(slide, "backend", "openslide") != "openslide":
        return None
    if slide.properties.get(openslide.PROPERTY_NAME_VENDOR) not in VENDORS:
        return None
    try:
        page = _level_page(path, slide.level_dimensions[level])
    except (tifffile.TiffFileError, OSError, ValueError) as e:
        log.debug("%s: no direct TIFF reads (%s)", path, e)
        return None
    if page is None:
        return None
    fast = FastTiles(path, page, size, slide.level_downsamples[level], subpixel)
    try:
        for x, y in [(0, 0), *probes]:
            mine = fast.read(x, y, size)
            ref = np.asarray(slide.read_region((x, y), level, (size, size)))
            if mine is None:
                continue
            exact = x / fast.downsample == int(x / fast.downsample) and (
                y / fast.downsample == int(y / fast.downsample)
            )
            if not (_same(mine, ref) if exact else _aligned(mine, ref)):
                raise ValueError(f"probe tile ({x}, {y}) differs from OpenSlide")
    except (ValueError, RuntimeError, OSError) as e:  # imagecodecs raises its own *Error types
        log.info("%s: reading through OpenSlide (direct JPEG reads unverified: %s)", path, e)
        fast.close()
        return None
    return fast


def _same(rgb: np.ndarray, rgba: np.ndarray) -> bool:
    """Equal where OpenSlide is opaque, white where it is transparent (what `to_rgb` makes)."""
    opaque = rgba[..., 3] == 255
    clear = rgba[..., 3] == 0
    if not (opaque | clear).all():
        return False
    return bool((rgb[opaque] == rgba[..., :3][opaque]).all() and (rgb[clear] == 255).all())


def _aligned(rgb: np.ndarray, rgba: np.ndarray) -> bool:
    """``rgb`` is OpenSlide's resampled region to within a pixel: it matches OpenSlide's pixels
    better unshifted than shifted by one pixel either way (a wrong decode or offset fails)."""
    ref = rgba[..., :3].astype(np.float32)
    mine = rgb.astype(np.float32)
    core = (slice(1, -1), slice(1, -1))
    err = {
        (dx, dy): float(np.abs(np.roll(mine, (dy, dx), (0, 1))[core] - ref[core]).mean())
        for dx in (-1, 0, 1)
        for dy in (-1, 0, 1)
    }
    flat = max(err.values()) - min(err.values()) < 1.0  # featureless (glass): nothing to align
    return err[(0, 0)] < 8.0 and (flat or err[(0, 0)] <= min(err.values()))
