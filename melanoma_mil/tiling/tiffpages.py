"""Regions of one tiled TIFF page, decoded straight from its tiles with a shared tile cache.

Used by `extract`'s direct JPEG reads of OpenSlide levels (`features.tiffjpeg`) and by the
OME-TIFF reader (`tiling.readers`). 8-bit RGB/YCbCr JPEG tiles are decoded by libjpeg-turbo
(imagecodecs) directly, ~3x cheaper than through OpenSlide; any other compression tifffile knows
goes through tifffile's own decoder. Reads are thread-safe: ``pread`` on one descriptor, and a
tile wanted by several threads at once is decoded by one of them while the others wait.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import tifffile

_JPEG, _RGB, _YCBCR = 7, 2, 6
# Decoded tiles kept per page: enough tile rows that a row of a (row-major) grid never decodes a
# tile twice (a fixed 64 MB thrashed on wide levels: benchmarks/read_tiles.py).
CACHE_MIN, CACHE_MAX = 64 << 20, 512 << 20


def is_rgb8(page: tifffile.TiffPage) -> bool:
    """An interleaved 8-bit, 3-sample page (what slides store; other layouts are refused)."""
    return (
        page.samplesperpixel == 3
        and page.bitspersample == 8
        and page.planarconfig == 1
        and page.imagedepth == 1
    )


def is_jpeg_rgb(page: tifffile.TiffPage) -> bool:
    return is_rgb8(page) and page.compression == _JPEG and page.photometric in (_RGB, _YCBCR)


class TiffTiles:
    """One tiled page of a TIFF file, read as RGB regions in page pixels."""

    def __init__(self, path: Path, page: tifffile.TiffPage, read_size: int = 256) -> None:
        self.fd = os.open(path, os.O_RDONLY)  # pread on one fd is thread-safe
        self.offsets = [int(o) for o in page.dataoffsets]
        self.counts = [int(c) for c in page.databytecounts]
        self.tables = page.jpegtables
        self.tw, self.th = int(page.tilewidth), int(page.tilelength)
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self.ntx = -(-self.width // self.tw)
        self._decoder = self._jpeg_decoder(page) if is_jpeg_rgb(page) else self._tiff_decoder(page)
        rows = -(-read_size // self.th) + 1.5  # rows a grid row spans, + the next one's start
        row_bytes = self.ntx * self.tw * self.th * 3
        self.capacity = int(min(max(rows * row_bytes, CACHE_MIN), CACHE_MAX))
        self._cache: OrderedDict[int, np.ndarray | None] = OrderedDict()
        self._cached = 0
        self.decodes = 0  # tiles decoded so far (each once while it stays cached)
        self._decoding: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

    def _jpeg_decoder(self, page: tifffile.TiffPage) -> Callable[[bytes, int], np.ndarray]:
        colorspace = "RGB" if page.photometric == _RGB else None  # Aperio: RGB JPEGs
        tables = page.jpegtables
        return lambda data, k: imagecodecs.jpeg8_decode(data, tables=tables, colorspace=colorspace)

    def _tiff_decoder(self, page: tifffile.TiffPage) -> Callable[[bytes, int], np.ndarray]:
        decode: Any = page.decode  # a closure over the page's codec settings, file not needed
        tables = page.jpegtables

        def run(data: bytes, k: int) -> np.ndarray:
            segment = decode(data, k, jpegtables=tables)[0]
            return np.asarray(segment).reshape(self.th, self.tw, 3)

        return run

    def tile(self, k: int) -> np.ndarray | None:
        """Decoded tile ``k`` ([th, tw, 3] uint8), None where the file stores none."""
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
        tile = self._decoder(os.pread(self.fd, self.counts[k], self.offsets[k]), k)
        if tile.shape != (self.th, self.tw, 3):
            raise ValueError(f"tile {k} decodes to {tile.shape}, not {self.th, self.tw}")
        return tile

    def region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB [h, w, 3] at page pixel (x, y); outside the image or stored tiles: white."""
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, self.width), min(y + h, self.height)
        for ty in range(y0 // self.th, -(-y1 // self.th)) if y1 > y0 else ():
            for tx in range(x0 // self.tw, -(-x1 // self.tw)) if x1 > x0 else ():
                tile = self.tile(ty * self.ntx + tx)
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
