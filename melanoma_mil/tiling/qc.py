"""QC picture per slide: thumbnail, tissue outline (green) and kept tiles (blue boxes).

What a pathologist looks at to accept a tiling: was all tissue found, was pen/glass excluded,
are the tiles where the tissue is.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, PngImagePlugin
from scipy import ndimage

from melanoma_mil.io import atomic_path, temp_target
from melanoma_mil.tiling.grid import SlideTiles

log = logging.getLogger(__name__)

MAX_SIDE = 2048  # px, long side of the QC image
_HEADER = 18  # px band for the caption
CELL_PX = 256  # contact sheet: px per slide at most
CELLS = ".qc_cells"  # in the tile output: each slide's contact sheet cell, for the next sheet
_KEY = "melanoma_mil.cell"  # PNG text of a kept cell: what it was made from
_TEMP_AGE_S = 86400  # a cell's temp file this old was left by a killed writer


def qc_image(tiles: SlideTiles, slide_id: str, max_side: int = MAX_SIDE) -> Image.Image:
    """The slide overview (long side <= ``max_side``) with tissue outline and kept tiles drawn."""
    grid = tiles.grid
    rgb = tiles.thumbnail
    if max(rgb.shape[:2]) > max_side:
        scale = max_side / max(rgb.shape[:2])
        size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.BOX))
    h, w = rgb.shape[:2]
    ds = tiles.thumbnail_downsample * tiles.thumbnail.shape[1] / w  # level-0 px per QC px

    mask = np.asarray(Image.fromarray(tiles.mask).resize((w, h), Image.NEAREST))
    width = max(1, round(max(w, h) / 600))
    edge = mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)
    base = rgb.copy()
    base[edge] = (0, 190, 0)

    overlay = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    side = grid.level0_size / ds
    for x, y in grid.coords / ds:
        draw.rectangle([x, y, x + side - 1, y + side - 1], fill=(40, 90, 255, 45),
                       outline=(20, 60, 230, 200))  # fmt: skip
    image = Image.alpha_composite(Image.fromarray(base).convert("RGBA"), overlay).convert("RGB")

    canvas = Image.new("RGB", (w, h + _HEADER), "white")
    canvas.paste(image, (0, _HEADER))
    caption = (
        f"{slide_id}: {len(grid.coords)} tiles of {grid.tile_size}px @ {grid.target_mpp:g} um/px"
        f" (level {grid.patch_level}), mask: {tiles.mask_source}"
    )
    ImageDraw.Draw(canvas).text((3, 3), caption, fill=(0, 0, 0))
    return canvas


def write_qc(path: str | os.PathLike[str], image: Image.Image) -> None:
    """Save the QC PNG atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", compress_level=3)


def _thumb(qc: Path, cell: int, cache: Path | None) -> Image.Image:
    """``qc`` shrunk to fit a sheet cell. Decoding the 2048 px QC PNGs is most of a sheet's time
    (~5 min at 10k slides), so each is kept in ``cache`` (None: not kept), made again only when
    its QC file's size or mtime, or the cell size, changed."""
    st = qc.stat()
    key = f"{st.st_size}:{st.st_mtime_ns}:{cell}"
    kept = cache / qc.name if cache is not None else None
    if kept is not None:
        with contextlib.suppress(OSError, SyntaxError), Image.open(kept) as im:  # none, or torn
            if im.info.get(_KEY) == key:
                return im.convert("RGB")
    with Image.open(qc) as im:
        im.draft("RGB", (cell, cell))
        thumb = im.convert("RGB")
    thumb.thumbnail((cell - 4, cell - 4), Image.BOX)
    if kept is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(_KEY, key)
        with contextlib.suppress(OSError), atomic_path(kept) as tmp:  # read-only: not kept
            thumb.save(tmp, format="PNG", pnginfo=info, compress_level=1)
    return thumb


def _readable_thumb(qc: Path | None, cell: int, cache: Path | None) -> Image.Image | None:
    """The slide's cell, or None (a grey cell) without a QC image or with one that cannot be
    read (a torn or damaged file): one bad picture must not cost the cohort its sheet."""
    if qc is None or not qc.is_file():
        return None
    try:
        return _thumb(qc, cell, cache)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        log.warning("contact sheet: %s is unreadable (%s); its cell is left grey", qc, e)
        return None


def contact_sheet(
    cells: list[tuple[str, Path | None, str]],
    path: Path,
    cell: int = CELL_PX,
    cache: Path | None = None,
) -> Image.Image:
    """One picture of every slide's QC image, so a cohort's tissue masks are checked at once.

    ``cells``: (slide id, QC PNG or None, caption); a slide without a QC image (failed) gets a
    grey cell with its caption. Cells shrink for large cohorts so the sheet stays < ~9k px wide.
    ``cache``: a folder where each slide's cell is kept for the next sheet.
    """
    cols = max(1, math.ceil(math.sqrt(len(cells))))
    cell = max(64, min(cell, 9000 // cols))
    rows = math.ceil(len(cells) / cols)
    label = 12
    sheet = Image.new("RGB", (cols * cell, rows * (cell + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (sid, qc, caption) in enumerate(cells):
        left, top = (i % cols) * cell, (i // cols) * (cell + label)
        thumb = _readable_thumb(qc, cell, cache)
        if thumb is not None:
            sheet.paste(thumb, (left + 2, top + label))
        else:
            draw.rectangle([left + 2, top + label, left + cell - 3, top + label + cell - 3],
                           fill=(200, 200, 200))  # fmt: skip
            caption = caption if qc is None or not qc.exists() else "QC image unreadable"
        draw.text((left + 2, top), f"{sid} {caption}"[: cell // 6], fill=(0, 0, 0))
    write_qc(path, sheet)
    return sheet


def prune_cells(cache: Path, qc_dir: Path) -> None:
    """Remove kept cells whose QC image is gone, and temps of writers killed a day ago.

    A cell is made from its slide's QC PNG, so it is kept exactly as long as that PNG: slides
    left out of this run's manifest (another array task's share) keep theirs.
    """
    try:
        entries = list(os.scandir(cache))
    except OSError:  # no cache yet, or unreadable: nothing to prune
        return
    for entry in entries:
        with contextlib.suppress(OSError):  # gone meanwhile (a writer's rename): the rest go on
            if temp_target(entry.name) is not None:
                stale = time.time() - entry.stat().st_mtime > _TEMP_AGE_S
            else:
                stale = entry.name.endswith(".png") and not (qc_dir / entry.name).exists()
            if stale:
                os.unlink(entry.path)
