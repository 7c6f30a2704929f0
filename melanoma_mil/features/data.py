"""What to extract (coords files matched to slides) and how tiles are read, batch by batch.

A reader process's item is a range of a slide's tiles as uint8 [R, S, S, 3] (a forward batch,
or a part of one: `placement.read_parts`), read in a DataLoader worker with its own OpenSlide
handle: one IPC message per range, and the float conversion, resize and normalisation happen
later as batched tensor ops on the compute device. JPEG-tiled TIFF / SVS
levels are decoded directly where verified against OpenSlide (see `tiffjpeg`).
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from melanoma_mil.errors import UserError
from melanoma_mil.features.tiffjpeg import FastTiles, open_fast_tiles
from melanoma_mil.ids import check_slide_id, check_spellings, rename_or_move
from melanoma_mil.tiling.coords import TileGrid, read_coords
from melanoma_mil.tiling.find import find_slides
from melanoma_mil.tiling.slides import SlideReader, open_slide

Range = tuple[int, int]  # [start, stop) of a slide's tiles
Item = tuple[torch.Tensor, str, torch.Tensor]  # a reader process's tiles, reader, their coords


@dataclass(frozen=True)
class Job:
    slide_id: str
    coords_path: Path
    slide_path: Path | None  # None: not found (reason says why)
    reason: str = ""


def coords_files(coords_dir: str | os.PathLike[str] | None) -> dict[str, Path]:
    """slide_id -> coords h5 of a `tile` output folder (its coords/ subfolder) or a plain folder."""
    if not coords_dir:
        raise UserError("no tiles given: set coords_dir to a `tile` output folder.")
    root = Path(coords_dir)
    if not root.is_dir():
        raise UserError(f"coords_dir '{root}' is not a folder: point it at a `tile` output_dir.")
    folder = root / "coords" if (root / "coords").is_dir() else root
    files = {p.stem: p for p in sorted(folder.glob("*.h5")) if not p.name.startswith(".")}
    for sid, p in files.items():
        check_slide_id(sid, f"coords file '{p}' (rename it to <slide_id>.h5 or remove it)")
    if not files:
        raise UserError(f"no coords .h5 files in '{folder}': run `tile` first (output_dir=...).")
    return files


def given_slides(
    slides_dir: str | None,
    manifest: str | None,
    extensions: list[str],
    out: str,
    coords: dict[str, Path],
) -> dict[str, Path]:
    """The slides named by slides_dir / manifest, for output folder ``out``; {} when neither is
    set: then the ``coords`` file names are the slide ids, checked against ``out`` as theirs."""
    if slides_dir or manifest:
        return find_slides(slides_dir, manifest, extensions, out)
    folder = next(iter(coords.values())).parent
    check_spellings(list(coords), f"coords_dir '{folder}'", out, rename_or_move("coords files"))
    return {}


def plan_jobs(
    coords: dict[str, Path], found: dict[str, Path], slide_paths: dict[str, str]
) -> list[Job]:
    """Pair each coords file with its slide: in ``found`` (`given_slides`) if given, else its
    recorded absolute slide_path (a relative one, from files made before paths were absolute, is
    refused: it would resolve against whatever folder `extract` runs in). Whether the file found
    is the slide that was tiled is checked later, against the recorded fingerprint."""
    jobs = []
    for sid, cpath in coords.items():
        if found:
            path = found.get(sid)
            why = "" if path else "no slide with this id in slides_dir / manifest"
        else:
            recorded = slide_paths.get(sid, "")
            path = Path(recorded) if recorded and Path(recorded).exists() else None
            why = "" if path else f"recorded slide_path '{recorded}' not found; set slides_dir"
            if recorded and not Path(recorded).is_absolute():
                path, why = (
                    None,
                    (
                        f"{cpath} records a relative slide_path '{recorded}' (made by an older "
                        "version): set slides_dir or manifest so the right slide is read"
                    ),
                )
        jobs.append(Job(sid, cpath, path, why))
    return jobs


def to_rgb(rgba: np.ndarray) -> np.ndarray:
    """RGBA -> RGB; transparent pixels (outside the scan) become white, as in `tile`."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return rgb
    a = alpha[..., None].astype(np.float32) / 255.0
    return (rgb * a + 255.0 * (1.0 - a)).round().astype(np.uint8)


