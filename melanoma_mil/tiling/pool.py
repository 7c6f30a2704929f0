"""The slides one `tile` process tiles, in a process pool: a slide is handed to a worker only
once one is free (so after a full disk none is claimed), a worker that dies fails only the slide
that killed it (the others in flight are tiled again, a process each), a slide past
slide_timeout_s is stopped by killing its worker, and slides claimed by live peers are waited
for (and taken over if their process dies)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import (
    FIRST_COMPLETED,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import BaseContext
from typing import Any

from tqdm import tqdm

from melanoma_mil.console import configure_output
from melanoma_mil.io import remove_temp_files
from melanoma_mil.pools import worker_context
from melanoma_mil.tiling.job import Task, lock_path, outputs, slide_row, tile_one
from melanoma_mil.tiling.watch import Late, Watch
from melanoma_mil.workshare import Claim

log = logging.getLogger(__name__)
POLL_S = 2.0  # while other processes hold the last slides


def _isolated(task: Task, ctx: BaseContext, watch: Watch) -> dict[str, Any]:
    """Tile one slide in a process of its own, so that its crash fails this slide alone."""
    rows: list[dict[str, Any]] = []
    if _in_pool([task], 1, ctx, rows.append, watch)[0]:
        _clear_dead(task)
        reason = ("its tile process died (a crash in the slide reader, or killed for "
                  "memory): check or re-export the file")  # fmt: skip
        return slide_row(task.slide_id, task.path, "failed", reason=reason)
    return rows[0]


def _workers(pool: ProcessPoolExecutor) -> set[int]:
    """The pids of the pool's processes (the executor has no public way to tell them)."""
    return set(getattr(pool, "_processes", None) or ())


def _stop_late(pool: ProcessPoolExecutor, running: dict[Future[Any], Task],
               watch: Watch) -> list[tuple[Late, Future[Any]]]:  # fmt: skip
    """Kill the workers of the slides past the time limit and stop waiting on those slides; the
    pool breaks, so the others in flight come back as slides of a dead process."""
    stopped = []
    for item in watch.check(running.values(), _workers(pool)):
        fut = next(f for f, t in running.items() if t is item.task)
        if fut.done():  # finished since the last wait: collected as usual
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(item.pid, signal.SIGKILL)
        running.pop(fut)
        stopped.append((item, fut))
    return stopped


def _late_row(item: Late, fut: Future[Any], watch: Watch) -> dict[str, Any]:
    """The row of a slide stopped at the time limit, or its own row when it finished in the
    instant before its worker was killed (its coords are written: not a failure)."""
    if not fut.cancelled() and fut.exception() is None:
        return fut.result()
    _clear_dead(item.task)
    return watch.timed_out(item)


def _clear_dead(task: Task) -> None:
    """The slide's process is gone (stopped at the time limit, or crashed): so go its claim and
    the temp file of a write it died in, which would otherwise stay until a later run."""
    claim = Claim(lock_path(task), task.stale_after)
    with contextlib.suppress(OSError):
        if claim.acquire():  # False: a peer took the slide over since, and may be writing
            remove_temp_files(*outputs(task))
            claim.release()


def _not_started(task: Task, why: str) -> dict[str, Any]:
    return slide_row(task.slide_id, task.path, "failed", reason=f"not started: {why}")


def _stop(rows: list[dict[str, Any]]) -> str:
    """Why no further slide may be claimed (a full disk), or ""."""
    return next((r["fatal"] for r in rows if r.get("fatal")), "")


