"""Calibration: does a predicted probability of 0.8 come true 80% of the time?

Binary: the positive class's probability against its observed frequency, in equal-width bins.
Multi-class: top-label calibration (the highest probability against how often that class was
right). ECE is the case-weighted mean gap over bins; Brier is the mean squared error of the
probability (binary) or of the probability vector against the one-hot label (multi-class).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def calibration(y: np.ndarray, probs: np.ndarray, n_bins: int) -> dict[str, Any]:
    """{brier, ece, bins, reliability: [{low, high, n, mean_prob, observed}], definition}."""
    binary = probs.shape[1] == 2
    if binary:
        p, hit = probs[:, 1], (y == 1).astype(float)
        brier = float(np.mean((p - hit) ** 2))
    else:
        p, hit = probs.max(1), (probs.argmax(1) == y).astype(float)
        brier = float(np.mean(((probs - np.eye(probs.shape[1])[y]) ** 2).sum(1)))
    # i / n_bins is the float nearest each edge (linspace gives 0.30000000000000004, so a
    # probability of 0.3 would fall in the bin reported as [0.2, 0.3))
    edges = np.arange(n_bins + 1) / n_bins
    idx = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        inside = idx == b
        n = int(inside.sum())
        row: dict[str, Any] = {"low": float(edges[b]), "high": float(edges[b + 1]), "n": n}
        if n:
            row.update(mean_prob=float(p[inside].mean()), observed=float(hit[inside].mean()))
            ece += n / len(p) * abs(row["observed"] - row["mean_prob"])
        bins.append(row)
    return {
        "brier": brier,
        "ece": float(ece),
        "bins": n_bins,
        "reliability": bins,
        "definition": (
            "positive-class probability vs observed frequency"
            if binary
            else "top-label: highest probability vs accuracy of that class"
        )
        + f"; ECE over {n_bins} equal-width bins, weighted by cases",
    }
