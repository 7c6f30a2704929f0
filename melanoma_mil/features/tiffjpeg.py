"""Direct reads of JPEG-tiled TIFF levels (generic TIFF, Aperio SVS), ~3x cheaper than OpenSlide.

OpenSlide decodes a JPEG tile, composites it through cairo into premultiplied ARGB and Python
converts that back to RGBA: for a 256-px tile that costs ~1.5 ms, against ~0.45 ms for the JPEG
decode alone (libjpeg-turbo via imagecodecs), and on a 2-core CPU every read millisecond is taken
from the encoder. This reader decodes the level's JPEG tiles itself and crops them. It is only
used where it must give OpenSlide's pixels: a whitelisted vendor, a level stored as one tiled
8-bit RGB/YCbCr JPEG page of exactly the level's size, integer level offsets, and probe tiles of
the slide's own grid that match OpenSlide bit for bit. Anything else reads through OpenSlide.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import tifffile

log = logging.getLogger(__name__)

# Vendors whose levels are plain tiled TIFF pages; others (Ventana overlaps, Philips sparse
# tiles, Leica multi-image) place tiles in ways only OpenSlide knows.
VENDORS = ("generic-tiff", "aperio")
_JPEG, _RGB, _YCBCR = 7, 2, 6
# Decoded tiles kept per slide: enough JPEG-tile rows that a row of the (row-major) grid never
# decodes a tile twice (a fixed 64 MB thrashed on wide levels: benchmarks/read_tiles.py).
CACHE_MIN, CACHE_MAX = 64 << 20, 512 << 20


class FastTiles:
    """One OpenSlide level read straight from its TIFF page's JPEG tiles."""

    def __init__(
        self, path: Path, page: tifffile.TiffPage, read_size: int, downsample: float
    ) -> None:
        self.downsample = downsample
        self.fd = os.open(path, os.O_RDONLY)  # pread on one fd is thread-safe
        self.offsets = [int(o) for o in page.dataoffsets]
        self.counts = [int(c) for c in page.databytecounts]
        self.tables = page.jpegtables
        self.colorspace = "RGB" if page.photometric == _RGB else None  # Aperio: RGB JPEGs
        self.tw, self.th = int(page.tilewidth), int(page.tilelength)
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self.ntx = -(-self.width // self.tw)
        rows = -(-read_size // self.th) + 1.5  # rows a grid row spans, + the next one's start
        row_bytes = self.ntx * self.tw * self.th * 3
        self.capacity = int(min(max(rows * row_bytes, CACHE_MIN), CACHE_MAX))
        self._cache: OrderedDict[int, np.ndarray | None] = OrderedDict()
        self._cached = 0
        self.decodes = 0  # JPEG tiles decoded so far (each once while it stays cached)
        self._decoding: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

    def _tile(self, k: int) -> np.ndarray | None:
        """Decoded tile ``k`` ([th, tw, 3] uint8), None where the file stores none. Each tile is
        decoded once while cached, even when reader threads ask for it at the same time."""
        while True:
            with self._lock:
                if k in self._cache:
                    self._cache.move_to_end(k)
                    return self._cache[k]
                busy = self._decoding.get(k)
                if busy is None:
                    self._decoding[k] = threading.Event()
                    break
            busy.wait()  # another thread is decoding it; then look again
        try:
            tile = self._decode(k)
            with self._lock:
                self._cache[k] = tile
                self.decodes += tile is not None
                self._cached += 0 if tile is None else tile.nbytes
                while self._cached > self.capacity and len(self._cache) > 1:
                    old = self._cache.popitem(last=False)[1]
                    self._cached -= 0 if old is None else old.nbytes
        finally:
            with self._lock:
                self._decoding.pop(k).set()
        return tile

    def _decode(self, k: int) -> np.ndarray | None:
        if not self.counts[k]:
            return None
        data = os.pread(self.fd, self.counts[k], self.offsets[k])
        tile = imagecodecs.jpeg8_decode(data, tables=self.tables, colorspace=self.colorspace)
        if tile.shape != (self.th, self.tw, 3):
            raise ValueError(f"JPEG tile {k} decodes to {tile.shape}, not {self.th, self.tw}")
        return tile

    def read(self, x: int, y: int, size: int) -> np.ndarray | None:
        """Tile at level-0 (x, y), or None where the level offset is fractional (OpenSlide
        resamples those, so only OpenSlide gives the same pixels)."""
        lx, ly = x / self.downsample, y / self.downsample
        if lx != int(lx) or ly != int(ly):
            return None
        return self._region(int(lx), int(ly), size)

    def _region(self, x: int, y: int, size: int) -> np.ndarray:
        """RGB [size, size, 3] at level pixel (x, y); outside the image or stored tiles: white."""
        out = np.full((size, size, 3), 255, np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + size, self.width), min(y + size, self.height)
        for ty in range(y0 // self.th, -(-y1 // self.th)) if y1 > y0 else ():
            for tx in range(x0 // self.tw, -(-x1 // self.tw)) if x1 > x0 else ():
                tile = self._tile(ty * self.ntx + tx)
                if tile is None:
                    continue
                ax, ay = max(x0, tx * self.tw), max(y0, ty * self.th)
                bx, by = min(x1, (tx + 1) * self.tw), min(y1, (ty + 1) * self.th)
                out[ay - y : by - y, ax - x : bx - x] = tile[
                    ay - ty * self.th : by - ty * self.th, ax - tx * self.tw : bx - tx * self.tw
                ]
        return out

    def close(self) -> None:
        os.close(self.fd)


def _level_page(path: Path, dims: tuple[int, int]) -> tifffile.TiffPage | None:
    """The one tiled 8-bit RGB/YCbCr JPEG page of size ``dims`` (w, h), if the file has it."""
    with tifffile.TiffFile(path) as tif:
        pages = [p for p in tif.pages if isinstance(p, tifffile.TiffPage)]
        same = [p for p in pages if (p.imagewidth, p.imagelength) == dims]
        if len(same) != 1:
            return None
        p = same[0]
        ok = (
            p.is_tiled
            and p.compression == _JPEG
            and p.photometric in (_RGB, _YCBCR)
            and p.samplesperpixel == 3
            and p.bitspersample == 8
            and p.planarconfig == 1
            and p.imagedepth == 1
        )
        return p if ok else None


def open_fast_tiles(
    path: Path,
    slide: openslide.OpenSlide,
    level: int,
    size: int,
    probes: Sequence[tuple[int, int]],
) -> FastTiles | None:
    """A verified direct reader for ``level`` of ``slide``, or None (then OpenSlide reads).

    ``probes`` are level-0 tile positions of this slide's grid: each is read both ways and must
    match exactly, so the fast path can never change a feature.
    """
    if slide.properties.get(openslide.PROPERTY_NAME_VENDOR) not in VENDORS:
        return None
    try:
        page = _level_page(path, slide.level_dimensions[level])
    except (tifffile.TiffFileError, OSError, ValueError) as e:
        log.debug("%s: no direct TIFF reads (%s)", path, e)
        return None
    if page is None:
        return None
    fast = FastTiles(path, page, size, slide.level_downsamples[level])
    try:
        for x, y in probes:
            mine = fast.read(x, y, size)
            ref = np.asarray(slide.read_region((x, y), level, (size, size)))
            if mine is not None and not _same(mine, ref):
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
