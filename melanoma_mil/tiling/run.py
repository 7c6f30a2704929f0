"""`tile`: every slide -> coords/<id>.h5 + qc/<id>.png, in parallel, resumable, shareable.

Any number of `tile` processes (on any hosts sharing output_dir) can run at once: each slide is
claimed (`workshare.Claim`, coords/<id>.lock) before it is tiled, so none is tiled twice, and a
slide claimed by a process that died is taken over. Each process ends, once no slide is left
to anyone, with the whole cohort's table (tiling.csv) and a contact sheet of every QC image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
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
from melanoma_mil.errors import UserError
from melanoma_mil.ids import id_path
from melanoma_mil.io import remove_temp_files
from melanoma_mil.outdir import claim_shared, refuse_linked
from melanoma_mil.progress import progress
from melanoma_mil.runtable import show, write
from melanoma_mil.tiling.coords import TileGrid, read_coords, read_tiling, write_coords
from melanoma_mil.tiling.fingerprint import slide_fingerprint
from melanoma_mil.tiling.grid import SlideTiles, check_tiling, tile_slide
from melanoma_mil.tiling.qc import contact_sheet, qc_image, write_qc
from melanoma_mil.tiling.slides import find_slides, mpp_contradicts, open_slide, read_mpp_csv
from melanoma_mil.tiling.tissue import mask_fingerprint, resolve_tissue
from melanoma_mil.workshare import (
    STOP_FIX,
    Claim,
    clear_drafts,
    describe,
    disk_full,
    disk_full_reason,
)

log = logging.getLogger(__name__)
COLUMNS = ["slide_id", "status", "n_tiles", "seconds", "reader", "mpp", "mpp_source", "reason",
           "path"]  # fmt: skip
WIDTHS = {"slide_id": 24, "status": 8, "n_tiles": 7, "seconds": 7, "reader": 22, "mpp": 6,
          "mpp_source": 15}  # fmt: skip
POLL_S = 2.0  # while other processes hold the last slides


def _row(slide_id: str, path: str, status: str, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict(slide_id=slide_id, path=path, status=status, n_tiles=0,
                               mpp=float("nan"), reason="", seconds=0.0, reader="",
                               mpp_source="")  # fmt: skip
    row.update(kw)
    return row


@dataclasses.dataclass(frozen=True)
class Task:
    slide_id: str
    path: str
    out: str  # output_dir
    cfg: TilingConfig
    mpp: float | None  # mpp_csv override
    stale_after: float
    since: float  # when this run started: coords newer than that were made by a peer
    advise_default_mpp: bool = True  # False inside predict/heatmap, which take no tiling keys


def _reason(e: Exception) -> str:
    if isinstance(e, UserError):
        return str(e)
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def tile_one(task: Task) -> dict[str, Any]:
    """Claim, tile and write one slide's QC image and coords; a failure becomes a 'failed' row
    (on a full disk with ``fatal`` set: no further slide is claimed), a slide another live
    process holds a 'claimed' row. Coords are written last, so their presence means the slide
    is completely done."""
    out = Path(task.out)
    coords = id_path(out / "coords", task.slide_id, ".h5")
    qc = id_path(out / "qc", task.slide_id, ".png")
    claim = Claim(coords.with_suffix(".lock"), task.stale_after)
    row = _row(task.slide_id, task.path, "failed")
    start = time.perf_counter()
    try:
        coords.parent.mkdir(parents=True, exist_ok=True)
        if not claim.acquire():
            return _row(task.slide_id, task.path, "claimed", reason=describe(claim.owner))
        remove_temp_files(coords, qc)  # a killed writer's (the claim was its)
        if coords.is_file() and coords.stat().st_mtime >= task.since:  # a peer just did it
            peer = _existing(task, coords, task.since)
            if peer is not None:
                return peer
        slide = open_slide(task.path)
        try:
            vendor = slide.properties.get("openslide.vendor", "")
            row["reader"] = f"{slide.backend} ({vendor})" if vendor else slide.backend
            dims = slide.dimensions
            tiles = tile_slide(
                slide, task.path, task.slide_id, task.cfg, task.mpp, task.advise_default_mpp
            )
            write_qc(qc, qc_image(tiles, task.slide_id))
        finally:
            slide.close()
        write_coords(coords, tiles.grid)
    except Exception as e:  # a corrupt slide fails in a reader, PIL or numpy: report, go on
        row.update(reason=_reason(e), seconds=time.perf_counter() - start)
        if isinstance(e, OSError) and disk_full(e):
            folder = Path(e.filename).parent if e.filename else coords.parent
            why = disk_full_reason(e, folder)
            row.update(reason=why, fatal=why)
        return row
    finally:
        claim.release()
    grid = tiles.grid
    n = len(grid.coords)
    reason = _empty_reason(tiles, dims, task.cfg) if n == 0 else ""
    row.update(status="ok" if n else "empty", n_tiles=n, mpp=grid.level0_mpp, reason=reason,
               mpp_source=grid.mpp_source, seconds=time.perf_counter() - start)  # fmt: skip
    return row


def _empty_reason(tiles: SlideTiles, dims: tuple[int, int], cfg: TilingConfig) -> str:
    """Why a slide got no tile, with the setting that would change it."""
    extent = tiles.grid.read_size * tiles.grid.downsample  # one tile, in level-0 px
    if min(dims) < extent:  # no grid fits: no tissue setting would help
        return (
            f"the slide ({dims[0]}x{dims[1]} px) is smaller than one tile ({extent:g} level-0 "
            f"px: {cfg.tile_size} px at {cfg.mpp:g} um/px); leave it out, or tile the cohort "
            "with a smaller tiling.tile_size"
        )
    if tiles.mask.any():
        return f"tissue found but no tile has tissue fraction >= {cfg.min_tissue}"
    if tiles.mask_source != "auto":  # no tissue setting applies to a user's mask
        return (
            f"its {tiles.mask_source} marks no tissue inside the slide's {dims[0]}x{dims[1]} "
            "px (a .geojson is in level-0 pixels); fix the mask, or remove it to detect tissue"
        )
    return (
        "no tissue found (blank slide, or lower tiling.tissue.min_saturation, or "
        "tiling.tissue.saturation_threshold when set)"
    )


def resolved_tiling(cfg: TilingConfig) -> dict[str, Any]:
    """The tiling settings as stored in coords files (presets filled in, JSON round-tripped)."""
    resolved = dataclasses.replace(cfg, tissue=resolve_tissue(cfg.tissue))
    return json.loads(json.dumps(dataclasses.asdict(resolved)))


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        flat.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return flat


def _existing(task: Task, coords: Path, since: float) -> dict[str, Any] | None:
    """Row for a slide whose coords file exists (its tiling settings were checked up front):
    skipped, or failed if made with an mpp that mpp_csv now contradicts or from another file;
    None when the slide changed in place since (a re-scan): its coords, tile's own output, are
    remade."""
    grid = read_coords(coords)
    row = _row(task.slide_id, task.path, "skipped", n_tiles=len(grid.coords),
               mpp=grid.level0_mpp, mpp_source=grid.mpp_source)  # fmt: skip
    with contextlib.suppress(OSError):  # left by a process killed right after writing it
        Claim(coords.with_suffix(".lock"), task.stale_after).clear_stale()
    if mpp_contradicts(grid.level0_mpp, task.mpp):
        row.update(status="failed", reason=(
            f"{coords} was made with other settings (level-0 mpp {grid.level0_mpp:g} -> "
            f"{task.mpp:g} (mpp_csv)); use a new output_dir or overwrite=true"))  # fmt: skip
    elif grid.mpp_source == "mpp_csv" and task.mpp is None:
        row.update(status="failed", reason=(
            f"{coords} was made with level-0 mpp {grid.level0_mpp:g} from an mpp_csv row this "
            "run does not have; pass that mpp_csv again, or use a new output_dir or "
            "overwrite=true to tile it with the slide's own mpp"))  # fmt: skip
    elif _changed(task.path, grid.fingerprint):
        if Path(grid.slide_path).resolve() == Path(task.path).resolve():
            log.warning("%s: the slide changed since it was tiled: tiling it again", task.slide_id)
            return None
        # maybe another cohort's tiling in this folder: the user decides
        row.update(status="failed", reason=(
            f"{coords} was made from another file ({grid.slide_path}); delete it to tile "
            f"{task.path}, or use a new output_dir"))  # fmt: skip
    elif _mask_changed(task, grid):
        log.warning("%s: its mask changed since it was tiled: tiling it again", task.slide_id)
        return None
    elif coords.stat().st_mtime >= since:
        row["reason"] = "tiled by another process"
    else:
        row["reason"] = "already tiled" if len(grid.coords) else "already tiled: empty"
    return row


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


def _mask_changed(task: Task, grid: TileGrid) -> bool:
    """Whether the user mask (tiling.mask_dir) was edited, added or removed since the slide was
    tiled; coords from before masks were recorded are not known to have changed."""
    if grid.mask_fingerprint is None:
        return False
    return mask_fingerprint(task.cfg.mask_dir, task.slide_id) != grid.mask_fingerprint


def _changed(path: str, recorded: str) -> bool:
    """The slide's file is not the one a coords file recorded (files that record no
    fingerprint, and slides that cannot be read now, are not known to have changed)."""
    if not recorded:
        return False
    try:
        return slide_fingerprint(path) != recorded
    except OSError:
        return False


def _isolated(task: Task, ctx: BaseContext) -> dict[str, Any]:
    """Tile one slide in a process of its own, so that its crash fails this slide alone."""
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        try:
            return pool.submit(tile_one, task).result()
        except BrokenProcessPool:
            reason = ("its tile process died (a crash in the slide reader, or killed for "
                      "memory): check or re-export the file")  # fmt: skip
            return _row(task.slide_id, task.path, "failed", reason=reason)


def _not_started(task: Task, why: str) -> dict[str, Any]:
    return _row(task.slide_id, task.path, "failed", reason=f"not started: {why}")


def _stop(rows: list[dict[str, Any]]) -> str:
    """Why no further slide may be claimed (a full disk), or ""."""
    return next((r["fatal"] for r in rows if r.get("fatal")), "")


def _in_pool(tasks: list[Task], workers: int, ctx: BaseContext,
             done: Callable[[dict[str, Any]], None]) -> tuple[list[Task], list[Task]]:  # fmt: skip
    """Tile ``tasks`` in a process pool, handing a worker its next slide only once it is free,
    so that after a full disk no further slide is claimed. Returns the slides not tiled: (those
    in flight when a worker died, those not yet handed out)."""
    todo = deque(tasks)
    running: dict[Future[dict[str, Any]], Task] = {}
    unfinished: list[Task] = []
    stop = ""
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        while todo or running:
            while todo and len(running) < workers and not stop and not unfinished:
                task = todo.popleft()
                running[pool.submit(tile_one, task)] = task
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                task = running.pop(fut)
                try:
                    row = fut.result()
                except BrokenProcessPool:  # one dead worker breaks every slide in flight
                    unfinished.append(task)
                    continue
                done(row)
                stop = stop or row.get("fatal", "")
    return unfinished, list(todo)


def _pool_rows(tasks: list[Task], workers: int, bar: tqdm) -> list[dict[str, Any]]:
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

    if workers <= 1:  # in this process, as asked
        for task in tasks:
            done(_not_started(task, stop) if stop else tile_one(task))
        return rows
    # a pool even for one slide: a slide whose reader crashes must not take this process along
    # spawn: the parent may hold torch/OpenMP threads (demo, notebooks) that fork would break
    ctx = multiprocessing.get_context("spawn")
    while tasks and not stop:
        broken, tasks = _in_pool(tasks, min(workers, len(tasks)), ctx, done)
        if stop:
            tasks = [*broken, *tasks]
        elif broken:  # only these need a process each; the rest go on in a new pool
            log.warning("a tile process died: tiling the %d slide(s) in flight in a process each, "
                        "so only the slide that kills it fails", len(broken))  # fmt: skip
            with ThreadPoolExecutor(workers) as threads:
                for row in threads.map(lambda t: _isolated(t, ctx), broken):
                    done(row)
    for task in tasks:  # left after a full disk
        done(_not_started(task, stop))
    return rows


def _takeable(task: Task) -> bool:
    """Whether no live process holds the slide's claim now."""
    lock = id_path(Path(task.out) / "coords", task.slide_id, ".lock")
    return Claim(lock, task.stale_after).live_owner() is None


