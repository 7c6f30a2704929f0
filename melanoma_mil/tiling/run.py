"""`tile`: every slide -> coords/<id>.h5 + qc/<id>.png, in parallel, resumable, shareable.

Any number of `tile` processes (on any hosts sharing output_dir) can run at once: each slide is
claimed (`workshare.Claim`, coords/<id>.lock) before it is tiled, so none is tiled twice, and a
slide claimed by a process that died is taken over. Each process ends, once no slide is left
to anyone, with the whole cohort's table (tiling.csv) and a contact sheet of every QC image.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from melanoma_mil.config import TileConfig, TilingConfig
from melanoma_mil.errors import UserError
from melanoma_mil.ids import held_ids, id_path
from melanoma_mil.outdir import claim_shared, refuse_in_the_way, refuse_unwritable
from melanoma_mil.progress import progress
from melanoma_mil.runtable import show, write
from melanoma_mil.tiling.coords import read_tiling
from melanoma_mil.tiling.find import find_slides
from melanoma_mil.tiling.grid import check_tiling
from melanoma_mil.tiling.job import Task, existing_row
from melanoma_mil.tiling.pool import tile_all
from melanoma_mil.tiling.qc import CELLS, contact_sheet, prune_cells
from melanoma_mil.tiling.slides import read_mpp_csv
from melanoma_mil.tiling.tissue import resolve_tissue
from melanoma_mil.tiling.watch import Watch
from melanoma_mil.workshare import (
    STOP_FIX,
    clear_drafts,
)

log = logging.getLogger(__name__)
COLUMNS = ["slide_id", "status", "n_tiles", "seconds", "reader", "mpp", "mpp_source", "reason",
           "path"]  # fmt: skip
WIDTHS = {"slide_id": 24, "status": 11, "n_tiles": 7, "seconds": 7, "reader": 22, "mpp": 6,
          "mpp_source": 15}  # fmt: skip


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


def _unguarded_script() -> str | None:
    """The script that called tile from its top level outside an ``if __name__ ...`` block, or
    None. A worker process starts by running the script of ``python script.py`` (or ``-m
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
            "worker processes (each runs the script again as it starts) would call it again; put "
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
        tiled, stopped = tile_all(todo, cfg.workers, bar, watch)
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