class SlideBatches:
    """Batches (or any ``rows``) of one slide's tiles, read in the process that made it (reader
    processes make their own through :class:`RunBatches`); the slide is opened at first read."""

    def __init__(
        self, slide_path: Path, grid: TileGrid, batch_size: int = 1, reader: str = "auto"
    ) -> None:
        self.slide_path = slide_path
        self.coords = grid.coords
        self.level = grid.patch_level
        self.size = grid.read_size
        self.batch_size = batch_size
        self.mode = reader  # auto | fast | openslide: see ExtractConfig.reader
        self._slide: SlideReader | None = None
        self._fast: FastTiles | None = None

    def __len__(self) -> int:
        return math.ceil(len(self.coords) / self.batch_size)

    def open(self) -> SlideReader:
        """The slide's reader (and the direct JPEG reader, where verified), opened once."""
        if self._slide is None:
            self._slide = open_slide(self.slide_path)
            if self.mode != "openslide" and len(self.coords):
                probes = [tuple(map(int, self.coords[i])) for i in {0, len(self.coords) - 1}]
                self._fast = open_fast_tiles(
                    self.slide_path, self._slide, self.level, self.size, probes,
                    subpixel=self.mode == "fast",
                )  # fmt: skip
        return self._slide

    @property
    def reader(self) -> str:
        """Which reader serves this slide's tiles (after the first read)."""
        if self._fast is not None:
            ds = self._fast.downsample
            return "tiff-jpeg" if ds == int(ds) or not self._fast.subpixel else "tiff-jpeg-subpx"
        return getattr(self._slide, "backend", "openslide")

    @property
    def decodes(self) -> int:
        """JPEG tiles the direct reader has decoded so far (0 when OpenSlide reads)."""
        return self._fast.decodes if self._fast is not None else 0

    def read(
        self, i: int, pool: ThreadPoolExecutor | None = None, threads: int = 1
    ) -> torch.Tensor:
        """Batch ``i``; with a pool, ``threads`` tasks read its tiles concurrently (OpenSlide is
        thread-safe and its reads release the GIL)."""
        return self.rows((i * self.batch_size, (i + 1) * self.batch_size), pool, threads)

    def rows(
        self, span: Range, pool: ThreadPoolExecutor | None = None, threads: int = 1
    ) -> torch.Tensor:
        """Tiles ``span`` of the grid, as :meth:`read` reads a batch."""
        slide = self.open()
        fast = self._fast
        xy = self.coords[span[0] : span[1]]
        out = np.empty((len(xy), self.size, self.size, 3), np.uint8)

        def fill(rows: range) -> None:
            for j in rows:
                x, y = int(xy[j, 0]), int(xy[j, 1])
                tile = fast.read(x, y, self.size) if fast is not None else None
                if tile is None:
                    region = slide.read_region((x, y), self.level, (self.size,) * 2)
                    tile = to_rgb(np.asarray(region))
                out[j] = tile

        if pool is None or threads < 2:
            fill(range(len(xy)))
        else:
            # contiguous runs: neighbouring tiles share JPEG tiles, best decoded by one thread
            cuts = [len(xy) * k // threads for k in range(threads + 1)]
            list(pool.map(fill, [range(cuts[k], cuts[k + 1]) for k in range(threads)]))
        return torch.from_numpy(out)

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            if self._fast is not None:
                self._fast.close()
        self._slide = self._fast = None


class RunBatches(Dataset[Item]):
    """Tile ranges of every slide of a run, keyed (slide index, start, stop), for reader processes
    that live for the whole run: forking per slide costs ~0.1-3 s (copy-on-write of the
    parent's heap), once per run it is paid once. A worker loads a slide's grid from its coords
    file when the slide's first range arrives and closes the slide it read before. Each item
    is (tiles, reader name, the coords read), so the run table can say which reader served the
    slide and the engine can refuse tiles of a coords file rewritten since it was planned."""

    def __init__(self, slides: list[tuple[Path, Path]], reader: str) -> None:
        self.slides = slides  # (slide path, coords h5 path)
        self.reader = reader
        self._open: tuple[int, SlideBatches] | None = None

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, key: tuple[int, int, int]) -> Item:
        s, start, stop = key
        if self._open is None or self._open[0] != s:
            if self._open is not None:
                self._open[1].close()
            path, coords = self.slides[s]
            grid = read_coords(coords)
            self._open = (s, SlideBatches(path, grid, reader=self.reader))
        data = self._open[1]
        return data.rows((start, stop)), data.reader, torch.from_numpy(data.coords[start:stop])


