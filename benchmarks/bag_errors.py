"""Which bags the default and the reference get wrong, pooled over seeds (binary sets).

Accuracy gaps of a bag or two between `fit` and the reference are noise or a pattern; this
puts them side by side: the errors each makes at threshold 0.5 (false positives and
negatives), the errors they share, the bags one gets right in every seed and the other does
not, and the pooled accuracy at other thresholds. The reference is re-trained on the same folds
(its per-bag probabilities are not stored; about a minute a seed on MUSK2), the model's are
read from its finished runs under --work.

    python benchmarks/bag_errors.py --work W --set musk2 --seeds 0 1 2 [--model gated_attention]
        [--override key=value ...]   (the overrides the model's runs were made with)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch
from mil_benchmarks import SETS, load_set, reference_probs, run_dir

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def bag_table(
    work: Path, name: str, model: str, seeds: list[int], overrides: list[str]
) -> pd.DataFrame:
    """One row per seed x test bag: y, the reference's and the model's P(second class)."""
    data = work / "data" / name
    loaded = load_set(data)
    y, rows = loaded.y, []
    for seed in seeds:
        preds = pd.read_csv(run_dir(data, model, seed, overrides, work) / "predictions.csv")
        model_p = dict(zip(preds["slide_id"].astype(str), preds["prob"], strict=True))
        for test_ids, train, test in loaded.folds(seed):
            probs = reference_probs(loaded.bags, y, train, test, seed)[:, 1]
            for bag, j, p in zip(test_ids, test, probs, strict=True):
                rows.append({"seed": seed, "bag": bag, "y": y[j], "reference": float(p),
                             "model": model_p[bag]})  # fmt: skip
    return pd.DataFrame(rows)


def report(df: pd.DataFrame) -> None:
    wrong = {who: (df[who] > 0.5) != df["y"].astype(bool) for who in ("reference", "model")}
    for who, err in wrong.items():
        fp, fn = (err & (df["y"] == 0)).sum(), (err & (df["y"] == 1)).sum()
        accs = ", ".join(
            f"{t}: {((df[who] > t) == df['y'].astype(bool)).mean():.4f}" for t in THRESHOLDS
        )
        print(f"{who}: {err.sum()} errors of {len(df)} ({fp} false positive, {fn} false "
              f"negative); pooled accuracy at threshold {accs}")  # fmt: skip
    both = wrong["reference"] & wrong["model"]
    print(f"shared errors {both.sum()}; the reference's alone {(wrong['reference'] & ~both).sum()}"
          f", the model's alone {(wrong['model'] & ~both).sum()}")  # fmt: skip
    per_bag = df.assign(ref_wrong=wrong["reference"], model_wrong=wrong["model"])
    per_bag = per_bag.groupby("bag").agg(
        y=("y", "first"), ref_wrong=("ref_wrong", "sum"), model_wrong=("model_wrong", "sum"),
        reference=("reference", "mean"), model=("model", "mean"),
    )  # fmt: skip
    print("bags either gets wrong in some seed (counts of seeds; mean probabilities):")
    shown = per_bag[(per_bag["ref_wrong"] > 0) | (per_bag["model_wrong"] > 0)]
    print(shown.sort_values(["y", "model_wrong"]).round(3).to_string())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--set", required=True, choices=list(SETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--model", default="gated_attention")
    ap.add_argument("--override", nargs="*", default=[])
    args = ap.parse_args()
    torch.set_num_threads(1)
    report(bag_table(args.work, args.set, args.model, args.seeds, args.override))


if __name__ == "__main__":
    main()
