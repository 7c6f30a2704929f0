"""Drawing attention on a slide: the heatmap overlay and the tile montage.

Everything is drawn at thumbnail resolution: per-tile scores are splatted onto a canvas the size
of the thumbnail (with a summed-area trick, O(tiles + pixels)), so a 100,000-tile slide never
needs a full-resolution canvas (CLAM's heatmaps allocate one, tens of GB on large slides).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import openslide
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from scipy.stats import rankdata

from melanoma_mil.config import TissueConfig
from melanoma_mil.io import atomic_path
from melanoma_mil.tiling.coords import TileGrid
from melanoma_mil.tiling.slides import read_thumbnail, read_tile
from melanoma_mil.tiling.tissue import segment_tissue

# zlib level of the PNGs: 3 writes a 2048-px heatmap 2.3x faster than PIL's default 6 for +7% size
PNG_LEVEL = 3

BAR_PX = 110  # heatmap.png: colour-bar margin right of the thumbnail
TITLE_PX = 40  # heatmap.png: title band above the thumbnail
LABEL_PX = 18  # montage.png: caption band above each tile
GAP_PX = 6  # montage.png: spacing between tiles
CMAP = "turbo"
ALPHA = 0.45
_BLOCK = 256  # rows blended at a time


def percentile_scores(values: np.ndarray) -> np.ndarray:
    """Rank-based percentiles in [0, 1] (ties share a rank): comparable across slides and folds."""
    if len(values) < 2:
        return np.ones(len(values), np.float32)
    return ((rankdata(values) - 1) / (len(values) - 1)).astype(np.float32)


def thumbnail_downsample(dimensions: tuple[int, int], max_side: int) -> float:
    """Level-0 px per thumbnail px so the long side is at most ``max_side`` (never upsampled)."""
    return max(1.0, max(dimensions) / max(1, max_side))


def score_raster(
    coords: np.ndarray,
    level0_size: float,
    scores: np.ndarray,
    downsample: float,
    shape: tuple[int, int],
) -> np.ndarray:
    """Mean score of the tiles covering each pixel of an (h, w) canvas; NaN where none.

    Each tile adds +-score at its rectangle's four corners; two cumulative sums turn these into
    per-pixel sums, so the cost is O(tiles + pixels) with no per-tile Python loop.
    """
    h, w = shape
    xy = np.asarray(coords, np.float64).reshape(-1, 2)
    x0 = np.clip(np.round(xy[:, 0] / downsample), 0, w).astype(np.int64)
    y0 = np.clip(np.round(xy[:, 1] / downsample), 0, h).astype(np.int64)
    x1 = np.clip(np.maximum(np.round((xy[:, 0] + level0_size) / downsample), x0 + 1), 0, w)
    y1 = np.clip(np.maximum(np.round((xy[:, 1] + level0_size) / downsample), y0 + 1), 0, h)
    x1, y1 = x1.astype(np.int64), y1.astype(np.int64)
    corners = [(y0, x0, 1.0), (y0, x1, -1.0), (y1, x0, -1.0), (y1, x1, 1.0)]
    idx = np.concatenate([yy * (w + 1) + xx for yy, xx, _ in corners])
    sign = np.concatenate([np.full(len(xy), s) for _, _, s in corners])
    values = np.asarray(scores, np.float64)

    def splat(weights: np.ndarray) -> np.ndarray:
        d = np.bincount(idx, weights=weights, minlength=(h + 1) * (w + 1)).reshape(h + 1, w + 1)
        np.cumsum(d, axis=0, out=d)
        return np.cumsum(d, axis=1, out=d)[:h, :w]

    total = splat(sign * np.tile(values, 4))
    count = splat(sign)
    covered = count > 0.5
    np.divide(total, count, out=total, where=covered)
    total[~covered] = np.nan
    return total.astype(np.float32)


def _blend(thumb: np.ndarray, raster: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Thumbnail with scores blended in, in row blocks so float temporaries stay a few MB."""
    out = thumb.copy()
    for r in range(0, len(thumb), _BLOCK):
        scores = raster[r : r + _BLOCK]
        covered = ~np.isnan(scores)[..., None]
        idx = np.round(np.clip(np.nan_to_num(scores), 0.0, 1.0) * 255).astype(np.uint8)
        base = thumb[r : r + _BLOCK].astype(np.float32)
        mixed = base + ALPHA * (lut[idx].astype(np.float32) - base)
        out[r : r + _BLOCK] = np.where(covered, np.round(mixed), base).astype(np.uint8)
    return out


def _colour_bar(draw: ImageDraw.ImageDraw, lut: np.ndarray, x: int, y0: int, y1: int) -> None:
    """A vertical colour bar (1 at the top) with ticks and a caption, between y0 and y1."""
    font = ImageFont.load_default(size=11)
    span = max(1, y1 - y0)
    for y in range(y0, y1):
        colour = tuple(int(c) for c in lut[round(255 * (y1 - 1 - y) / max(1, span - 1))])
        draw.line([(x, y), (x + 14, y)], fill=colour)
    draw.rectangle([x, y0, x + 14, y1], outline="black")
    for value in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = round(y1 - value * span)
        draw.line([(x + 14, y), (x + 18, y)], fill="black")
        draw.text((x + 21, y), f"{value:.2f}", fill="black", font=font, anchor="lm")
    draw.text((x - 4, y0 - 6), "attention\npercentile", fill="black", font=font, anchor="ld")


