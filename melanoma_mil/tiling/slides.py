"""Opening slides (`tiling.readers`), their resolution, and reads at a target mpp; which files
are the slides is `tiling.find`'s.

Shared by `tile`, `extract`, `heatmap` and `predict`, so every stage agrees on slide ids, on the
resolution of a slide and on how a tile is read back from its coords. A DICOM WSI is a folder of
.dcm files: the folder is the slide, its name the slide id.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import tifffile
from PIL import Image

from melanoma_mil.config import PLAUSIBLE_MPP
from melanoma_mil.errors import UserError
from melanoma_mil.ids import check_slide_id
from melanoma_mil.io import read_text_csv
from melanoma_mil.tiling.coords import TileGrid
from melanoma_mil.tiling.readers import (
    CziReader,
    OmeTiffReader,
    OpenSlideReader,
    open_reader,
)

SlideReader = OpenSlideReader | OmeTiffReader | CziReader

# A level may be this much coarser than the target and still be used: pyramid downsamples of
# odd-sized levels are not exact (e.g. 4.0007), Aperio AT2 scans are 0.2527 um/px (so 10x is
# their 4x level, 1.1% coarser than 1.0 um/px; at 1% they read 16x the pixels from level 0,
# and a cohort of 0.2520 and 0.2527 scans read from two levels), and a 2% resize is invisible.
LEVEL_TOLERANCE = 0.02
# A target this much finer than level 0 is still tiled (40x scans are 0.22-0.263 um/px, and an
# objective-power mpp is ~10% off); beyond it tiles would be upsampled, blur posing as detail.
UPSAMPLE_TOLERANCE = 0.15
# Thumbnails are read in chunks of this many level pixels so no full level is ever in memory.
_CHUNK = 4096
# `tile`'s other fix for a slide without resolution; predict and heatmap take no tiling keys and
# drop it from the reasons they report (`inference.inputs`)
DEFAULT_MPP_ADVICE = " or set tiling.default_mpp=MPP"
# where a slide's level-0 mpp came from, as recorded in coords files and run tables
MPP_SOURCES = ("file", "tiff resolution", "objective power", "mpp_csv", "default")


def open_slide(path: str | os.PathLike[str]) -> SlideReader:
    """A reader for the slide (`tiling.readers`), or a UserError saying why it cannot be read."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"slide '{p}' not found: check slides_dir / the manifest path.")
    try:
        return open_reader(p)
    except openslide.OpenSlideUnsupportedFormatError:
        raise UserError(
            f"slide '{p}' is not a format OpenSlide reads (nor an OME-TIFF or CZI), or is "
            "corrupt; convert it to pyramidal TIFF or remove it."
        ) from None
    except (openslide.OpenSlideError, tifffile.TiffFileError, RuntimeError) as e:
        raise UserError(f"slide '{p}' is corrupt or truncated ({e}); re-export it.") from None


def plausible(mpp: float | None) -> float | None:
    """``mpp`` if it is a resolution a scanner makes, else None (72 dpi defaults, typos)."""
    if mpp is None or not math.isfinite(mpp):
        return None
    return mpp if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else None


def _float(props: Mapping[str, str], key: str) -> float | None:
    try:
        return float(props[key])
    except (KeyError, ValueError):
        return None


def find_mpp(
    slide: SlideReader, default_mpp: float | None = None, override: float | None = None
) -> tuple[float | None, str]:
    """(level-0 mpp, its source): mpp_csv override, the reader's mpp, TIFF resolution tags,
    objective power (10 / power: 20x -> 0.5; scanners differ by ~10%), the default."""
    if override is not None:
        return override, "mpp_csv"
    props = slide.properties
    mpp = plausible(_float(props, openslide.PROPERTY_NAME_MPP_X))
    if mpp is not None:
        return mpp, "file"
    xres, unit = _float(props, "tiff.XResolution"), props.get("tiff.ResolutionUnit", "")
    per_unit_um = {"centimeter": 1e4, "inch": 25400.0}.get(unit.lower())
    if xres and per_unit_um and (mpp := plausible(per_unit_um / xres)) is not None:
        return mpp, "tiff resolution"
    power = _float(props, openslide.PROPERTY_NAME_OBJECTIVE_POWER)
    if power and (mpp := plausible(10.0 / power)) is not None:
        return mpp, "objective power"
    if default_mpp is not None and default_mpp > 0:
        return default_mpp, "default"
    return None, ""


def slide_mpp(
    slide: SlideReader,
    default_mpp: float | None = None,
    name: str | None = None,
    override: float | None = None,
    advise_default_mpp: bool = True,
) -> float:
    """Level-0 microns per pixel (see `find_mpp`), or a UserError with the fixes (without
    tiling.default_mpp for commands that take no tiling keys)."""
    mpp, _ = find_mpp(slide, default_mpp, override)
    if mpp is None:
        label = name or getattr(slide, "_filename", "slide")
        raise UserError(
            f"slide '{label}' records no resolution (mpp, TIFF resolution or objective power); "
            "give it a row in mpp_csv=CSV (slide_id,mpp; e.g. 0.5 for 20x, 0.25 for 40x)"
            f"{DEFAULT_MPP_ADVICE if advise_default_mpp else ''}."
        )
    return float(mpp)


def mpp_contradicts(level0_mpp: float, override: float | None) -> bool:
    """Whether coords made at ``level0_mpp`` disagree with the slide's mpp_csv row now."""
    return override is not None and abs(level0_mpp - override) > 1e-6 * override


