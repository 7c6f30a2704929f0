"""The encoding loop of `extract`: reads -> forward -> copy back -> store, overlapped.

On a GPU the forward of batch k+1 is queued while batch k is copied back on a side stream and
stored by a writer thread, so the GPU never waits for ``y.cpu()`` or the h5 write; reader
processes read the next slide's first tiles while this one's last are encoded (the next slide
is claimed as soon as the loader's read-ahead reaches this one's end). On CPU, reader threads
fill each batch between forward passes (they share the cores), and the writer thread stores
and writes the slide while the next one is read.

A slide's features are assembled in memory and written once complete as one h5 image
(`io.h5_bytes`): nothing partial ever exists, and a full disk is a clean OSError, never HDF5
failing inside a half-written file (which segfaults the interpreter at exit).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from melanoma_mil.encoders import Encoder
from melanoma_mil.errors import UserError
from melanoma_mil.features import placement
from melanoma_mil.features.data import Range, ReaderProcesses, SlideBatches
from melanoma_mil.features.queue import SlideQueue, SlideWork

log = logging.getLogger(__name__)

STORE = {"float16": np.float16, "float32": np.float32}


class Stopped(Exception):
    """The run stops (e.g. a full disk): the slide in progress fails with the run's reason."""


def failure(e: BaseException) -> str:
    """One line: the cause (worker errors end with it), typed unless it is a UserError or the
    run's stop (whose reason already says what happened)."""
    last = (str(e).strip().splitlines() or [""])[-1]
    plain = isinstance(e, (UserError, Stopped))
    return (last if plain else f"{type(e).__name__}: {last}")[:300]


