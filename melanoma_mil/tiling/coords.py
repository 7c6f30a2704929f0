"""The coords h5 contract between `tile`, `extract`, `heatmap` and `predict` (CLAM-readable).

`coords` [N, 2] int64 holds level-0 (x, y) of each tile's top-left corner. Attributes say how to
read a tile back: read ``read_size`` px at pyramid level ``patch_level`` (downsample
``downsample``) and resize to ``tile_size`` px, giving ``target_mpp`` um/px. ``level0_size`` is
the tile's extent in level-0 px (for drawing). ``tiling`` is the TilingConfig as JSON, so later
stages can reproduce the exact tiling on new slides. ``slide_path`` is absolute (a link is
kept as the link) and ``slide_fingerprint`` identifies the file read (see `tiling.fingerprint`),
so a later stage can refuse another file that happens to have the same name; ``mpp_source`` says
where ``level0_mpp`` came from (file, tiff resolution, objective power, mpp_csv, default).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from melanoma_mil.errors import UserError
from melanoma_mil.io import h5_bytes, read_h5, write_bytes

# attrs that describe one slide's file rather than the cohort's features: a run's provenance,
# copied from one feature file, leaves them out
PER_SLIDE_ATTRS = ("slide_path", "slide_fingerprint", "mpp_source", "reader", "mask_fingerprint")


@dataclass(frozen=True)
class TileGrid:
    coords: np.ndarray  # [N, 2] int64 level-0 x, y
    slide_path: str
    patch_level: int
    downsample: float
    read_size: int  # px at patch_level
    tile_size: int  # px at target_mpp
    level0_mpp: float
    target_mpp: float
    tiling: dict[str, Any]  # the TilingConfig used, as a plain dict
    fingerprint: str = ""  # of the slide file(s) read; "" in files made before it was recorded
    mpp_source: str = ""  # where level0_mpp came from
    # the user mask tiled with ("" none: tissue detected); None in files made before it
    mask_fingerprint: str | None = None
    # why no tile was kept ("" when some were): a re-run that finds the file says it again
    empty_reason: str = ""

    @property
    def level0_size(self) -> int:
        """Tile extent in level-0 pixels."""
        return int(round(self.read_size * self.downsample))

    def attrs(self) -> dict[str, Any]:
        return {
            "slide_path": self.slide_path,
            "patch_size": self.read_size,  # CLAM's name: px read at patch_level
            "patch_level": self.patch_level,
            "downsample": self.downsample,
            "read_size": self.read_size,
            "tile_size": self.tile_size,
            "level0_mpp": self.level0_mpp,
            "target_mpp": self.target_mpp,
            "level0_size": self.level0_size,
            "tiling": json.dumps(self.tiling, sort_keys=True),
            "slide_fingerprint": self.fingerprint,
            "mpp_source": self.mpp_source,
            **(
                {} if self.mask_fingerprint is None else {"mask_fingerprint": self.mask_fingerprint}
            ),
            **({"empty_reason": self.empty_reason} if self.empty_reason else {}),
        }


def write_coords(path: str | os.PathLike[str], grid: TileGrid) -> None:
    """Write a tile grid atomically (never a partial file; a full disk raises OSError)."""

    def build(f: h5py.File) -> None:
        f.create_dataset("coords", data=np.asarray(grid.coords, dtype=np.int64).reshape(-1, 2))
        for k, v in grid.attrs().items():
            f["coords"].attrs[k] = v
            f.attrs[k] = v

    write_bytes(path, h5_bytes(build))


def read_coords(path: str | os.PathLike[str]) -> TileGrid:
    """Read a coords h5 written by `tile`; a clear error if it is not one."""
    p = Path(path)
    try:
        with read_h5(p) as f:
            if "coords" not in f:
                raise UserError(f"{p}: no 'coords' dataset; re-run `tile` for this slide.")
            a = _attrs(f)
            coords = f["coords"][:].astype(np.int64).reshape(-1, 2)
    except OSError as e:
        raise UserError(f"{p}: not a readable h5 file ({e}); delete it, re-run `tile`.") from None
    missing = [k for k in ("patch_level", "downsample", "read_size", "tile_size") if k not in a]
    if missing:
        raise UserError(f"{p}: coords attrs {missing} missing; re-run `tile` to regenerate it.")
    return TileGrid(
        coords=coords,
        slide_path=str(a.get("slide_path", "")),
        patch_level=int(a["patch_level"]),
        downsample=float(a["downsample"]),
        read_size=int(a["read_size"]),
        tile_size=int(a["tile_size"]),
        level0_mpp=float(a.get("level0_mpp", float("nan"))),
        target_mpp=float(a.get("target_mpp", float("nan"))),
        tiling=json.loads(a["tiling"]) if "tiling" in a else {},
        fingerprint=_text(a.get("slide_fingerprint", "")),
        mpp_source=_text(a.get("mpp_source", "")),
        mask_fingerprint=_text(a["mask_fingerprint"]) if "mask_fingerprint" in a else None,
        empty_reason=_text(a.get("empty_reason", "")),
    )


def read_tiling(path: str | os.PathLike[str]) -> tuple[dict[str, Any], str] | None:
    """(the TilingConfig a coords file was made with ({} when it records none), where its
    level-0 mpp came from), reading attrs only, so a whole folder can be checked before any
    work; None if unreadable."""
    try:
        with read_h5(path) as f:
            if "coords" not in f:  # read_coords refuses it too: a leftover, tiled again
                return None
            a = _attrs(f)
            tiling = json.loads(_text(a["tiling"])) if "tiling" in a else {}
            return tiling, _text(a.get("mpp_source", ""))
    except (OSError, ValueError):
        return None


def _attrs(f: h5py.File) -> dict[str, Any]:
    """A coords file's attrs: the file's over its dataset's (older files have only those)."""
    return {**dict(f["coords"].attrs), **dict(f.attrs)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