class SlideStream(Sampler[tuple[int, int, int]]):
    """Yields the tile ranges of the slides queued on it, one slide after another, so reader
    processes read the next slide's first tiles while this one's last are encoded."""

    def __init__(self) -> None:
        self.queue: deque[tuple[int, list[Range]]] = deque()  # (slide index, its ranges)
        self.dry = True  # this iteration ran out of slides: later ones need a new iteration
        self.total = 0  # ranges of the slides this iteration took from the queue

    def add(self, slide: int, ranges: list[Range]) -> None:
        self.queue.append((slide, ranges))

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        self.dry, self.total = False, 0
        while self.queue:
            slide, ranges = self.queue.popleft()
            self.total += len(ranges)
            yield from ((slide, a, b) for a, b in ranges)
        self.dry = True

    def __len__(self) -> int:
        return sum(len(r) for _, r in self.queue)


class ReaderProcesses:
    """A persistent DataLoader over :class:`RunBatches`, fed slide by slide through a stream."""

    def __init__(self, data: RunBatches, workers: int, pin_memory: bool, prefetch: int = 4) -> None:
        self.data, self.workers, self.pin_memory = data, workers, pin_memory
        self.prefetch = prefetch
        self.stream = SlideStream()
        self.loader: DataLoader[Item] | None = None
        self._it: Iterator[Item] | None = None
        self._consumed = 0  # items taken from the current iteration
        self._start()

    def _start(self) -> None:
        """Fork the workers now, with nothing to read (before any slide is open)."""
        self.stream = SlideStream()
        self.loader = DataLoader(
            self.data,
            batch_size=None,
            sampler=self.stream,
            num_workers=self.workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch,
            persistent_workers=True,
        )
        iter(self.loader)

    @property
    def window(self) -> int:
        """Items the loader reads ahead: the next slide is queued when this many are left."""
        return self.workers * self.prefetch

    def add(self, slide: int, ranges: list[Range]) -> None:
        """Queue a slide's tile ranges; they follow the queued ones without a gap."""
        if self.loader is None:
            self._start()
        self.stream.add(slide, ranges)

    def next(self) -> Item:
        """The next item (tiles, reader, coords) of the queued slides, in order. A slide queued
        after the stream ran dry starts a new iteration once every item of the current one was
        taken."""
        drained = self.stream.dry and self._consumed == self.stream.total
        if self._it is None or drained:
            assert self.loader is not None
            self._it, self._consumed = iter(self.loader), 0
        self._consumed += 1
        return next(self._it)

    def close(self) -> None:
        """Stop the workers (dropping the loader shuts its iterator's processes down); the next
        ``add`` starts new ones, e.g. after a slide failed and may have killed a worker."""
        self.loader = self._it = None
        self.stream = SlideStream()
