"""How an ensemble's accuracy and AUC move with its member count, measured offline.

Input: single-model runs of `mil_benchmarks.py` that differ only in their init seed, one
--work folder per init seed, each made with
    python benchmarks/mil_benchmarks.py --work W_K --sets SET --seeds S --models MODEL
        --override seed=$((K + S)) model.members=1
(K = 0 for the script's own seeds). cv.seed stays S, so every folder holds the same folds.
For each member count k the script averages the probabilities of every k-subset of the
folders' runs, scores each test fold as `fit` does (mean over folds, then over seeds) and
prints the mean over subsets and its range. This is `model.members` without its training
(members of one `fit` share the bag order); it shows what more members buy and what not.

    python benchmarks/member_curve.py --works W W_1000 W_2000 [--sets musk2 protein]
        [--model gated_attention] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
from mil_benchmarks import SETS, run_dir

from melanoma_mil.metrics import bag_metrics
from melanoma_mil.rundir import load_run


def member_runs(works: list[Path], name: str, model: str, seed: int) -> list[pd.DataFrame]:
    """The out-of-fold predictions of each folder's run, in one bag order, on the same folds."""
    runs = []
    for work in works:
        run = load_run(run_dir(work / "data" / name, model, seed, ["model.members=1"], work))
        runs.append(run.predictions.sort_values("slide_id").reset_index(drop=True))
    for r in runs[1:]:
        if not (r["slide_id"].equals(runs[0]["slide_id"]) and r["fold"].equals(runs[0]["fold"])):
            raise SystemExit(f"{name} seed {seed}: the runs' folds differ; use cv.seed = S")
    return runs


def scores(runs: list[pd.DataFrame], subset: tuple[int, ...]) -> tuple[float, float]:
    """Mean over test folds of the accuracy and AUC of the subset's mean probability."""
    prob = np.mean([runs[i]["prob_positive"].to_numpy() for i in subset], axis=0)
    acc, auc = [], []
    for _, fold in runs[0].groupby("fold"):
        p = prob[fold.index]
        m = bag_metrics(fold["y"].to_numpy(), np.stack([1 - p, p], axis=1))
        acc.append(m["accuracy"])
        auc.append(m["auc"])
    return float(np.mean(acc)), float(np.nanmean(auc))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--works", nargs="+", type=Path, required=True, help="one folder per init seed")
    p.add_argument("--sets", nargs="+", default=["musk2", "protein"], choices=list(SETS))
    p.add_argument("--model", default="gated_attention")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = p.parse_args()
    print("| set | members | subsets | accuracy (range over subsets) | AUC (range over subsets) |")
    print("|---|---|---|---|---|")
    for name in args.sets:
        per_seed = [member_runs(args.works, name, args.model, s) for s in args.seeds]
        n = len(args.works)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            # 3-seed mean of each subset: [subset, (accuracy, AUC)]
            got = np.array([np.mean([scores(r, c) for r in per_seed], axis=0) for c in subsets])
            acc, auc = got[:, 0], got[:, 1]
            print(
                f"| {name} | {k} | {len(subsets)} | {acc.mean():.4f} ({acc.min():.3f}-"
                f"{acc.max():.3f}) | {auc.mean():.4f} ({auc.min():.3f}-{auc.max():.3f}) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
