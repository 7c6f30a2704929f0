"""What a feature vector means: the one definition every writer and reader of features uses.

The identity fields make the cache key (so two settings never share a folder), and they are
exactly what is checked wherever features meet: a cached slide reused by `extract`, the bags of
one `fit` cohort, and a feature cache that `predict` / `heatmap` score with a trained run. A
field a file does not record (CLAM's h5 files record none) is only accepted where the other side
does not record it either.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

IDENTITY_FIELDS = (
    "encoder",
    "encoder_weights",
    "embed_dim",
    "transform",
    "encoder_arch",
    "encoder_pooling",
    "tile_size",
    "target_mpp",
    "overlap",
    "read_mode",  # "fast" (sub-pixel direct reads allowed); absent: pixels as OpenSlide reads
)


def plain(value: Any) -> Any:
    """h5 attr values as Python values (bytes -> str, numpy scalars -> numbers)."""
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value


def feature_identity(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The identity fields of a feature file's attrs (or of a run's provenance, which copies them).

    ``overlap`` lives in the ``tiling`` JSON of files written before it was an attr of its own;
    an undefined resolution (NaN) counts as not recorded.
    """
    ident = {k: plain(attrs.get(k)) for k in IDENTITY_FIELDS}
    if ident["overlap"] is None and attrs.get("tiling"):
        try:
            tiling = json.loads(plain(attrs["tiling"]))
            ident["overlap"] = int(tiling.get("overlap", 0) or 0)
        except (TypeError, ValueError, AttributeError):
            pass
    mpp = ident["target_mpp"]
    if isinstance(mpp, float):
        ident["target_mpp"] = round(mpp, 4) if math.isfinite(mpp) else None
    return ident


def _same(have: Any, want: Any) -> bool:
    if isinstance(have, int | float) and isinstance(want, int | float):
        return math.isclose(float(have), float(want), rel_tol=1e-6)
    return str(have) == str(want)


def identity_mismatch(have: Mapping[str, Any], want: Mapping[str, Any]) -> str | None:
    """Why features with identity ``have`` are not the features ``want`` describes, or None."""
    for key in IDENTITY_FIELDS:
        w, h = want.get(key), have.get(key)
        if w is None and h is None:
            continue
        if w is None or h is None or not _same(h, w):
            return f"has {key}={h!r} where {key}={w!r} is expected"
    return None