def mpp_outdated(level0_mpp: float, source: str, override: float | None) -> bool:
    """Whether what was made at ``level0_mpp`` (from ``source``, see MPP_SOURCES) is not what
    the slide's mpp_csv row ``override`` (None: no row) makes now: another mpp, or an mpp_csv
    row since dropped (the slide's own mpp applies again)."""
    return mpp_contradicts(level0_mpp, override) or (source == "mpp_csv" and override is None)


def read_mpp_csv(path: str | os.PathLike[str] | None) -> dict[str, float]:
    """slide_id -> level-0 mpp from a CSV with columns slide_id, mpp (checked before any work)."""
    if not path:
        return {}
    p = Path(path)
    df = read_text_csv(p, "mpp_csv", "mpp_csv", ["slide_id", "mpp"])
    if not {"slide_id", "mpp"} <= set(df.columns):
        raise UserError(f"mpp_csv '{p}' needs columns slide_id,mpp; it has {list(df.columns)}.")
    out: dict[str, float] = {}
    for row, sid, raw in zip(df.index, df["slide_id"], df["mpp"], strict=True):
        where = f"mpp_csv '{p}' row {row + 2}"
        sid = check_slide_id(str(sid).strip(), where)
        mpp = pd.to_numeric(raw, errors="coerce")
        if plausible(float(mpp)) is None:
            raise UserError(
                f"{where}: mpp {raw!r} for '{sid}' is not a resolution in "
                f"{PLAUSIBLE_MPP[0]}-{PLAUSIBLE_MPP[1]} um/px; fix the value."
            )
        if sid in out:
            raise UserError(f"{where}: slide '{sid}' is listed twice; keep one row.")
        out[sid] = float(mpp)
    return out


@dataclass(frozen=True)
class LevelChoice:
    """Where and how much to read for one tile of ``tile_size`` px at ``target_mpp``."""

    level: int
    downsample: float  # of that pyramid level
    read_size: int  # px read at ``level``, then resized to tile_size
    level0_size: float  # tile extent in level-0 px


def choose_level(
    level_downsamples: Sequence[float], level0_mpp: float, target_mpp: float, tile_size: int
) -> LevelChoice:
    """The pyramid level closest to ``target_mpp`` without being coarser, and the read size."""
    target_ds = target_mpp / level0_mpp
    candidates = [
        i for i, d in enumerate(level_downsamples) if d <= target_ds * (1 + LEVEL_TOLERANCE)
    ]
    level = max(candidates, key=lambda i: level_downsamples[i]) if candidates else 0
    ds = float(level_downsamples[level])
    read_size = max(1, round(tile_size * target_ds / ds))
    return LevelChoice(level, ds, read_size, read_size * ds)


def check_reachable(level0_mpp: float, target_mpp: float, name: str) -> None:
    """Refuse a target finer than the slide was scanned at: its tiles would be upsampled, and
    in a mixed cohort (20x among 40x scans) look alike to the encoder while holding less."""
    if target_mpp * (1 + UPSAMPLE_TOLERANCE) < level0_mpp:
        raise UserError(
            f"slide '{name}' is scanned at {level0_mpp:g} um/px, coarser than the target "
            f"{target_mpp:g} um/px (its tiles would be upsampled {level0_mpp / target_mpp:.2g}x); "
            "leave the slide out, correct its resolution in mpp_csv if the file's is wrong, "
            f"or tile the cohort at tiling.mpp >= {level0_mpp:g}."
        )


def _to_rgb(region: Image.Image) -> np.ndarray:
    """RGBA from OpenSlide -> RGB on white (transparent = outside the scanned area)."""
    arr = np.asarray(region)
    if arr[..., 3].min() == 255:
        return np.ascontiguousarray(arr[..., :3])
    rgb, alpha = arr[..., :3].astype(np.float32), arr[..., 3:].astype(np.float32) / 255.0
    return (rgb * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)


def read_thumbnail(slide: SlideReader, downsample: float) -> np.ndarray:
    """RGB [h, w, 3] of the whole slide at ``downsample`` (level-0 px per output px).

    Reads the best pyramid level in chunks and shrinks each, so memory stays bounded by the
    output size even on single-level slides (never a whole level 0 at once).
    """
    w0, h0 = slide.dimensions
    out_w, out_h = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
    level = slide.get_best_level_for_downsample(downsample)
    lds = slide.level_downsamples[level]
    lw, lh = slide.level_dimensions[level]
    factor = downsample / lds  # level px per output px
    out = np.full((out_h, out_w, 3), 255, np.uint8)
    for ly in range(0, lh, _CHUNK):
        for lx in range(0, lw, _CHUNK):
            cw, ch = min(_CHUNK, lw - lx), min(_CHUNK, lh - ly)
            ox0, oy0 = round(lx / factor), round(ly / factor)
            ox1 = out_w if lx + cw >= lw else min(out_w, round((lx + cw) / factor))
            oy1 = out_h if ly + ch >= lh else min(out_h, round((ly + ch) / factor))
            if ox1 <= ox0 or oy1 <= oy0:
                continue
            region = slide.read_region((round(lx * lds), round(ly * lds)), level, (cw, ch))
            small = region.resize((ox1 - ox0, oy1 - oy0), Image.BOX)
            out[oy0:oy1, ox0:ox1] = _to_rgb(small)
    return out


def read_tile(slide: SlideReader, grid: TileGrid, x: int, y: int) -> Image.Image:
    """The RGB tile at level-0 (x, y), as `tile` defined it: read_size px resized to tile_size."""
    region = slide.read_region((int(x), int(y)), grid.patch_level, (grid.read_size,) * 2)
    tile = Image.fromarray(_to_rgb(region))
    if grid.read_size != grid.tile_size:
        tile = tile.resize((grid.tile_size, grid.tile_size), Image.BILINEAR)
    return tile
