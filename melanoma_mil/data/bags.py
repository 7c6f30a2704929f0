"""Reading feature bags: our h5, CLAM h5 or CLAM pt (a cohort's bags live in data/store.py)."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from melanoma_mil.errors import UserError
from melanoma_mil.ids import id_path
from melanoma_mil.io import read_h5

log = logging.getLogger(__name__)


# (subfolder, suffix) of a bag, in the order looked at: <dir>/<id>.h5, CLAM's h5_files/<id>.h5
# or pt_files/<id>.pt, or <dir>/<id>.pt (``features_dir`` is CLAM's pt_files/ itself)
BAG_LAYOUTS = (("", ".h5"), ("h5_files", ".h5"), ("pt_files", ".pt"), ("", ".pt"))


def bag_path(features_dir: Path, slide_id: str) -> Path | None:
    """Where a slide's bag lives (the first of BAG_LAYOUTS that exists). Built with
    ``ids.id_path``, so a bag is never looked for outside ``features_dir``."""
    for sub, suffix in BAG_LAYOUTS:
        candidate = id_path(features_dir / sub, slide_id, suffix)
        if candidate.is_file():
            return candidate
    return None


def bag_files(folder: Path) -> dict[str, Path]:
    """slide_id -> bag of every bag in ``folder``, in any of BAG_LAYOUTS (our <id>.h5, CLAM's
    h5_files/ and pt_files/); the first layout holding an id wins, as in `bag_path`."""
    found: dict[str, Path] = {}
    for sub, suffix in BAG_LAYOUTS:
        for path in sorted((folder / sub).glob(f"*{suffix}")):
            if path.is_file() and not path.name.startswith("."):
                found.setdefault(path.stem, path)
    return found


def read_attrs(path: Path) -> dict[str, Any]:
    """File attrs of an h5 bag as plain Python values (empty for CLAM pt files)."""
    if path.suffix != ".h5":
        return {}
    with read_h5(path) as f:
        return {k: v.item() if isinstance(v, np.generic) else v for k, v in f.attrs.items()}


def _numeric(path: Path, name: str, data: Any) -> np.ndarray:
    """``data`` (an h5 node or a loaded .pt object) as a numeric array, or a UserError naming the
    file and what it holds instead (strings, a scalar, a group, a dict...)."""
    if isinstance(data, h5py.Dataset):
        shape = data.shape or ()  # None: an empty dataspace
        if len(shape) == 0 or data.dtype.kind not in "biuf":
            what = "a scalar" if len(shape) == 0 else f"of dtype {data.dtype}"
            raise UserError(
                f"{path}: dataset '{name}' is {what}, not a numeric array; "
                "re-run `extract` for this slide."
            )
        return data[:]
    if isinstance(data, torch.Tensor):
        data = data.float().numpy()
    arr = data if isinstance(data, np.ndarray) else None
    if arr is None or arr.ndim == 0 or arr.dtype.kind not in "biuf":
        raise UserError(
            f"{path}: '{name}' is a {type(data).__name__}, not a numeric array; "
            "re-run `extract` for this slide."
        )
    return arr


def features_entry(f: h5py.File, path: Path) -> Any:
    """The file's ``features`` entry, or the one-line error every bag reader gives."""
    if "features" not in f:
        raise UserError(
            f"{path}: no 'features' dataset (found {list(f.keys())}); "
            "re-run `extract` for this slide or remove it from the labels CSV."
        )
    return f["features"]


def read_bag(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Return (features [N, D], coords [N, 2] or None), validated: 2-D, non-empty, finite."""
    try:
        if path.suffix == ".pt":
            feats = _numeric(
                path, "features", torch.load(path, map_location="cpu", weights_only=True)
            )
            coords = None
        else:
            with read_h5(path) as f:
                feats = _numeric(path, "features", features_entry(f, path))
                coords = _numeric(path, "coords", f["coords"]) if "coords" in f else None
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise UserError(f"{path}: cannot read bag ({e}); re-run `extract` for it.") from None
    if feats.ndim == 3 and feats.shape[0] == 1:
        feats = feats[0]
    if feats.ndim != 2:
        raise UserError(f"{path}: features have shape {feats.shape}, expected [N, D].")
    if feats.shape[0] == 0:
        raise UserError(f"{path}: empty bag (0 tiles); drop the slide or re-tile it.")
    if not np.isfinite(feats).all():
        bad = int((~np.isfinite(feats)).any(axis=1).sum())
        raise UserError(
            f"{path}: {bad} tiles have NaN/Inf features; delete it and re-run `extract` with "
            "precision=fp32 (dtype=float32 if it already ran at fp32)."
        )
    return feats, coords
