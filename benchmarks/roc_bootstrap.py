"""The ROC band of `evaluate` (TPR at 101 FPRs over patient resamples): every resample's curve
at once (`classification.resample_tprs`) against scikit-learn's roc_curve and np.interp called
once per resample, as before. Same cohort (distinct scores and a tie), same resamples, drawn in
roc_band's chunks; it checks the two agree on every resample, then prints their times and the
ratio. Equal bit for bit with numpy's x86-64 wheels; a numpy whose np.interp is compiled with
fused multiply-add (GCC's default on aarch64) may differ in the last bit: the largest difference
is printed then.

    python benchmarks/roc_bootstrap.py [--patients 100 1000 10000 50000 --resamples 1000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import roc_curve

from melanoma_mil.evaluation.classification import resample_tprs
from melanoma_mil.stats import _chunks, _cluster_weights

GRID = np.linspace(0, 1, 101)


def roc_curve_loop(y: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """What roc_band did before: one roc_curve call per resample with both classes."""
    tprs = []
    for counts in w:
        keep = counts > 0
        if len(np.unique(y[keep])) < 2:
            continue
        fpr, tpr, _ = roc_curve(y[keep], score[keep], sample_weight=counts[keep])
        tprs.append(np.interp(GRID, fpr, tpr))
    return np.array(tprs)


def vectorised(y: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """What roc_band does now: one call for the whole chunk of resamples."""
    return resample_tprs(y, score, w, GRID)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--patients", type=int, nargs="+", default=[100, 1000, 10000, 50000])
    ap.add_argument("--resamples", type=int, default=1000, help="roc_band draws at most 1,000")
    args = ap.parse_args()
    warm = np.random.default_rng(1)  # first calls (numpy's and sklearn's lazy set-up) uncounted
    w = _cluster_weights(np.arange(10), 5, warm)
    for tprs in (roc_curve_loop, vectorised):
        tprs(np.arange(10) % 2, warm.random(10), w)
    for n in args.patients:
        rng = np.random.default_rng(0)
        y = rng.integers(0, 2, n)
        score = 0.3 * y + 0.7 * rng.random(n)  # distinct scores (the most thresholds) ...
        score[rng.random(n) < 0.1] = 0.5  # ... and a tie across the classes
        slow = fast = gap = 0.0
        for b in _chunks(args.resamples, n):
            w = _cluster_weights(np.arange(n), b, rng)
            start = time.perf_counter()
            before = roc_curve_loop(y, score, w)
            slow += time.perf_counter() - start
            start = time.perf_counter()
            now = vectorised(y, score, w)
            fast += time.perf_counter() - start
            assert before.shape == now.shape, "the two keep different resamples"
            gap = max(gap, float(np.abs(before - now).max(initial=0)))
        assert gap <= 1e-12, f"the two disagree by {gap:.1e}"
        equal = "every resample equal" if gap == 0 else f"TPRs within {gap:.1e}"
        print(
            f"{n} patients x {args.resamples} resamples: roc_curve loop {slow:.2f} s, "
            f"vectorised {fast:.3f} s; {slow / fast:.0f}x ({equal})"
        )


if __name__ == "__main__":
    main()
