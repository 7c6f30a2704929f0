"""Generated bag cohorts with a planted signal, for tests, benchmarks and quick trials of `fit`.

Positive bags hide a few "key" instances shifted along a fixed direction among background
instances, the classic MIL setting: a mean-pool sees a faint signal, attention sees it clearly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from melanoma_mil.io import atomic_h5, write_text


def make_bag_cohort(
    out_dir: str | Path,
    n_patients: int = 40,
    dim: int = 64,
    n_instances: tuple[int, int] = (20, 60),
    n_key: int = 3,
    classes: tuple[str, ...] = ("immune_low", "immune_high"),
    slides_per_patient: int = 1,
    seed: int = 0,
    shift: float = 3.0,
    dtype: str = "float16",
    encoder: str = "synthetic",
) -> tuple[Path, Path]:
    """Write <out>/features/<slide_id>.h5 bags and <out>/labels.csv; return both paths.

    Class c > 0 bags contain ``n_key`` instances shifted along direction c (class 0: none).
    """
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    features = out / "features"
    directions = rng.standard_normal((len(classes), dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    rows = []
    for p in range(n_patients):
        label = p % len(classes)
        for s in range(slides_per_patient):
            slide_id = f"P{p:04d}_S{s}" if slides_per_patient > 1 else f"P{p:04d}"
            n = int(rng.integers(n_instances[0], n_instances[1] + 1))
            x = rng.standard_normal((n, dim))
            if label > 0:
                key = rng.choice(n, size=min(n_key, n), replace=False)
                x[key] += shift * directions[label]
            with atomic_h5(features / f"{slide_id}.h5") as f:
                f.create_dataset("features", data=x.astype(dtype))
                f.create_dataset(
                    "coords", data=np.stack([np.arange(n) * 256, np.zeros(n)], 1).astype(np.int64)
                )
                f.attrs.update(
                    {
                        "encoder": encoder,
                        "encoder_weights": "synthetic",
                        "cache_key": f"{encoder}-{dim}",
                        "tile_size": 256,
                        "target_mpp": 0.5,
                    }
                )
            rows.append({"slide_id": slide_id, "patient_id": f"P{p:04d}", "label": classes[label]})
    labels = out / "labels.csv"
    write_text(labels, pd.DataFrame(rows).to_csv(index=False))
    return features, labels
