"""`tile`: every slide -> coords/<id>.h5 + qc/<id>.png, in parallel, resumable; tiling.csv."""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from melanoma_mil.config import TileConfig, TilingConfig
from melanoma_mil.errors import UserError
from melanoma_mil.ids import id_path
from melanoma_mil.io import write_text
from melanoma_mil.progress import progress
from melanoma_mil.tiling.coords import read_coords, write_coords
from melanoma_mil.tiling.grid import check_tiling, tile_slide
from melanoma_mil.tiling.qc import qc_image, write_qc
from melanoma_mil.tiling.slides import find_slides, open_slide
from melanoma_mil.tiling.tissue import resolve_tissue

log = logging.getLogger(__name__)
COLUMNS = ["slide_id", "path", "status", "n_tiles", "mpp", "reason", "seconds"]


def _row(slide_id: str, path: str, status: str, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict(slide_id=slide_id, path=path, status=status, n_tiles=0,
                               mpp=float("nan"), reason="", seconds=0.0)  # fmt: skip
    row.update(kw)
    return row


def tile_one(slide_id: str, path: str, cfg: TilingConfig, output_dir: str) -> dict[str, Any]:
    """Tile one slide and write its QC image and coords; a failure becomes a 'failed' row.

    The coords file is written last, so its presence means the slide is completely done.
    """
    start = time.perf_counter()
    out = Path(output_dir)
    try:
        slide = open_slide(path)
        try:
            tiles = tile_slide(slide, path, slide_id, cfg)
            write_qc(id_path(out / "qc", slide_id, ".png"), qc_image(tiles, slide_id))
        finally:
            slide.close()
        write_coords(id_path(out / "coords", slide_id, ".h5"), tiles.grid)
    except UserError as e:
        return _row(slide_id, path, "failed", reason=str(e), seconds=time.perf_counter() - start)
    except Exception as e:  # a corrupt slide fails in OpenSlide, PIL or numpy: report, go on
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return _row(slide_id, path, "failed", reason=reason, seconds=time.perf_counter() - start)
    n = len(tiles.grid.coords)
    reason = ""
    if n == 0:
        reason = (
            f"tissue found but no tile has tissue fraction >= {cfg.min_tissue}"
            if tiles.mask.any()
            else "no tissue found (blank slide, or lower tiling.tissue.min_saturation)"
        )
    return _row(slide_id, path, "ok" if n else "empty", n_tiles=n, mpp=tiles.grid.level0_mpp,
                reason=reason, seconds=time.perf_counter() - start)  # fmt: skip


def resolved_tiling(cfg: TilingConfig) -> dict[str, Any]:
    """The tiling settings as stored in coords files (presets filled in, JSON round-tripped)."""
    resolved = dataclasses.replace(cfg, tissue=resolve_tissue(cfg.tissue))
    return json.loads(json.dumps(dataclasses.asdict(resolved)))


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        flat.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return flat


def _existing(slide_id: str, path: str, coords: Path, wanted: dict[str, Any]) -> dict[str, Any]:
    """Row for a slide whose coords file exists: skipped, or failed if made with other settings."""
    grid = read_coords(coords)
    old, new = _flat(grid.tiling), _flat(wanted)
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if diff:
        changes = ", ".join(f"tiling.{k}: {old.get(k)} -> {new.get(k)}" for k in diff[:3])
        return _row(slide_id, path, "failed", reason=(
            f"{coords} was made with other settings ({changes}); "
            "use a new output_dir or overwrite=true"))  # fmt: skip
    n = len(grid.coords)
    return _row(slide_id, path, "skipped", n_tiles=n, mpp=grid.level0_mpp,
                reason="already tiled" if n else "already tiled: empty")  # fmt: skip


def _run_all(todo: list[tuple[str, str]], cfg: TileConfig, bar: tqdm) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    start, tiles = time.perf_counter(), 0

    def done(row: dict[str, Any]) -> None:
        nonlocal tiles
        rows.append(row)
        tiles += row["n_tiles"]
        failed = sum(r["status"] == "failed" for r in rows)
        bar.set_postfix(tiles_per_s=f"{tiles / (time.perf_counter() - start):.0f}", failed=failed)
        bar.update(1)

    workers = max(1, min(cfg.workers, len(todo)))
    if workers == 1:
        for sid, path in todo:
            done(tile_one(sid, path, cfg.tiling, cfg.output_dir))
        return rows
    # spawn: the parent may hold torch/OpenMP threads (demo, notebooks) that fork would break
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = {
            pool.submit(tile_one, sid, path, cfg.tiling, cfg.output_dir): (sid, path)
            for sid, path in todo
        }
        for fut in as_completed(futures):
            sid, path = futures[fut]
            try:
                done(fut.result())
            except BrokenProcessPool:
                done(_row(sid, path, "failed", reason="a worker process crashed (see log above)"))
    return rows


def run_tile(cfg: TileConfig) -> int:
    """Tile every slide; 0 if none failed, else 1 (after finishing all the others)."""
    check_tiling(cfg.tiling)
    slides = find_slides(cfg.slides_dir, cfg.manifest, cfg.extensions)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    wanted = resolved_tiling(cfg.tiling)

    rows: list[dict[str, Any]] = []
    todo: list[tuple[str, str]] = []
    for sid, path in slides.items():
        coords = id_path(out / "coords", sid, ".h5")
        if coords.is_file() and not cfg.overwrite:
            try:
                rows.append(_existing(sid, str(path), coords, wanted))
                continue
            except UserError:  # unreadable leftover: tile it again
                pass
        todo.append((sid, str(path)))

    with progress(total=len(slides), initial=len(rows), desc="tile", unit="slide") as bar:
        rows += _run_all(todo, cfg, bar)

    table = pd.DataFrame(rows, columns=COLUMNS).sort_values("slide_id")
    write_text(out / "tiling.csv", table.to_csv(index=False))
    for r in table.itertuples():
        if r.status == "empty":
            log.warning("%s: zero tiles: %s", r.slide_id, r.reason)
        elif r.status == "failed":
            log.warning("%s: FAILED: %s", r.slide_id, r.reason)
    _summary(table, out)
    return 1 if (table["status"] == "failed").any() else 0


def _summary(table: pd.DataFrame, out: Path) -> None:
    counts = Counter(table["status"])
    seconds = table["seconds"].sum()
    print(
        f"tile: {counts['ok']} ok, {counts['empty']} empty, {counts['failed']} failed, "
        f"{counts['skipped']} skipped; {int(table['n_tiles'].sum())} tiles "
        f"({seconds:.1f} slide-seconds)\n"
        f"  coords: {out / 'coords'}\n  QC images: {out / 'qc'}\n  table: {out / 'tiling.csv'}"
    )
