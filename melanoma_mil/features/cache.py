"""The feature cache: its key and what makes a cached slide valid.

The cache key names a folder per (encoder, weights, transform, tiling) so two settings can never
share files; a human-readable prefix keeps folders recognisable, a hash keeps them distinct.
Processes sharing a cache folder claim slides with `workshare.Claim`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from melanoma_mil.features.identity import (
    IDENTITY_FIELDS,
    feature_identity,
    identity_mismatch,
    plain,
)
from melanoma_mil.io import read_h5
from melanoma_mil.tiling.coords import TileGrid


def slide_identity(provenance: Mapping[str, Any], grid: TileGrid) -> dict[str, Any]:
    """The feature identity of an encoder (its provenance) applied to a tile grid."""
    return feature_identity({**provenance, **grid.attrs()})


def cache_key(identity: Mapping[str, Any]) -> str:
    """``<encoder>-<weights>-<tile>px-<mpp>mpp-<hash8>``: readable, and unique per identity."""
    # read_mode joined the identity later: hashed only when set, so older caches keep their keys
    hashed = {k: identity[k] for k in IDENTITY_FIELDS if k != "read_mode" or identity[k]}
    # the hash input keeps the names it had before IDENTITY_FIELDS, so caches keep their folders
    hashed["arch"], hashed["pooling"] = hashed.pop("encoder_arch"), hashed.pop("encoder_pooling")
    digest = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:8]
    weights = str(identity["encoder_weights"])
    wtag = weights if weights == "random" else "hub" if weights.startswith("hub:") else weights[:8]
    mpp = "nompp" if identity["target_mpp"] is None else f"{identity['target_mpp']:g}mpp"
    name = re.sub(r"[^A-Za-z0-9_.]+", "-", str(identity["encoder"]))
    overlap = f"-ov{identity['overlap']}" if identity["overlap"] else ""
    mode = f"-{identity['read_mode']}" if identity["read_mode"] else ""
    return f"{name}-{wtag}-{identity['tile_size']}px-{mpp}{overlap}{mode}-{digest}"


@dataclass(frozen=True)
class Unusable:
    """Why a cached bag cannot be reused. ``worthless``: it holds nothing to protect
    (unreadable or incomplete), so that slide alone is recomputed without asking."""

    why: str
    worthless: bool = False


def check_cached(path: Path, expected: Mapping[str, Any], coords: np.ndarray) -> Unusable | None:
    """None when ``path`` is a complete cache entry for these settings, coords and slide file."""
    try:
        with read_h5(path) as f:
            attrs = dict(f.attrs)
            for name in ("features", "coords"):  # a group or a scalar there: not our bag
                node = f[name]
                if not isinstance(node, h5py.Dataset) or not node.shape:
                    what = "a scalar" if isinstance(node, h5py.Dataset) else type(node).__name__
                    return Unusable(f"holds '{name}' as {what}, not an array")
            cached_coords = f["coords"][:]
            features = f["features"]
            bad = _mismatch(attrs, features.shape, cached_coords, expected, coords)
            bad = bad or settings_mismatch(attrs, features.dtype, expected)
    except (OSError, KeyError) as e:
        return Unusable(f"is unreadable or incomplete ({type(e).__name__})", worthless=True)
    return bad


def settings_mismatch(
    attrs: Mapping[str, Any], dtype: np.dtype, expected: Mapping[str, Any]
) -> Unusable | None:
    """A stored dtype, or an explicitly asked precision, other than the file's. Neither is in
    the cache key (existing caches keep their folders), so reuse would hand back features made
    otherwise than asked; precision=auto accepts whatever precision the file was made at."""
    keep = " (a new output_dir keeps both)"
    want = expected.get("feature_dtype")
    if want is not None and np.dtype(dtype) != np.dtype(want):
        return Unusable(f"stores {np.dtype(dtype)} features, not the dtype={want} asked{keep}")
    had, asked = plain(attrs.get("precision")), expected.get("precision_requested", "auto")
    if asked != "auto" and had is not None and had != expected["precision"]:
        return Unusable(f"was extracted at precision={had}, not the precision={asked} asked{keep}")
    return None


def _mismatch(
    attrs: Mapping[str, Any],
    shape: tuple[int, ...],
    cached_coords: np.ndarray,
    expected: Mapping[str, Any],
    coords: np.ndarray,
) -> Unusable | None:
    key = plain(attrs.get("cache_key"))
    if key != expected["cache_key"]:
        return Unusable(f"has cache_key={key!r}, expected {expected['cache_key']!r}")
    why = identity_mismatch(feature_identity(attrs), feature_identity(expected))
    if why:
        return Unusable(why)
    # files made before fingerprints were recorded (or by CLAM) record none: nothing to compare
    was, now = (
        plain(attrs.get("slide_fingerprint", "")),
        plain(expected.get("slide_fingerprint", "")),
    )
    if was and now and was != now:
        return Unusable(
            f"was made from another slide file (fingerprint {was}; the coords record {now})"
        )
    if shape != (len(coords), expected["embed_dim"]):
        return Unusable(f"has features {shape}, expected ({len(coords)}, {expected['embed_dim']})")
    if not np.array_equal(cached_coords, coords):
        return Unusable("has coords that differ from the tile grid (tiling was re-run)")
    return None