def _in_pool(tasks: list[Task], workers: int, ctx: BaseContext,
             done: Callable[[dict[str, Any]], None], watch: Watch,
             ) -> tuple[list[Task], list[Task]]:  # fmt: skip
    """Tile ``tasks`` in a process pool, handing a worker its next slide only once it is free,
    so that after a full disk no further slide is claimed; a slide past the time limit fails
    (its worker killed). Returns the slides not tiled: (those in flight when a worker died,
    those not yet handed out)."""
    todo = deque(tasks)
    running: dict[Future[dict[str, Any]], Task] = {}
    unfinished: list[Task] = []
    late: list[tuple[Late, Future[Any]]] = []
    stop = ""
    # a worker process prints as Python's defaults would: given this process's level and format
    level = log.getEffectiveLevel()
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=configure_output,
                             initargs=(level,)) as pool:  # fmt: skip
        while todo or running:
            while todo and len(running) < workers and not stop and not unfinished and not late:
                task = todo.popleft()
                running[pool.submit(tile_one, task)] = task
            if not running:
                break
            finished, _ = wait(running, timeout=watch.every, return_when=FIRST_COMPLETED)
            for fut in finished:
                task = running.pop(fut)
                try:
                    row = fut.result()
                except BrokenProcessPool:  # one dead worker breaks every slide in flight
                    unfinished.append(task)
                    continue
                done(row)
                stop = stop or row.get("fatal", "")
            late += _stop_late(pool, running, watch)
    for item, fut in late:  # every future is settled once the pool has shut down
        done(_late_row(item, fut, watch))
    return unfinished, list(todo)


def _pool_rows(tasks: list[Task], workers: int, bar: tqdm, watch: Watch) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    start, tiles = time.perf_counter(), 0
    stop = ""  # why no further slide may be claimed (a full disk)

    def done(row: dict[str, Any]) -> None:
        nonlocal tiles, stop
        stop = stop or row.get("fatal", "")
        rows.append(row)
        tiles += row["n_tiles"]
        failed = sum(r["status"] == "failed" for r in rows)
        # refresh=False: redraw when tqdm would (off a terminal: once per LOG_INTERVAL_S), not
        # once per slide, which filled a log with a line per slide of a cohort
        bar.set_postfix(tiles_per_s=f"{tiles / (time.perf_counter() - start):.0f}",
                        failed=failed, refresh=False)  # fmt: skip
        if row["status"] != "claimed":
            bar.update(1)

    if workers <= 1 and watch.timeout_s is None:  # in this process, as asked: none to stop
        for task in tasks:
            done(_not_started(task, stop) if stop else watch.in_process(task))
        return rows
    # a pool even for one slide, and for workers=1 under a time limit: a slide whose reader
    # crashes must not take this process along, and one past slide_timeout_s is stopped by
    # killing its process, which cannot be this one
    ctx = worker_context("melanoma_mil.console", "melanoma_mil.tiling.job")
    while tasks and not stop:
        broken, tasks = _in_pool(tasks, min(workers, len(tasks)), ctx, done, watch)
        if stop:
            tasks = [*broken, *tasks]
        elif broken:  # only these need a process each; the rest go on in a new pool
            log.warning("a tile process died (or was stopped at slide_timeout_s): tiling the %d "
                        "slide(s) in flight in a process each, so only the slide that kills it "
                        "fails", len(broken))  # fmt: skip
            with ThreadPoolExecutor(workers) as threads:
                for row in threads.map(lambda t: _isolated(t, ctx, watch), broken):
                    done(row)
    for task in tasks:  # left after a full disk
        done(_not_started(task, stop))
    return rows


def _takeable(task: Task) -> bool:
    """Whether no live process holds the slide's claim now."""
    return Claim(lock_path(task), task.stale_after).live_owner() is None


def tile_all(tasks: list[Task], workers: int, bar: tqdm,
              watch: Watch) -> tuple[list[dict[str, Any]], str]:  # fmt: skip
    """Tile ``tasks``; slides claimed by other live processes are waited for (and taken over if
    their process dies) until none is left, or the disk is full. Returns (rows, why it
    stopped early or "")."""
    rows: list[dict[str, Any]] = []
    first = True
    while tasks:
        # a slide taken over from a process that died may be what killed it: tiled as asked
        # (in a pool with workers > 1 or a slide_timeout_s), and a pool started only for slides
        # free to take
        ready = tasks if first else [t for t in tasks if _takeable(t)]
        got = _pool_rows(ready, workers, bar, watch)
        first = False
        rows += [r for r in got if r["status"] != "claimed"]
        settled = {r["slide_id"] for r in got if r["status"] != "claimed"}
        tasks = [t for t in tasks if t.slide_id not in settled]
        stop = _stop(got)
        if stop:
            return rows + [_not_started(t, stop) for t in tasks], stop
        if tasks:
            log.info("waiting for %d slide(s) other processes are tiling", len(tasks))
            time.sleep(POLL_S)
    return rows, ""
