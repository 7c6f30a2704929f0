"""Does attention find the right tissue? A localisation score against known regions.

score = (share of attention mass inside the regions) / (the regions' share of the tissue).
1.0 is chance (attention spread like the tissue), above 1 means attention concentrates in the
regions; the demo's planted lymphocyte clusters give the regions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from melanoma_mil.errors import UserError
from melanoma_mil.inference.attention import read_attention


def tile_fractions(
    coords: np.ndarray, tile_size: float, mask: np.ndarray, downsample: float
) -> np.ndarray:
    """Fraction of each tile (level-0 x, y, side ``tile_size``) inside ``mask`` (at ``downsample``).

    An integral image makes this O(tiles + mask pixels); tile edges snap to mask pixels.
    """
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), np.int64)
    integral[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    xy = np.asarray(coords, np.float64).reshape(-1, 2)

    def bounds(start: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.clip(np.round(start / downsample), 0, limit).astype(np.int64)
        hi = np.clip(np.round((start + tile_size) / downsample), 0, limit).astype(np.int64)
        return lo, np.maximum(hi, np.minimum(lo + 1, limit))

    x0, x1 = bounds(xy[:, 0], w)
    y0, y1 = bounds(xy[:, 1], h)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = (y1 - y0) * (x1 - x0)
    return np.divide(inside, area, out=np.zeros(len(xy)), where=area > 0)


def _resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if mask.shape == shape:
        return mask.astype(bool)
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize(shape[::-1], Image.NEAREST)
    return np.asarray(img) > 127


def localisation_score(
    coords: np.ndarray,
    tile_size: float,
    attention: np.ndarray,
    region_mask: np.ndarray,
    region_downsample: float,
    tissue_mask: np.ndarray | None = None,
    top_fraction: float | None = None,
) -> float:
    """Attention mass inside ``region_mask`` divided by the regions' share of the tissue.

    ``coords`` [N, 2] level-0 top-left corners of tiles ``tile_size`` level-0 px wide, with
    ``attention`` [N] (any non-negative weights; normalised here). ``region_mask`` is boolean at
    ``region_downsample`` level-0 px per pixel. The tissue is ``tissue_mask`` (boolean, same slide
    extent, any resolution) or, when None, the tiles themselves, which makes uniform attention
    score exactly 1.0. NaN when the regions cover no tissue (nothing to localise).

    ``top_fraction`` (e.g. 0.05) scores the ranking instead of the mass: the top share of tiles
    by attention get equal weight, the rest none. Softmax attention of a weakly trained model
    can rank tiles perfectly yet be nearly flat, which the mass-based score reads as chance.
    """
    a = np.asarray(attention, np.float64)
    if a.ndim != 1 or len(a) != len(coords) or not len(a) or (a < 0).any() or a.sum() <= 0:
        raise UserError(f"attention must be {len(coords)} non-negative weights, not all zero.")
    if top_fraction is not None:
        if not 0 < top_fraction <= 1:
            raise UserError(f"top_fraction={top_fraction} must be in (0, 1].")
        top = np.argsort(-a, kind="stable")[: max(1, round(top_fraction * len(a)))]
        a = np.zeros_like(a)
        a[top] = 1.0
    inside = tile_fractions(coords, tile_size, np.asarray(region_mask, bool), region_downsample)
    mass = float((a * inside).sum() / a.sum())
    if tissue_mask is None:
        share = float(inside.mean())
    else:
        tissue = _resize_mask(np.asarray(tissue_mask, bool), region_mask.shape)
        area = int(tissue.sum())
        share = float((tissue & np.asarray(region_mask, bool)).sum() / area) if area else 0.0
    return mass / share if share > 0 else float("nan")


def slide_localisation(
    attention_h5: str | Path,
    mask_path: str | Path,
    mask_downsample: float,
    top_fraction: float | None = None,
) -> float:
    """Localisation score of one slide's mean attention (attention.h5) against a region PNG.

    ``mask_path`` / ``mask_downsample`` are the demo's cohort.csv columns (non-zero = region);
    the tissue is the tiles. NaN for slides without regions (e.g. immune_low).
    """
    amap = read_attention(attention_h5)
    path = Path(mask_path)
    if not path.is_file():
        raise UserError(f"region mask '{path}' not found: check cohort.csv's mask_path.")
    mask = np.asarray(Image.open(path).convert("L")) > 0
    return localisation_score(
        amap.coords,
        amap.level0_size,
        amap.mean_attention,
        mask,
        float(mask_downsample),
        top_fraction=top_fraction,
    )


def cohort_localisation(
    cohort_csv: str | Path, heatmaps_dir: str | Path, top_fraction: float = 0.05
) -> pd.DataFrame:
    """Localisation of every cohort.csv slide that has an attention.h5, as a table.

    Columns: slide_id, label, localisation (attention mass) and localisation_top (ranking: the
    top ``top_fraction`` of tiles weighted equally). Reads ``<heatmaps_dir>/<slide_id>/
    attention.h5`` (a `heatmap` or `predict` output_dir); slides without one are left out.
    """
    table = pd.read_csv(cohort_csv, dtype={"slide_id": str})
    rows = []
    for r in table.itertuples():
        h5 = Path(heatmaps_dir) / str(r.slide_id) / "attention.h5"
        if h5.is_file():
            args = (h5, str(r.mask_path), float(r.mask_downsample))
            rows.append(
                {
                    "slide_id": r.slide_id,
                    "label": r.label,
                    "localisation": slide_localisation(*args),
                    "localisation_top": slide_localisation(*args, top_fraction),
                }
            )
    return pd.DataFrame(rows, columns=["slide_id", "label", "localisation", "localisation_top"])