class Writer:
    """Copies features back and stores them, on its own thread (``threaded``) or in line.

    ``finish(work, error)`` runs once per slide after its last batch is stored ("" = no error)
    and returns why the run must stop (e.g. the disk is full), kept in ``fatal``.
    """

    def __init__(self, finish: Callable[[SlideWork, str], str], threaded: bool) -> None:
        self.finish = finish
        self.fatal = ""
        self._stream: Any = None  # torch.cuda.Stream for copies, made at the first GPU batch
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=4)
        self._thread = threading.Thread(target=self._loop, daemon=True) if threaded else None
        if self._thread is not None:
            self._thread.start()

    def put(self, work: SlideWork, y: torch.Tensor) -> None:
        host, event = self._to_host(y)
        self._submit(("put", work, host, event))

    def end(self, work: SlideWork, error: str) -> None:
        self._submit(("end", work, error))

    def close(self) -> None:
        """Finish everything submitted, then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None  # later submissions run in line

    def _to_host(self, y: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start copying ``y`` to pinned host memory on a side stream; (host tensor, event)."""
        if y.device.type != "cuda":
            return y, None
        if self._stream is None:
            self._stream = torch.cuda.Stream(y.device)
        self._stream.wait_stream(torch.cuda.current_stream(y.device))
        with torch.cuda.stream(self._stream):
            host = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
            host.copy_(y, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        y.record_stream(self._stream)
        return host, event

    def _submit(self, item: tuple[Any, ...]) -> None:
        if self._thread is None:
            self._handle(item)
        else:
            self._queue.put(item)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            self._handle(item)

    def _handle(self, item: tuple[Any, ...]) -> None:
        kind, work = item[0], item[1]
        if kind == "end":
            try:
                self.fatal = self.finish(work, work.error or item[2]) or self.fatal
            except Exception as e:  # never lose the thread: the run must still end
                log.error("slide %s: %s", work.slide_id, failure(e))
            return
        host, event = item[2], item[3]
        try:
            if event is not None:
                event.synchronize()
            if not work.error:
                assert work.feats is not None
                arr = host.numpy()
                work.computed_non_finite |= not np.isfinite(arr).all()
                work.feats[work.filled : work.filled + len(arr)] = arr
                work.filled += len(arr)
        except Exception as e:  # the slide fails at its end, the run goes on
            work.error = failure(e)


@dataclass
class Engine:
    """Encodes the slides ``queue`` hands out, one after another, until none is left."""

    encoder: Encoder
    precision: str
    batch_size: int
    dtype: str
    reader: str  # ExtractConfig.reader
    queue: SlideQueue
    writer: Writer
    bar: tqdm
    pool: ThreadPoolExecutor | None = None  # reader threads (no reader processes)
    threads: int = 1
    processes: ReaderProcesses | None = None
    _ahead: SlideWork | None = field(default=None, init=False)  # claimed next, already queued
    _total: float = field(default=0, init=False)  # the bar's total: every slide's tiles

    def run(self) -> None:
        self._total = self.bar.total or 0
        work = self._next(wait=True)
        while work is not None:
            ahead = self._encode(work)
            if self.writer.fatal:
                for w in (ahead,) if ahead else ():
                    self.writer.end(w, f"not encoded: {self.writer.fatal}")
                self.writer.close()  # the slides in flight fail too; then nothing more
                self.queue.stop(self.writer.fatal)
                return
            work = ahead if ahead is not None else self._next(wait=True)

    def _next(self, wait: bool) -> SlideWork | None:
        """The queue's next slide; the bar counts only tiles this process may still encode, so
        a resumed run or one shared with peers ends at 100% and its rate and ETA are its own."""
        work = self.queue.next(wait)
        self.bar.total = self._total - self.queue.passed
        return work

    def reads(self, work: SlideWork) -> list[list[Range]]:
        """The tile ranges reader processes read for ``work``, grouped by forward batch."""
        tile, size = work.grid.read_size**2 * 3, self.batch_size
        return [
            [(s + a, s + b) for a, b in placement.read_parts(min(size, work.n - s), tile)]
            for s in range(0, work.n, size)
        ]

    def queue_reads(self, work: SlideWork) -> None:
        assert self.processes is not None
        self.processes.add(work.index, [r for batch in self.reads(work) for r in batch])

    def _encode(self, work: SlideWork) -> SlideWork | None:
        """Encode ``work``; returns the slide claimed ahead (reader processes), if any."""
        try:  # a slide too large for this machine's memory fails alone
            work.feats = np.empty((work.n, self.encoder.dim), STORE[self.dtype])
            source = self._from_processes(work) if self.processes else self._from_threads(work)
            for tiles in source:
                if self.writer.fatal:  # e.g. the disk filled up while the last slide was written
                    raise Stopped(f"stopped: {self.writer.fatal}")
                y = self.encoder.encode(tiles.permute(0, 3, 1, 2), work.grid.tile_size,
                                        self.precision)  # fmt: skip
                self.writer.put(work, y)
                self.bar.update(len(y))
                work.claim.heartbeat()
                if self._ahead is not None:
                    self._ahead.claim.heartbeat()
            self.writer.end(work, "")
        except Exception as e:  # one bad slide must not stop the cohort
            self.writer.end(work, failure(e))
            if self.processes is not None:  # a worker may have died with the slide
                self.processes.close()
                if self._ahead is not None:
                    self.queue_reads(self._ahead)
        ahead, self._ahead = self._ahead, None
        return ahead

    def _from_threads(self, work: SlideWork) -> Iterator[torch.Tensor]:
        assert work.job.slide_path is not None
        data = SlideBatches(work.job.slide_path, work.grid, self.batch_size, self.reader)
        try:
            for i in range(len(data)):
                tiles = data.read(i, self.pool, self.threads)
                work.reader = data.reader
                yield tiles
        finally:
            data.close()

    def _from_processes(self, work: SlideWork) -> Iterator[torch.Tensor]:
        """The slide's batches, each joined on the compute device from the parts the reader
        processes read; the next slide is claimed and queued when the loader's read-ahead
        reaches this slide's end, so reads never pause."""
        p = self.processes
        assert p is not None
        batches = self.reads(work)
        left = sum(len(b) for b in batches)  # items of this slide not yet taken
        if not work.queued:
            self.queue_reads(work)
        asked = False
        for batch in batches:
            start, rows = batch[0][0], batch[-1][1] - batch[0][0]
            joined: torch.Tensor | None = None  # the batch, filled part by part on the device
            for a, b in batch:
                if not asked and left <= p.window:
                    asked = True
                    self._claim_ahead()
                tiles, work.reader, xy = p.next()
                left -= 1
                if not np.array_equal(xy.numpy(), work.grid.coords[a:b]):  # re-read by the worker
                    raise UserError(
                        f"{work.job.coords_path} was rewritten while extract ran (`tile` again?): "
                        "re-run extract to encode the new tiles"
                    )
                joined = fill(joined, tiles, a - start, rows, self.encoder.device)
            assert joined is not None
            yield joined

    def _claim_ahead(self) -> None:
        """Claim the next slide and queue its reads behind this one's."""
        self._ahead = self._next(wait=False)
        if self._ahead is not None:
            self._ahead.queued = True
            self.queue_reads(self._ahead)


def fill(
    batch: torch.Tensor | None, part: torch.Tensor, offset: int, rows: int, device: torch.device
) -> torch.Tensor:
    """``part`` copied into rows ``offset...`` of a ``rows``-tile batch on ``device`` (made at
    the first part; a batch read as one part is that part, moved without another copy)."""
    pinned = part.is_pinned()
    if len(part) == rows:
        return part.to(device, non_blocking=pinned)
    if batch is None:
        batch = torch.empty((rows, *part.shape[1:]), dtype=part.dtype, device=device)
    batch[offset : offset + len(part)].copy_(part, non_blocking=pinned)
    return batch
