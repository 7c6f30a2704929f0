"""`tile`: every slide -> coords/<id>.h5 + qc/<id>.png, in parallel, resumable, shareable.

Any number of `tile` processes (on any hosts sharing output_dir) can run at once: each slide is
claimed (`workshare.Claim`, coords/<id>.lock) before it is tiled, so none is tiled twice, and a
slide claimed by a process that died is taken over. Each process ends, once no slide is left
to anyone, with the whole cohort's table (tiling.csv) and a contact sheet of every QC image.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import signal
import sys
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
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from melanoma_mil.config import TileConfig, TilingConfig
from melanoma_mil.console import configure_output
from melanoma_mil.errors import UserError
from melanoma_mil.ids import held_ids, id_path
from melanoma_mil.io import remove_temp_files
from melanoma_mil.outdir import claim_shared, refuse_in_the_way, refuse_unwritable
from melanoma_mil.progress import progress
from melanoma_mil.runtable import show, write
from melanoma_mil.tiling.coords import read_tiling
from melanoma_mil.tiling.find import find_slides
from melanoma_mil.tiling.grid import check_tiling
from melanoma_mil.tiling.job import Task, existing_row, lock_path, outputs, slide_row, tile_one
from melanoma_mil.tiling.qc import CELLS, contact_sheet, prune_cells
from melanoma_mil.tiling.slides import read_mpp_csv
from melanoma_mil.tiling.tissue import resolve_tissue
from melanoma_mil.tiling.watch import Late, Watch
from melanoma_mil.workshare import (
    STOP_FIX,
    Claim,
    clear_drafts,
)

log = logging.getLogger(__name__)
COLUMNS = ["slide_id", "status", "n_tiles", "seconds", "reader", "mpp", "mpp_source", "reason",
           "path"]  # fmt: skip
WIDTHS = {"slide_id": 24, "status": 11, "n_tiles": 7, "seconds": 7, "reader": 22, "mpp": 6,
          "mpp_source": 15}  # fmt: skip
POLL_S = 2.0  # while other processes hold the last slides


def resolved_tiling(cfg: TilingConfig) -> dict[str, Any]:
    """The tiling settings as stored in coords files (presets filled in, JSON round-tripped)."""
    resolved = dataclasses.replace(cfg, tissue=resolve_tissue(cfg.tissue))
    return json.loads(json.dumps(dataclasses.asdict(resolved)))


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        flat.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return flat


def _check_settings(out: Path, slide_ids: list[str], wanted: dict[str, Any]) -> None:
    """Refuse, before any slide is touched, an output_dir whose coords of these slides were
    made with other tiling settings: each slide would fail, and `extract` would mix them."""
    new = _flat(wanted)
    olds: dict[str, set[str]] = {}
    tiled = other = 0
    for sid in slide_ids:
        found = read_tiling(id_path(out / "coords", sid, ".h5"))
        if found is None:  # not tiled yet, or an unreadable leftover: tiled again
            continue
        old = _flat(found[0])
        keys = old.keys() | new.keys()
        if found[1] != "default":  # default_mpp shaped nothing of a slide with its own mpp
            keys -= {"default_mpp"}
        diff = [k for k in keys if old.get(k) != new.get(k)]
        tiled, other = tiled + 1, other + bool(diff)
        for k in diff:
            olds.setdefault(k, set()).add(repr(old.get(k)))
    if not olds:
        return
    keys = sorted(olds)
    changes = "; ".join(
        f"tiling.{k}: {' or '.join(sorted(olds[k]))} in the folder, {new.get(k)!r} now"
        for k in keys[:4]
    ) + (f"; {len(keys) - 4} more" if len(keys) > 4 else "")
    which = "" if other == tiled else f"{other} of the {tiled} tiled slides: "
    raise UserError(
        f"output_dir '{out}' holds coords made with other settings ({which}{changes}); pass "
        "overwrite=true to tile every slide again, or choose another output_dir."
    )


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
    # a spawned process prints as Python's defaults would: given this process's level and format
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
    # spawn: the parent may hold torch/OpenMP threads (demo, notebooks) that fork would break
    ctx = multiprocessing.get_context("spawn")
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


def _tile_all(tasks: list[Task], workers: int, bar: tqdm,
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


def _unguarded_script() -> str | None:
    """The script that called tile from its top level outside an ``if __name__ ...`` block, or
    None. A spawned process starts by running the script of ``python script.py`` (or ``-m
    pkg.script``) again, as ``__mp_main__``: unguarded, that calls tile again there, and each
    worker dies before tiling anything (every slide failed as if its file crashed the reader)."""
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None) or ""
    path = getattr(main, "__file__", None)
    if main is None or path is None or name == "__main__" or name.endswith(".__main__"):
        return None  # a package's __main__ (python -m melanoma_mil), a notebook, -c: not re-run
    frame = sys._getframe(1)
    while frame is not None and not (
        frame.f_code.co_name == "<module>" and frame.f_globals is vars(main)
    ):
        frame = frame.f_back
    if frame is None:  # not called from the script's top level (e.g. from a thread)
        return None
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):  # a frozen or changed script: cannot tell
        return None
    line = frame.f_lineno
    for stmt in tree.body:
        if stmt.lineno <= line <= (stmt.end_lineno or stmt.lineno):
            guard = isinstance(stmt, ast.If) and any(
                isinstance(n, ast.Name) and n.id == "__name__" for n in ast.walk(stmt.test)
            )
            return None if guard else str(path)
    return None


def _refuse_unguarded_script(cfg: TileConfig) -> None:
    """Refuse, before any work, a script that would run tile again in each worker process."""
    script = _unguarded_script() if cfg.workers > 1 or cfg.slide_timeout_s else None
    if script:
        raise UserError(
            f"'{script}' calls tile outside `if __name__ == \"__main__\":`, so each of tile's "
            "worker processes (spawned: each runs the script again) would call it again; put "
            "the script's top-level code under that guard, or tile in this process with "
            "workers=1 slide_timeout_s=0."
        )


def run_tile(cfg: TileConfig, advise_default_mpp: bool = True) -> int:
    """Tile every slide; 0 if none failed, else 1 (after finishing all the others).
    ``advise_default_mpp=False``: callers that take no tiling keys (predict, heatmap)."""
    check_tiling(cfg.tiling)
    _refuse_unguarded_script(cfg)
    held = held_ids(Path(cfg.output_dir) / "coords", ".h5")  # an earlier call's
    slides = find_slides(cfg.slides_dir, cfg.manifest, cfg.extensions, cfg.output_dir, held=held)
    overrides = read_mpp_csv(cfg.mpp_csv)
    unknown = sorted(set(overrides) - set(slides))
    if unknown:
        log.warning("mpp_csv lists %d slide id(s) not found: %s", len(unknown), unknown[:5])
    out = Path(cfg.output_dir)
    if not cfg.overwrite:
        _check_settings(out, list(slides), resolved_tiling(cfg.tiling))
    made = ["coords", "qc", CELLS]  # CELLS is pruned: never a link
    refuse_in_the_way(out, "tile", made, written=[])  # written into only if a slide is left
    claim_shared(out, "tile")
    since = time.time()

    rows: list[dict[str, Any]] = []
    todo: list[Task] = []
    for sid, path in slides.items():
        task = Task(sid, str(path), str(out), cfg.tiling, overrides.get(sid), cfg.stale_after_s,
                    since, advise_default_mpp)  # fmt: skip
        coords = id_path(out / "coords", sid, ".h5")
        if coords.is_file() and not cfg.overwrite:
            try:
                row = existing_row(task, coords, since)
            except UserError:  # unreadable leftover: tile it again
                row = None
            if row is not None:
                rows.append(row)
                continue
        todo.append(task)
    if todo:  # all tiled: read-only coords and qc folders are only read
        refuse_unwritable([out / name for name in made], "tile")

    with progress(total=len(slides), initial=len(rows), desc="tile", unit="slide") as bar:
        watch = Watch(cfg.slide_timeout_s, cfg.stale_after_s)
        tiled, stopped = _tile_all(todo, cfg.workers, bar, watch)
    rows += tiled
    for folder in {id_path(out / "coords", sid, ".h5").parent for sid in slides}:
        clear_drafts(folder, cfg.stale_after_s)  # of claims by processes killed while claiming

    table = pd.DataFrame(rows, columns=COLUMNS).sort_values("slide_id")
    for r in table.itertuples():
        if r.status == "empty":
            log.warning("%s: zero tiles: %s", r.slide_id, r.reason)
        elif r.status == "failed":
            log.warning("%s: FAILED: %s", r.slide_id, r.reason)
    show(table, "tile", COLUMNS[:-1], WIDTHS, ("ok", "empty", "failed", "skipped"))
    wrote = write(table, out / "tiling.csv")
    if stopped:  # the folders may hold nothing to look at, and the sheet has no room
        log.error("tile stopped early: %s; %s", stopped, STOP_FIX)
        return 1
    _sheet(table, out)
    print(f"  coords: {out / 'coords'}\n  QC images: {out / 'qc'}", flush=True)
    return 1 if (table["status"] == "failed").any() or not wrote else 0


def _sheet(table: pd.DataFrame, out: Path) -> None:
    cells = [
        (r.slide_id, out / "qc" / f"{r.slide_id}.png" if r.status != "failed" else None,
         f"{r.n_tiles}" if r.status != "failed" else "FAILED")
        for r in table.itertuples()
    ]  # fmt: skip
    path = out / "qc_contact_sheet.png"
    try:
        contact_sheet(cells, path, cache=out / CELLS)
    except OSError as e:
        log.error("could not write the contact sheet %s: %s", path, e)
        return
    prune_cells(out / CELLS, out / "qc")
    print(f"  contact sheet: {path}", flush=True)
