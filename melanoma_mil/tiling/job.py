"""One slide's `tile` job: claim it, tile it, write its QC image and coords, and say how it
went (a row of tiling.csv); a slide tiled before is skipped, re-tiled or failed by what changed.
Run in a worker process by `tiling.pool`, so a reader that crashes takes only its process."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from melanoma_mil.config import TilingConfig
from melanoma_mil.errors import UserError
from melanoma_mil.ids import id_path
from melanoma_mil.io import remove_temp_files
from melanoma_mil.tiling.coords import TileGrid, read_coords, write_coords
from melanoma_mil.tiling.fingerprint import slide_fingerprint
from melanoma_mil.tiling.grid import SlideTiles, tile_slide
from melanoma_mil.tiling.qc import qc_image, write_qc
from melanoma_mil.tiling.slides import mpp_contradicts, open_slide
from melanoma_mil.tiling.tissue import mask_fingerprint
from melanoma_mil.workshare import Claim, describe, disk_full, disk_full_reason

log = logging.getLogger(__name__)


def slide_row(slide_id: str, path: str, status: str, **kw: Any) -> dict[str, Any]:
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


def lock_path(task: Task) -> Path:
    """The slide's claim, which its worker holds (and dates) while it tiles the slide."""
    return id_path(Path(task.out) / "coords", task.slide_id, ".lock")


def outputs(task: Task) -> tuple[Path, Path]:
    """The slide's coords and QC image, which its worker writes (each via a temp file)."""
    out = Path(task.out)
    return id_path(out / "coords", task.slide_id, ".h5"), id_path(out / "qc", task.slide_id, ".png")


def _reason(e: Exception) -> str:
    if isinstance(e, UserError):
        return str(e)
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def tile_one(task: Task) -> dict[str, Any]:
    """Claim, tile and write one slide's QC image and coords; a failure becomes a 'failed' row
    (on a full disk with ``fatal`` set: no further slide is claimed), a slide another live
    process holds a 'claimed' row. Coords are written last, so their presence means the slide
    is completely done."""
    coords, qc = outputs(task)
    claim = Claim(lock_path(task), task.stale_after)
    row = slide_row(task.slide_id, task.path, "failed")
    start = time.perf_counter()
    try:
        coords.parent.mkdir(parents=True, exist_ok=True)
        if not claim.acquire():
            return slide_row(task.slide_id, task.path, "claimed", reason=describe(claim.owner))
        remove_temp_files(coords, qc)  # a killed writer's (the claim was its)
        if coords.is_file() and coords.stat().st_mtime >= task.since:  # a peer just did it
            peer = existing_row(task, coords, task.since)
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
        grid = tiles.grid
        if not len(grid.coords):  # recorded, so a re-run says why, not just 'already tiled'
            grid = dataclasses.replace(grid, empty_reason=_empty_reason(tiles, dims, task.cfg))
        write_coords(coords, grid)
    except Exception as e:  # a corrupt slide fails in a reader, PIL or numpy: report, go on
        row.update(reason=_reason(e), seconds=time.perf_counter() - start)
        if isinstance(e, OSError) and disk_full(e):
            folder = Path(e.filename).parent if e.filename else coords.parent
            why = disk_full_reason(e, folder)
            row.update(reason=why, fatal=why)
        return row
    finally:
        claim.release()
    n = len(grid.coords)
    row.update(status="ok" if n else "empty", n_tiles=n, mpp=grid.level0_mpp,
               reason=grid.empty_reason,
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


def existing_row(task: Task, coords: Path, since: float) -> dict[str, Any] | None:
    """Row for a slide whose coords file exists (its tiling settings were checked up front):
    skipped, or failed if made with an mpp that mpp_csv now contradicts or from another file;
    None when the slide changed in place since (a re-scan): its coords, tile's own output, are
    remade."""
    grid = read_coords(coords)
    row = slide_row(task.slide_id, task.path, "skipped", n_tiles=len(grid.coords),
               mpp=grid.level0_mpp, mpp_source=grid.mpp_source)  # fmt: skip
    with contextlib.suppress(OSError):  # left by a process killed right after writing it
        Claim(lock_path(task), task.stale_after).clear_stale()
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
    elif len(grid.coords):
        row["reason"] = "already tiled"
    else:  # and why, as when it was tiled (files made before it was recorded: none)
        why = f" ({grid.empty_reason})" if grid.empty_reason else ""
        row["reason"] = f"already tiled: empty{why}"
    return row


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
