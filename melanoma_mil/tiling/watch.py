"""The slides in flight, watched by the `tile` process that hands them out: a slide whose read
never returns (a dead network mount, a FIFO named .svs) would otherwise hold its worker, and
the whole run, forever without a word. A slow slide is named in the log once per
LOG_INTERVAL_S, and past ``slide_timeout_s`` its worker is stopped so that it fails alone.
Meanwhile its claim's heartbeat is kept (the worker, inside a reader, cannot), so a slide
tiling for longer than ``stale_after_s`` is not taken over and tiled twice by a peer."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Collection, Iterable
from typing import Any

from melanoma_mil import progress
from melanoma_mil.tiling.job import Task, lock_path, slide_row, tile_one
from melanoma_mil.workshare import beat, heartbeat_every, held_by, me

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Late:
    """A slide past the time limit, and the worker process tiling it."""

    task: Task
    pid: int
    seconds: float


class Watch:
    """Looks at the slides in flight every ``every`` seconds (the caller's wait timeout)."""

    def __init__(self, timeout_s: float | None, stale_after: float) -> None:
        self.timeout_s = timeout_s or None
        self.every = min(1.0, stale_after / 5)
        self.heartbeat_s = heartbeat_every(stale_after)  # as a claim's own
        self._here = me()  # this machine, which the watched workers share
        self._named: dict[str, float] = {}  # slide id -> when the log last named it

    def check(self, tasks: Iterable[Task], pids: Collection[int]) -> list[Late]:
        """Keep the claims of the slides of ``tasks`` that ``pids`` tile alive, name those tiling
        for a while; return those past the time limit. A slide's clock starts when its worker
        claims it (the claim records when), not when it is queued behind a worker's start-up."""
        late: list[Late] = []
        now = time.time()
        for task in tasks:
            lock = lock_path(task)
            owner = held_by(lock, pids, self._here)
            since = owner.get("since") if owner else None
            if owner is None or not isinstance(since, (int, float)):
                continue  # not started yet
            beat(lock, self.heartbeat_s)
            took = now - since
            self._name(task, took, now)
            if self.timeout_s is not None and took > self.timeout_s:
                late.append(Late(task, owner["pid"], took))
        return late

    def _name(self, task: Task, took: float, now: float) -> None:
        interval = progress.LOG_INTERVAL_S
        if took >= interval and now - self._named.get(task.slide_id, -interval) >= interval:
            self._named[task.slide_id] = now
            log.info("still tiling %s after %.0f s (%s)", task.slide_id, took, task.path)

    def timed_out(self, late: Late) -> dict[str, Any]:
        """The failed row of a slide whose worker was stopped at the time limit."""
        reason = (
            f"still being read after slide_timeout_s={self.timeout_s:g} s (a read that never "
            "returns: a dead network mount, a FIFO, a failing disk), so its process was "
            f"stopped; check '{late.task.path}', or raise slide_timeout_s (0: no limit)"
        )
        return slide_row(late.task.slide_id, late.task.path, "failed", reason=reason,
                         seconds=late.seconds)  # fmt: skip

    def in_process(self, task: Task) -> dict[str, Any]:
        """``tile_one(task)`` in this process (workers=1 with slide_timeout_s=0: a slide past a
        time limit could not be stopped here), its claim kept alive and the slide named while
        slow."""
        done = threading.Event()

        def look() -> None:
            while not done.wait(self.every):
                self.check([task], {os.getpid()})

        thread = threading.Thread(target=look, daemon=True)
        thread.start()
        try:
            return tile_one(task)
        finally:
            done.set()
            thread.join()
