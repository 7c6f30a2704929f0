"""One slide -> a grid of tissue tiles at a target resolution, in level-0 coordinates."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from melanoma_mil.config import TilingConfig, check
from melanoma_mil.errors import UserError
from melanoma_mil.tiling.coords import TileGrid
from melanoma_mil.tiling.fingerprint import slide_fingerprint
from melanoma_mil.tiling.slides import (
    SlideReader,
    check_reachable,
    choose_level,
    find_mpp,
    read_thumbnail,
    slide_mpp,
)
from melanoma_mil.tiling.tissue import (
    load_user_mask,
    mask_fingerprint,
    resolve_tissue,
    segment_tissue,
)

# A tile must span at least this many mask pixels per side for its tissue fraction to mean much.
MIN_MASK_PX_PER_TILE = 4
# The overview kept for QC pictures: long side at most this, and no finer than VIEW_MIN_MPP.
VIEW_MAX_SIDE = 1600
VIEW_MIN_MPP = 2.0


@dataclass(frozen=True)
class SlideTiles:
    """A slide's tile grid plus the thumbnail and mask it was computed from (for QC)."""

    grid: TileGrid
    thumbnail: np.ndarray  # RGB [h, w, 3] overview of the slide
    thumbnail_downsample: float  # level-0 px per thumbnail px
    mask: np.ndarray  # bool, at the segmentation thumbnail's size
    mask_downsample: float  # level-0 px per mask px
    mask_source: str  # "auto" or the user mask file


def check_tiling(cfg: TilingConfig) -> None:
    """Reject settings that cannot make a grid, before any slide is opened."""
    check(cfg, "tiling.")
    if cfg.overlap >= cfg.tile_size:
        raise UserError(f"tiling.overlap={cfg.overlap} must be < tile_size={cfg.tile_size}.")
    if cfg.mask_dir and not Path(cfg.mask_dir).is_dir():
        raise UserError(
            f"tiling.mask_dir '{cfg.mask_dir}' is not a folder; point it at your masks "
            "(<slide_id>.png or .geojson), or leave it unset."
        )
    resolve_tissue(cfg.tissue)


def grid_positions(extent: int, size: float, stride: float, end: float | None = None) -> np.ndarray:
    """Level-0 starts of tiles of ``size`` every ``stride`` px that fit inside ``extent``. A
    start that rounding, or a read level ending sooner (at level-0 ``end``: its size was
    rounded down), would take past the edge is moved back to fit: its read would end in a
    line of white from beyond the slide."""
    if extent < size:
        return np.zeros(0, np.int64)
    n = int(np.floor((extent - size) / stride + 1e-9)) + 1
    last = max(0.0, np.floor((extent if end is None else min(extent, end)) - size + 1e-6))
    return np.minimum(np.round(np.arange(n) * stride), last).astype(np.int64)


