"""attention.h5, the per-slide output contract of `heatmap` and `predict`, and its GeoJSON export.

One AttentionMap holds every fold model's per-tile attention on one slide and the ensemble's
probabilities; `heatmap` draws it, `predict` tabulates it, the demo scores its localisation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from melanoma_mil.io import atomic_h5, atomic_path, json_safe, json_text, read_h5
from melanoma_mil.metrics import predicted
from melanoma_mil.viz.render import percentile_scores


@dataclass
class AttentionMap:
    """Per-tile attention of every fold model on one slide, and the ensemble's prediction."""

    slide_id: str
    coords: np.ndarray  # [N, 2] level-0 x, y (top-left)
    level0_size: int  # tile extent in level-0 px
    attention: np.ndarray  # [F, N], each row sums to 1; of the ensemble's class (`fold_outputs`)
    probs: np.ndarray  # [F, C]
    fold_names: list[str]
    classes: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)  # slide_path, run_dir, encoder, ...
    threshold: float = 0.5  # binary: the positive class is predicted from this probability on

    @property
    def mean_attention(self) -> np.ndarray:
        return self.attention.mean(0)

    @property
    def mean_probs(self) -> np.ndarray:
        return self.probs.mean(0)

    @property
    def pred(self) -> str:
        return self.classes[int(predicted(self.mean_probs[None], self.threshold)[0])]

    def title(self) -> str:
        p = self.probs
        if len(self.classes) == 2:
            lo, hi = p[:, 1].min(), p[:, 1].max()
            return (
                f"{self.slide_id}: P({self.classes[1]}) = {self.mean_probs[1]:.3f} "
                f"(folds {lo:.2f}-{hi:.2f}), {len(self.coords)} tiles"
            )
        p_best = self.mean_probs.max()
        return f"{self.slide_id}: {self.pred} (p = {p_best:.3f}), {len(self.coords)} tiles"


GEOJSON_BLOCK = 4096  # tiles whose numbers `write_geojson` holds as Python objects at once


def _h5_strings(values: list[str]) -> np.ndarray:
    return np.array(values, dtype=h5py.string_dtype())


def write_attention(path: Path, amap: AttentionMap) -> None:
    """attention.h5: coords, attention (fold mean), attention_folds [N, F], score, probs."""
    with atomic_h5(path) as f:
        f.create_dataset("coords", data=amap.coords.astype(np.int64))
        f.create_dataset("attention", data=amap.mean_attention.astype(np.float32))
        folds = f.create_dataset("attention_folds", data=amap.attention.T.astype(np.float32))
        folds.attrs["columns"] = _h5_strings(amap.fold_names)
        f.create_dataset("score", data=percentile_scores(amap.mean_attention))
        probs = f.create_dataset("probs_folds", data=amap.probs.astype(np.float32))
        probs.attrs["rows"] = _h5_strings(amap.fold_names)
        probs.attrs["columns"] = _h5_strings(amap.classes)
        f.attrs.update({k: v for k, v in amap.attrs.items() if v is not None})
        f.attrs.update(
            slide_id=amap.slide_id,
            level0_size=amap.level0_size,
            fold_names=_h5_strings(amap.fold_names),
            classes=_h5_strings(amap.classes),
            pred=amap.pred,
            threshold=amap.threshold,
            probs=amap.mean_probs.astype(np.float64),
        )
        if len(amap.classes) == 2:
            f.attrs["prob"] = float(amap.mean_probs[1])


def _strings(values: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def read_attention(path: str | Path) -> AttentionMap:
    """Read an attention.h5 written by `heatmap` / `predict`."""
    with read_h5(path) as f:
        attrs = {k: v for k, v in f.attrs.items()}
        return AttentionMap(
            slide_id=str(attrs.pop("slide_id")),
            coords=f["coords"][:],
            level0_size=int(attrs.pop("level0_size")),
            attention=f["attention_folds"][:].T,
            probs=f["probs_folds"][:],
            fold_names=_strings(attrs.pop("fold_names")),
            classes=_strings(attrs.pop("classes")),
            threshold=float(attrs.pop("threshold", 0.5)),  # files written before it: 0.5
            attrs=attrs,
        )


def write_geojson(path: Path, amap: AttentionMap) -> None:
    """Tiles as a QuPath-importable FeatureCollection (level-0 px) with attention measurements.

    Written feature by feature, so a 100,000-tile slide never holds the whole document in memory.
    The numbers become Python's a block of tiles at a time and a feature goes to one encoder as
    it is: `json_text` walking every feature to make it JSON-safe, and json.dumps making an
    encoder per feature, took 60% of the time; a feature the encoder refuses (a NaN) still goes
    through `json_text`, so the file is the same.
    """
    mean = amap.mean_attention
    scores = percentile_scores(mean)
    names = [f"attention_{name}" for name in amap.fold_names]
    s = json_safe(amap.level0_size)
    encode = json.JSONEncoder(allow_nan=False).encode
    with atomic_path(path) as tmp, tmp.open("w") as f:
        f.write('{"type": "FeatureCollection", "features": [\n')
        for lo in range(0, len(amap.coords), GEOJSON_BLOCK):
            block = slice(lo, lo + GEOJSON_BLOCK)
            rows = zip(
                amap.coords[block].tolist(),
                mean[block].tolist(),
                scores[block].tolist(),
                amap.attention[:, block].T.tolist(),
                strict=True,
            )
            for i, ((x, y), m, score, folds) in enumerate(rows, lo):
                measurements = {"attention": m, "attention_percentile": score}
                measurements.update(zip(names, folds, strict=True))
                feature = {
                    "type": "Feature",
                    "geometry": {
                        "type": "Polygon",
                        "coordinates": [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]],
                    },
                    "properties": {
                        "objectType": "tile",
                        "name": f"tile {i}",
                        "measurements": measurements,
                    },
                }
                try:
                    text = encode(feature)
                except (TypeError, ValueError):  # a NaN (written as null) or a numpy number
                    text = json_text(feature)
                f.write(("," if i else "") + text + "\n")
        f.write("]}\n")
