"""Write RGB images as multi-level pyramidal BigTIFFs that OpenSlide reads (generic tiled TIFF)."""

from __future__ import annotations

import os

import numpy as np
import tifffile
from PIL import Image


def write_pyramid(
    path: str | os.PathLike[str],
    image: np.ndarray,
    mpp: float,
    n_levels: int = 3,
    quality: int = 90,
) -> None:
    """Save ``image`` [H, W, 3] uint8 at ``mpp`` um/px with ``n_levels`` 2x-downsampled levels.

    One IFD per level (not SubIFDs), so OpenSlide sees every level; resolution tags carry mpp.
    """
    res = 1e4 / mpp  # pixels per centimetre
    level = np.ascontiguousarray(image)
    with tifffile.TiffWriter(os.fspath(path), bigtiff=True) as tif:
        for i in range(n_levels):
            scale = 2**i
            tif.write(
                level,
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": quality},
                resolution=(res / scale, res / scale),
                resolutionunit="CENTIMETER",
                subfiletype=1 if i else 0,
            )
            h, w = level.shape[:2]
            if min(h, w) // 2 < 256:
                break
            level = np.asarray(Image.fromarray(level).resize((w // 2, h // 2), Image.BILINEAR))
