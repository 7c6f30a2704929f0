"""The feature cache: its key and what makes a cached slide valid.

The cache key names a folder per (encoder, weights, transform, tiling) so two settings can never
share files; a human-readable prefix keeps folders recognisable, a hash keeps them distinct.
Processes sharing a cache folder claim slides with `workshare.Claim`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Mapping
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


def check_cached(path: Path, expected: Mapping[str, Any], coords: np.ndarray) -> str | None:
    """None when ``path`` is a complete cache entry for these settings and coords, else why not."""
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            feats, cached_coords = f["features"], f["coords"][:]
            shape = feats.shape
    except (OSError, KeyError) as e:
        return f"unreadable or incomplete ({type(e).__name__})"
    key = plain(attrs.get("cache_key"))
    if key != expected["cache_key"]:
        return f"attr cache_key={key!r}, expected {expected['cache_key']!r}"
    why = identity_mismatch(feature_identity(attrs), feature_identity(expected))
    if why:
        return why
    if shape != (len(coords), expected["embed_dim"]):
        return f"features {shape}, expected ({len(coords)}, {expected['embed_dim']})"
    if not np.array_equal(cached_coords, coords):
        return "coords differ from the tile grid (tiling was re-run)"
    return None


def clean_temp_files(directory: Path, slide_id: str) -> int:
    """Remove temp files a killed writer of ``slide_id`` left (call only while holding its lock)."""
    n = 0
    for tmp in directory.glob(f".{_glob_escape(slide_id)}.h5.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            n += 1
    return n


def _glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)
