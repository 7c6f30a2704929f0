"""What a float16 bag store costs on float32 features: `fit` with data.dtype=float32 vs float16.

float16 features (what `extract` writes) are stored as float16 exactly, so only float32 caches
face this choice; `data.dtype=auto` keeps them float32. This runs the same `fit` (same seed,
folds, epochs) on a generated float32 cohort with the store in each dtype, and once more in
float32 with another seed as the yardstick: the pooled AUC of each, how far its test
probabilities move from the float32 run's, and the store sizes.

    python benchmarks/store_dtype.py [--bags 120 --dim 64 --shift 4 --epochs 20]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pandas as pd

from melanoma_mil.config import FitConfig, load_config
from melanoma_mil.data.synthetic import make_bag_cohort
from melanoma_mil.training.cv import run_fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bags", type=int, default=120)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--shift", type=float, default=4.0, help="planted signal strength")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("/tmp/melanoma_mil_bench_dtype"))
    a = ap.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    root = a.out / f"{a.bags}x{a.dim}-shift{a.shift:g}"
    if not (root / "labels.csv").is_file():
        make_bag_cohort(root, n_patients=a.bags, dim=a.dim, n_instances=(20, 200),
                        shift=a.shift, dtype="float32")  # fmt: skip
    runs = {}
    for name, extra in (
        ("float32", ["data.dtype=float32"]),
        ("float16", ["data.dtype=float16"]),
        ("float32, seed=1", ["data.dtype=float32", "seed=1"]),
    ):
        out = a.out / f"run_{name.replace(', ', '_').replace('=', '')}"
        cfg = load_config(FitConfig, [], [
            f"data.features_dir={root / 'features'}", f"data.labels_csv={root / 'labels.csv'}",
            f"output_dir={out}", "overwrite=true", "logger=none", "trainer.accelerator=cpu",
            f"trainer.max_epochs={a.epochs}", "cv.folds=3", "optim.lr=1e-3", *extra,
        ])  # fmt: skip
        assert run_fit(cfg) == 0
        runs[name] = out
    preds = {n: pd.read_csv(o / "predictions.csv").set_index("slide_id") for n, o in runs.items()}
    ref = preds["float32"]["prob"]
    print(f"{a.bags} bags x {a.dim} float32 features (shift {a.shift:g}), {a.epochs} epochs, "
          "3 folds, optim.lr=1e-3")  # fmt: skip
    for name, out in runs.items():
        auc = json.loads((out / "cv_summary.json").read_text())["pooled_auc"]["value"]
        line = f"{name:<16} pooled AUC {auc:.4f}"
        if name != "float32":
            diff = (preds[name]["prob"].loc[ref.index] - ref).abs()
            line += f"; |prob - float32 run's| mean {diff.mean():.3f}, max {diff.max():.3f}"
        print(line)
    for s in sorted((root / "features" / ".bag_stores").iterdir()):
        print(f"  store {s.name}: {(s / 'features.npy').stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