def draw_heatmap(
    thumb: np.ndarray, raster: np.ndarray, tissue: np.ndarray | None, title: str, path: Path
) -> tuple[int, int]:
    """Overlay ``raster`` (scores in [0, 1], NaN = no tile) on ``thumb``, outline ``tissue``.

    The PNG is (w + BAR_PX, h + TITLE_PX): thumbnail pixels are kept 1:1, and every buffer is
    uint8 at thumbnail size (matplotlib's image pipeline would hold ~100 B per pixel).
    """
    h, w = thumb.shape[:2]
    lut = colormaps[CMAP](np.linspace(0.0, 1.0, 256), bytes=True)[:, :3]
    image = _blend(thumb, raster, lut)
    if tissue is not None and tissue.any() and not tissue.all():
        image[tissue & ~ndimage.binary_erosion(tissue, iterations=2, border_value=1)] = 0
    canvas = Image.new("RGB", (w + BAR_PX, h + TITLE_PX), "white")
    canvas.paste(Image.fromarray(image), (0, TITLE_PX))
    draw = ImageDraw.Draw(canvas)
    draw.text(
        (6, TITLE_PX // 2), title, fill="black", font=ImageFont.load_default(size=14), anchor="lm"
    )
    top = TITLE_PX + max(30, round(0.1 * h))
    _colour_bar(draw, lut, w + 14, top, max(top + 20, TITLE_PX + round(0.9 * h)))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG", compress_level=PNG_LEVEL)
    return canvas.size


def montage_size(k: int, tile_size: int) -> tuple[int, int]:
    """(width, height) of a montage of two rows of ``k`` tiles."""
    return k * (tile_size + GAP_PX) + GAP_PX, 2 * (LABEL_PX + tile_size + GAP_PX) + GAP_PX


def draw_montage(
    slide: openslide.OpenSlide, grid: TileGrid, attention: np.ndarray, top_k: int, path: Path
) -> tuple[int, int]:
    """The ``k`` most (top row) and least (bottom row) attended tiles at full resolution."""
    n = len(attention)
    k = max(1, min(top_k, n // 2))
    order = np.argsort(-attention, kind="stable")
    scores = percentile_scores(attention)
    rows = [("top", order[:k]), ("low", order[::-1][:k])]
    t = grid.tile_size
    size = montage_size(k, t)
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=min(11, max(7, t // 9)))
    for r, (name, picks) in enumerate(rows):
        top = GAP_PX + r * (LABEL_PX + t + GAP_PX)
        for j, i in enumerate(picks):
            left = GAP_PX + j * (t + GAP_PX)
            x, y = grid.coords[i]
            canvas.paste(read_tile(slide, grid, int(x), int(y)), (left, top + LABEL_PX))
            label = f"{name} {j + 1}: p{100 * scores[i]:.0f}"
            draw.text((left, top + 2), label, fill="black", font=font)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG", compress_level=PNG_LEVEL)
    return size


def tissue_outline_mask(thumb: np.ndarray, pixel_um: float, cfg: TissueConfig) -> np.ndarray:
    """Tissue mask at thumbnail size, segmented at `tile`'s resolution (cfg.thumbnail_mpp).

    That is the mask `tile` used, and segmenting a fine thumbnail directly costs ~0.5 s per
    slide in morphology for an outline that gains nothing from it.
    """
    scale = pixel_um / cfg.thumbnail_mpp
    if scale >= 1:
        return segment_tissue(thumb, pixel_um, cfg)
    h, w = thumb.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(thumb).resize(size, Image.Resampling.BOX))
    mask = segment_tissue(small, pixel_um * w / size[0], cfg)
    rows = np.minimum(np.arange(h) * size[1] // h, size[1] - 1)
    cols = np.minimum(np.arange(w) * size[0] // w, size[0] - 1)
    return mask[rows[:, None], cols[None, :]]


def render_slide(
    slide: openslide.OpenSlide,
    grid: TileGrid,
    attention: np.ndarray,
    title: str,
    out_dir: Path,
    top_k: int,
    thumbnail_size: int,
) -> dict[str, Path]:
    """heatmap.png and montage.png of one slide's per-tile ``attention`` into ``out_dir``."""
    ds = thumbnail_downsample(slide.dimensions, thumbnail_size)
    thumb = read_thumbnail(slide, ds)
    ds = slide.dimensions[0] / thumb.shape[1]  # exact, after rounding the thumbnail size
    raster = score_raster(
        grid.coords, grid.level0_size, percentile_scores(attention), ds, thumb.shape[:2]
    )
    tissue = None
    if math.isfinite(grid.level0_mpp):
        keys = set(TissueConfig.__dataclass_fields__)
        tissue_cfg = TissueConfig(
            **{k: v for k, v in grid.tiling.get("tissue", {}).items() if k in keys}
        )
        tissue = tissue_outline_mask(thumb, grid.level0_mpp * ds, tissue_cfg)
    files = {"heatmap": out_dir / "heatmap.png", "montage": out_dir / "montage.png"}
    draw_heatmap(thumb, raster, tissue, title, files["heatmap"])
    draw_montage(slide, grid, attention, top_k, files["montage"])
    return files