def tissue_fraction(
    mask: np.ndarray, downsample: float, xs: np.ndarray, ys: np.ndarray, size: float
) -> np.ndarray:
    """Tissue fraction [len(ys), len(xs)] of each grid tile, from an integral image of the mask."""
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), np.int64)
    integral[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)

    def bounds(starts: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.clip(np.round(starts / downsample), 0, limit).astype(np.int64)
        hi = np.clip(np.round((starts + size) / downsample), 0, limit).astype(np.int64)
        return lo, np.maximum(hi, np.minimum(lo + 1, limit))

    x0, x1 = bounds(xs, w)
    y0, y1 = bounds(ys, h)
    total = (
        integral[np.ix_(y1, x1)]
        - integral[np.ix_(y0, x1)]
        - integral[np.ix_(y1, x0)]
        + integral[np.ix_(y0, x0)]
    )
    area = np.outer(y1 - y0, x1 - x0)
    return np.divide(total, area, out=np.zeros(area.shape), where=area > 0)


def _tissue_mask(
    slide: SlideReader, slide_id: str, cfg: TilingConfig, level0_mpp: float, tile0: float
) -> tuple[np.ndarray, np.ndarray, float, str]:
    """The QC overview, the tissue mask (the user's from mask_dir, else segmented), the mask's
    downsample from level 0 and where the mask came from. One thumbnail read serves both; the
    mask has at least MIN_MASK_PX_PER_TILE pixels across a tile of ``tile0`` level-0 pixels."""
    w0, h0 = slide.dimensions
    mask_ds = max(1.0, min(cfg.tissue.thumbnail_mpp / level0_mpp, tile0 / MIN_MASK_PX_PER_TILE))
    view_ds = max(max(w0, h0) / VIEW_MAX_SIDE, VIEW_MIN_MPP / level0_mpp, 1.0)
    # one read serves both the QC overview and the (coarser) segmentation thumbnail
    view = read_thumbnail(slide, min(view_ds, mask_ds))
    thumb = view
    if mask_ds > view_ds:
        size = (max(1, round(w0 / mask_ds)), max(1, round(h0 / mask_ds)))
        thumb = np.asarray(Image.fromarray(view).resize(size, Image.BOX))
    mask_ds = w0 / thumb.shape[1]  # exact: the thumbnail size was rounded
    mask, source = None, "auto"
    if cfg.mask_dir:
        mask = load_user_mask(cfg.mask_dir, slide_id, thumb.shape[:2], mask_ds)
        source = "auto" if mask is None else f"user mask in {cfg.mask_dir}"
    if mask is None:
        mask = segment_tissue(thumb, level0_mpp * mask_ds, cfg.tissue)
    return view, mask, mask_ds, source


def tile_slide(
    slide: SlideReader,
    slide_path: str | Path,
    slide_id: str,
    cfg: TilingConfig,
    mpp_override: float | None = None,
    advise_default_mpp: bool = True,
) -> SlideTiles:
    """Tissue mask, pyramid level and the kept tile grid of one open slide.

    ``mpp_override`` (from mpp_csv) replaces what the file says; the grid records the source.
    """
    level0_mpp = slide_mpp(
        slide, cfg.default_mpp, str(slide_path), mpp_override, advise_default_mpp
    )
    mpp_source = find_mpp(slide, cfg.default_mpp, mpp_override)[1]
    check_reachable(level0_mpp, cfg.mpp, str(slide_path))
    choice = choose_level(slide.level_downsamples, level0_mpp, cfg.mpp, cfg.tile_size)
    stride = (cfg.tile_size - cfg.overlap) * choice.level0_size / cfg.tile_size
    w0, h0 = slide.dimensions
    view, mask, mask_ds, source = _tissue_mask(slide, slide_id, cfg, level0_mpp, choice.level0_size)
    lw, lh = slide.level_dimensions[choice.level]
    xs = grid_positions(w0, choice.level0_size, stride, lw * choice.downsample)
    ys = grid_positions(h0, choice.level0_size, stride, lh * choice.downsample)
    frac = tissue_fraction(mask, mask_ds, xs, ys, choice.level0_size)
    iy, ix = np.nonzero(frac >= cfg.min_tissue)
    coords = np.stack([xs[ix], ys[iy]], axis=1).astype(np.int64).reshape(-1, 2)

    resolved = dataclasses.replace(cfg, tissue=resolve_tissue(cfg.tissue))
    grid = TileGrid(
        coords=coords,
        # absolute, links kept: the fingerprint hashes the file name, so a re-open must
        # use this name, not a link's target
        slide_path=str(Path(slide_path).absolute()),
        patch_level=choice.level,
        downsample=choice.downsample,
        read_size=choice.read_size,
        tile_size=cfg.tile_size,
        level0_mpp=level0_mpp,
        target_mpp=cfg.mpp,
        tiling=dataclasses.asdict(resolved),
        fingerprint=slide_fingerprint(slide_path),
        mpp_source=mpp_source,
        mask_fingerprint=mask_fingerprint(cfg.mask_dir, slide_id),
    )
    return SlideTiles(grid, view, w0 / view.shape[1], mask, mask_ds, source)
