"""Which slide an `extract` process encodes next, shared with every other process on the folder.

Slides are taken largest first (most tiles), each process claiming the next one no one holds
(`workshare.Claim`, ``<cache>/<id>.lock``), so processes of any number and speed end within
about one small slide of each other. A finished slide leaves a status record
(``<cache>/.status/<id>.json``: ok or failed, tiles, seconds, reader, by whom), from which every
process reports the whole cohort; a failure recorded by a peer after this process started is
not retried in this run (a later run retries it); with overwrite=true, a bag written since the
folder's rebuild began (`features.folder`) is kept, whoever wrote it. When only slides held
by live processes are left, a process waits for them, and takes over any whose process dies.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from melanoma_mil.errors import UserError
from melanoma_mil.features.cache import cache_key, check_cached, slide_identity
from melanoma_mil.features.data import Job
from melanoma_mil.features.folder import made_at
from melanoma_mil.ids import id_path
from melanoma_mil.io import remove_temp_files, write_json
from melanoma_mil.tiling.coords import TileGrid
from melanoma_mil.tiling.fingerprint import fingerprint_mismatch
from melanoma_mil.workshare import Claim, clear_drafts, describe, disk_full, disk_full_reason, me

log = logging.getLogger(__name__)

POLL_S = 2.0  # while only slides held by live processes are left
SAY_WAITING_S = 60.0  # the same wait is logged this often (a dead host's lock takes 900 s)


@dataclass
class SlideWork:
    """A slide this process has claimed and will encode."""

    index: int  # in the run's job list (the reader processes' slide index)
    job: Job
    grid: TileGrid
    out: Path
    attrs: dict[str, Any]
    claim: Claim
    start: float = field(default_factory=time.perf_counter)
    reader: str = ""
    feats: np.ndarray | None = None  # filled batch by batch, written when complete
    filled: int = 0
    error: str = ""  # set by the writer when storing a batch failed
    # the encoder's own output had NaN / inf (else non-finite stored values overflowed dtype)
    computed_non_finite: bool = False
    queued: bool = False  # its tile ranges are already queued on the reader processes

    @property
    def slide_id(self) -> str:
        return self.job.slide_id

    @property
    def n(self) -> int:
        return len(self.grid.coords)


def record_path(out: Path) -> Path:
    return out.parent / ".status" / f"{out.stem}.json"


def read_record(out: Path) -> dict[str, Any]:
    try:
        return json.loads(record_path(out).read_text())
    except (OSError, ValueError):
        return {}


def write_record(out: Path, row: dict[str, Any]) -> None:
    """The slide's outcome for the other processes' reports (best effort: a full disk is
    reported by the slide itself)."""
    owner = me()
    record = {**row, "by": f"pid {owner['pid']} on {owner['host']}", "finished": time.time()}
    try:
        write_json(record_path(out), record)
    except OSError as e:
        log.warning("could not record %s's outcome: %s", out.stem, e)


class SlideQueue:
    """The run's slides in claim order; ``next`` claims one (rows record all the others)."""

    def __init__(
        self,
        jobs: list[Job],
        grids: list[TileGrid | str],
        out_root: Path,
        provenance: dict[str, Any],
        attrs_for: Callable[[TileGrid, str], dict[str, Any]],
        rebuilds: dict[str, float],
        stale_after: float,
    ) -> None:
        self.jobs, self.grids, self.out_root = jobs, grids, out_root
        self.provenance, self.attrs_for = provenance, attrs_for
        # overwrite=true: when each cache folder's rebuild started (`features.folder`)
        self.rebuilds, self.stale_after = rebuilds, stale_after
        self.since = time.time()
        self.rows: dict[str, dict[str, Any]] = {}
        self.passed = 0  # tiles of the slides settled without this process encoding them
        self.stopped = ""  # why no further slide is claimed (a full disk)
        self._said = ("", 0.0)  # the last wait logged, and when (time.monotonic)
        sizes = [len(g.coords) if isinstance(g, TileGrid) else 0 for g in grids]
        order = sorted(range(len(jobs)), key=lambda i: (-sizes[i], jobs[i].slide_id))
        self.pending: deque[int] = deque(order)
        self.busy: list[tuple[int, dict[str, Any]]] = []

    def row(self, i: int, status: str, reason: str = "", **kw: Any) -> None:
        job, grid = self.jobs[i], self.grids[i]
        n = len(grid.coords) if isinstance(grid, TileGrid) else 0
        self.rows[job.slide_id] = {
            "slide_id": job.slide_id, "path": str(job.slide_path or ""), "status": status,
            "n_tiles": n, "reason": reason, **kw,
        }  # fmt: skip

    def next(self, wait: bool) -> SlideWork | None:
        """Claim the next slide; None when none is left to this process. Without ``wait``,
        slides held by live processes are left for a later call that waits for them."""
        while not self.stopped:
            while self.pending:
                i = self.pending.popleft()
                work = self._try(i)
                if work is not None:
                    return work
                grid = self.grids[i]
                if self.jobs[i].slide_id in self.rows and isinstance(grid, TileGrid):
                    self.passed += len(grid.coords)  # cached, done by a peer, or failed
            if not self.busy or not wait:
                return None
            held = ", ".join(f"{self.jobs[i].slide_id} ({describe(o)})" for i, o in self.busy)
            if held != self._said[0] or time.monotonic() - self._said[1] >= SAY_WAITING_S:
                log.info(
                    "waiting for %d slide(s) held by other processes: %s", len(self.busy), held
                )
                self._said = (held, time.monotonic())
            time.sleep(POLL_S)
            self.pending.extend(i for i, _ in self.busy)
            self.busy = []
        return None

    def stop(self, reason: str) -> None:
        """Claim nothing more (e.g. the disk is full); unclaimed slides are reported as such."""
        self.stopped = reason
        for i in [*self.pending, *(i for i, _ in self.busy)]:
            self.row(i, "failed", f"not started: {reason}")
        self.pending.clear()
        self.busy = []

    def tidy(self, finished: tuple[str, ...]) -> None:
        """Remove the claims that processes which died after writing a slide left on it, and
        the drafts that dead processes left while claiming."""
        folders: set[Path] = set()
        for sid, row in self.rows.items():
            key = row.get("cache_key")
            if row["status"] in finished and isinstance(key, str):
                lock = id_path(self.out_root / key, sid, ".h5").with_suffix(".lock")
                folders.add(lock.parent)
                try:
                    if Claim(lock, self.stale_after).clear_stale():
                        log.info("removed %s, left by a process that is gone", lock)
                        # it may have died writing the slide's bag (overwrite) or its record
                        bag = lock.with_suffix(".h5")
                        remove_temp_files(bag, record_path(bag))
                except OSError as e:
                    log.warning("could not remove %s: %s", lock, e)
        for folder in folders:
            clear_drafts(folder, self.stale_after)

    def _try(self, i: int) -> SlideWork | None:
        job, grid = self.jobs[i], self.grids[i]
        if isinstance(grid, str):  # the coords file could not be read
            self.row(i, "failed", grid)
            return None
        if job.slide_path is None:
            self.row(i, "failed", job.reason)
            return None
        if len(grid.coords) == 0:
            self.row(i, "empty", "no tiles in the coords file (see tile's table)")
            return None
        key = cache_key(slide_identity(self.provenance, grid))
        why = fingerprint_mismatch(job.slide_path, grid.fingerprint)
        if why:  # neither a bag made before (of the old file) nor a new one would be this slide's
            fix = (
                "point slides_dir or manifest at the slides `tile` read, or re-run `tile` "
                "(it re-tiles a slide that changed in place)"
            )
            self.row(i, "failed", f"slide '{job.slide_path}' {why}; {fix}", cache_key=key)
            return None
        out = id_path(self.out_root / key, job.slide_id, ".h5")
        attrs = self.attrs_for(grid, key)
        if self._settled(i, out, attrs, grid):
            return None
        claim = Claim(out.with_suffix(".lock"), self.stale_after)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            got = claim.acquire()
        except OSError as e:
            self.row(i, "failed", f"cannot claim it in {out.parent}: {e}", cache_key=key)
            if disk_full(e):
                self.stop(disk_full_reason(e, out.parent))
            return None
        except UserError as e:  # a link planted at its claim: this slide's reason, as in tile
            self.row(i, "failed", str(e), cache_key=key)
            return None
        if not got:
            self.busy.append((i, claim.owner))
            return None
        if self._settled(i, out, attrs, grid):  # a peer finished it meanwhile
            claim.release()
            return None
        remove_temp_files(out, record_path(out))  # a killed writer's bag and record
        log.info("claimed %s (%d tiles)", job.slide_id, len(grid.coords))
        return SlideWork(i, job, grid, out, attrs, claim)

    def _settled(self, i: int, out: Path, attrs: dict[str, Any], grid: TileGrid) -> bool:
        """True (row filled in) when the slide needs no work from us: a valid bag (ours from
        before, or a peer's), a bag we must not touch, or a failure a peer had in this run."""
        key = attrs["cache_key"]
        record = read_record(out)
        finished = float(record.get("finished", 0))
        recent = finished >= self.since
        fresh = finished >= self.rebuilds.get(key, self.since)  # made in this run or rebuild
        if self.rebuilds and fresh and out.exists():  # a run begun before the rebuild, at another
            fresh = made_at(out) == attrs["precision"]  # precision, may have finished it since
        if out.exists() and (not self.rebuilds or fresh):
            bad = check_cached(out, attrs, grid.coords)
            if bad is None and fresh:
                stats = {k: record.get(k) for k in ("seconds", "tiles_per_s", "reader")}
                by = record.get("by", "another process")
                self.row(i, "done", f"by {by}", cache_key=key, **stats)
            elif bad is None:
                self.row(i, "skipped", "already extracted", cache_key=key,
                         reader=record.get("reader", ""))  # fmt: skip
            elif bad.worthless:  # nothing in it to keep: recompute this slide only
                log.warning("%s %s: recomputing it", out, bad.why)
                return False
            else:  # maybe another cohort's bag: the user decides
                fix = "delete it to recompute this slide (overwrite=true recomputes every slide)"
                self.row(i, "failed", f"{out} exists but {bad.why}; {fix}", cache_key=key)
            return True
        if record.get("status") == "failed" and recent:
            self.row(i, "failed", f"{record.get('reason', '')} ({record.get('by', '')})",
                     cache_key=key)  # fmt: skip
            return True
        return False
