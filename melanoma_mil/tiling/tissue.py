"""Tissue masks on a low-resolution thumbnail, automatic (saturation + Otsu) or user-drawn.

Stained tissue is coloured and glass is grey/white, so HSV saturation separates them across
scanners better than brightness does. The floor under Otsu keeps blank slides blank (Otsu
always splits *something*); the morphology and minimum area remove dust and pen specks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from melanoma_mil.config import TissueConfig
from melanoma_mil.errors import UserError
from melanoma_mil.ids import id_path

log = logging.getLogger(__name__)

# Named parameter sets; any key set explicitly in the config wins over its preset.
PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(
        min_saturation=0.05, blur=7, close_size=5, open_size=3, fill_holes=True,
        min_area_um2=25_000.0,
    ),
    # pale or under-stained sections: lower floor, smaller specks kept
    "faint": dict(
        min_saturation=0.02, blur=5, close_size=7, open_size=3, fill_holes=True,
        min_area_um2=15_000.0,
    ),
    # adipose tissue: thin septa around empty fat cells; close wide and fill the cells
    "fatty": dict(
        min_saturation=0.04, blur=5, close_size=11, open_size=3, fill_holes=True,
        min_area_um2=50_000.0,
    ),
}  # fmt: skip
# Otsu never cuts above this: on a slide covered edge to edge with tissue it would otherwise
# split the tissue itself into "pale" and "dark" and drop half of it.
MAX_OTSU = 0.2


def resolve_tissue(cfg: TissueConfig) -> TissueConfig:
    """``cfg`` with every unset (None) key filled from its preset."""
    if cfg.preset not in PRESETS:
        raise UserError(
            f"unknown tiling.tissue.preset '{cfg.preset}'; choose one of {sorted(PRESETS)}."
        )
    preset = PRESETS[cfg.preset]
    filled = {k: v for k, v in preset.items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **filled)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of an RGB uint8 image."""
    mx = rgb.max(axis=-1).astype(np.float32)
    mn = rgb.min(axis=-1).astype(np.float32)
    return np.divide(mx - mn, mx, out=np.zeros_like(mx), where=mx > 0)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Threshold maximising the between-class variance of ``values`` in [0, 1]."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def _morph(mask: np.ndarray, size: int, op: str) -> np.ndarray:
    if size <= 1:
        return mask
    structure = np.ones((size, size), bool)
    if op == "close":  # pad so tissue touching the border is not eroded away
        padded = np.pad(mask, size, mode="edge")
        return ndimage.binary_closing(padded, structure)[size:-size, size:-size]
    return ndimage.binary_opening(mask, structure)


def segment_tissue(rgb: np.ndarray, pixel_um: float, cfg: TissueConfig) -> np.ndarray:
    """Boolean tissue mask of a thumbnail whose pixels are ``pixel_um`` microns wide."""
    p = resolve_tissue(cfg)
    sat = saturation(rgb)
    if p.saturation_threshold is not None:
        thr = p.saturation_threshold
    else:
        thr = max(min(otsu_threshold(sat), MAX_OTSU), float(p.min_saturation or 0.0))
    mask = sat > thr
    if p.blur and p.blur > 1:
        # median blur then threshold == threshold then majority vote (rank filters commute
        # with thresholds), and the vote is a box filter: O(1) per pixel at any kernel size
        size = p.blur | 1
        mask = ndimage.uniform_filter(mask.astype(np.float32), size, mode="nearest") > 0.5
    mask = _morph(mask, int(p.close_size or 0), "close")
    mask = _morph(mask, int(p.open_size or 0), "open")
    if p.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    return remove_small(mask, float(p.min_area_um2 or 0.0) / pixel_um**2)


