"""Reading feature bags: our h5, CLAM h5 or CLAM pt (a cohort's bags live in data/store.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from melanoma_mil.errors import UserError

log = logging.getLogger(__name__)


def bag_path(features_dir: Path, slide_id: str) -> Path | None:
    """Where a slide's bag lives: <dir>/<id>.h5, CLAM's h5_files/<id>.h5 or pt_files/<id>.pt."""
    for candidate in (
        features_dir / f"{slide_id}.h5",
        features_dir / "h5_files" / f"{slide_id}.h5",
        features_dir / "pt_files" / f"{slide_id}.pt",
    ):
        if candidate.is_file():
            return candidate
    return None


def read_attrs(path: Path) -> dict[str, Any]:
    """File attrs of an h5 bag as plain Python values (empty for CLAM pt files)."""
    if path.suffix != ".h5":
        return {}
    with h5py.File(path, "r") as f:
        return {k: v.item() if isinstance(v, np.generic) else v for k, v in f.attrs.items()}


def read_bag(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Return (features [N, D], coords [N, 2] or None), validated: 2-D, non-empty, finite."""
    try:
        if path.suffix == ".pt":
            feats = torch.load(path, map_location="cpu", weights_only=True)
            coords = None
            feats = feats.float().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
        else:
            with h5py.File(path, "r") as f:
                if "features" not in f:
                    raise UserError(
                        f"{path}: no 'features' dataset (found {list(f.keys())}); "
                        "re-run `extract` for this slide or remove it from the labels CSV."
                    )
                feats = f["features"][:]
                coords = f["coords"][:] if "coords" in f else None
    except (OSError, RuntimeError, EOFError) as e:
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
            f"{path}: {bad} tiles have NaN/Inf features; re-extract (try encoder precision fp32)."
        )
    return feats, coords