def _tile_all(tasks: list[Task], workers: int, bar: tqdm) -> tuple[list[dict[str, Any]], str]:
    """Tile ``tasks``; slides claimed by other live processes are waited for (and taken over if
    their process dies) until none is left, or the disk is full. Returns (rows, why it
    stopped early or "")."""
    rows: list[dict[str, Any]] = []
    first = True
    while tasks:
        # a slide taken over from a process that died may be what killed it: tiled as asked
        # (in a pool with workers > 1), and a pool started only for slides free to take
        ready = tasks if first else [t for t in tasks if _takeable(t)]
        got = _pool_rows(ready, workers, bar)
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


def run_tile(cfg: TileConfig, advise_default_mpp: bool = True) -> int:
    """Tile every slide; 0 if none failed, else 1 (after finishing all the others).
    ``advise_default_mpp=False``: callers that take no tiling keys (predict, heatmap)."""
    check_tiling(cfg.tiling)
    slides = find_slides(cfg.slides_dir, cfg.manifest, cfg.extensions)
    overrides = read_mpp_csv(cfg.mpp_csv)
    unknown = sorted(set(overrides) - set(slides))
    if unknown:
        log.warning("mpp_csv lists %d slide id(s) not found: %s", len(unknown), unknown[:5])
    out = Path(cfg.output_dir)
    if not cfg.overwrite:
        _check_settings(out, list(slides), resolved_tiling(cfg.tiling))
    refuse_linked(out, "tile", ["coords", "qc"])
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
                row = _existing(task, coords, since)
            except UserError:  # unreadable leftover: tile it again
                row = None
            if row is not None:
                rows.append(row)
                continue
        todo.append(task)

    with progress(total=len(slides), initial=len(rows), desc="tile", unit="slide") as bar:
        tiled, stopped = _tile_all(todo, cfg.workers, bar)
    rows += tiled
    for folder in {id_path(out / "coords", sid, ".h5").parent for sid in slides}:
        with contextlib.suppress(OSError):  # drafts of claims by processes killed while claiming
            clear_drafts(folder, cfg.stale_after_s)

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
        contact_sheet(cells, path)
    except OSError as e:
        log.error("could not write the contact sheet %s: %s", path, e)
        return
    print(f"  contact sheet: {path}", flush=True)