def remove_small(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """Drop 8-connected components with fewer than ``min_pixels`` pixels."""
    if min_pixels <= 1 or not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    keep = areas >= min_pixels
    keep[0] = False
    return keep[labels]


def _rings(geometry: dict[str, Any]) -> list[list[list[list[float]]]]:
    """Polygons (each a list of rings: exterior first, then holes) of a GeoJSON object."""
    kind = geometry.get("type")
    if kind == "FeatureCollection":
        return [r for f in geometry.get("features", []) for r in _rings(f)]
    if kind == "Feature":
        return _rings(geometry.get("geometry") or {})
    if kind == "GeometryCollection":
        return [r for g in geometry.get("geometries", []) for r in _rings(g)]
    if kind == "Polygon":
        return [geometry["coordinates"]]
    if kind == "MultiPolygon":
        return list(geometry["coordinates"])
    return []


def _rasterize_geojson(path: Path, shape: tuple[int, int], downsample: float) -> np.ndarray:
    try:
        polygons = _rings(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"mask '{path}' is not valid GeoJSON ({e}); fix or remove it.") from None
    if not polygons:
        raise UserError(f"mask '{path}' has no Polygon/MultiPolygon; fix or remove it.")
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for rings in polygons:
        for i, ring in enumerate(rings):
            pts = [(float(x) / downsample, float(y) / downsample) for x, y, *_ in ring]
            if len(pts) >= 3:
                draw.polygon(pts, fill=0 if i else 1)
    return np.asarray(canvas, dtype=bool)


def mask_fingerprint(mask_dir: str | os.PathLike[str] | None, slide_id: str) -> str:
    """The user mask a slide is tiled with, as '<file name>:<sha256>' ("" for none), so that an
    edited, added or removed mask tiles the slide again."""
    if not mask_dir:
        return ""
    for suffix in (".png", ".geojson"):  # load_user_mask's order
        path = id_path(mask_dir, slide_id, suffix)
        if path.is_file():
            return f"{path.name}:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    return ""


def _warn_if_other_shape(png: Path, size: tuple[int, int], shape: tuple[int, int]) -> None:
    """A mask of another aspect ratio than its slide (a crop, a rotated or padded export) is
    stretched over the slide and so marks the wrong tissue: tiles would come from the wrong
    places with no error. Rounding of either image's size by a pixel is tolerated."""
    (w, h), (sh, sw) = size, shape
    tolerance = 0.01 + 1 / min(w, h) + 1 / min(sw, sh)
    if abs((w / h) / (sw / sh) - 1) > tolerance:
        log.warning(
            "mask '%s' is %dx%d px, aspect %.3g, but its slide's aspect is %.3g: it is "
            "stretched over the whole slide; export it from the whole, unrotated slide",
            png, w, h, w / h, sw / sh,
        )  # fmt: skip


def load_user_mask(
    mask_dir: str | os.PathLike[str], slide_id: str, shape: tuple[int, int], downsample: float
) -> np.ndarray | None:
    """The user's mask for ``slide_id`` at thumbnail ``shape``, or None when there is none.

    ``<slide_id>.png``: non-zero = tissue, any size (stretched over the slide); in a palette
    image its index (a label image's label, whatever colour shows it), and transparent = not.
    ``<slide_id>.geojson``: polygons in level-0 pixels (QuPath export), holes honoured.
    """
    root = Path(mask_dir)
    if not root.is_dir():
        raise UserError(f"tiling.mask_dir '{root}' is not a folder: check the path.")
    png, geo = id_path(root, slide_id, ".png"), id_path(root, slide_id, ".geojson")
    if png.is_file():
        try:
            with Image.open(png) as im:
                # a palette's colours would read a label 0 shown white (ImageJ's inverted LUT)
                # as tissue everywhere; LA: a mask painted on a transparent layer
                _warn_if_other_shape(png, im.size, shape)
                values = im if im.mode == "P" else im.convert("LA")
                small = np.asarray(values.resize((shape[1], shape[0]), Image.NEAREST))
        except Image.DecompressionBombError:
            raise UserError(
                f"mask '{png}' is too large for Pillow to open safely; save it downsampled "
                "(any size is stretched over the slide)."
            ) from None
        except OSError as e:
            raise UserError(f"mask '{png}' is not a readable image ({e}).") from None
        return small > 0 if small.ndim == 2 else (small > 0).all(axis=-1)
    if geo.is_file():
        return _rasterize_geojson(geo, shape, downsample)
    return None
