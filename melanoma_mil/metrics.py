"""Bag-level metrics, fold summaries and bootstrap confidence intervals."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

METRICS = ("auc", "accuracy", "balanced_accuracy", "f1")


def auc(y: np.ndarray, prob: np.ndarray) -> float:
    """Binary AUC of the positive (last) class, or macro one-vs-rest AUC; NaN if undefined."""
    n_classes = prob.shape[1]
    if len(np.unique(y)) < 2:
        return math.nan
    if n_classes == 2:
        return float(roc_auc_score(y, prob[:, 1]))
    if len(np.unique(y)) < n_classes:
        return math.nan
    return float(
        roc_auc_score(y, prob, multi_class="ovr", average="macro", labels=list(range(n_classes)))
    )


def predicted(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Class index per row of ``probs`` [n, C]: binary, the last class when its probability is
    >= threshold; multi-class, the most probable. The one rule of fit, predict, heatmap and
    evaluate, so a bag at exactly 0.5 gets one class everywhere."""
    if probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).astype(int)
    return probs.argmax(1)


def bag_metrics(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """AUC, accuracy, balanced accuracy and F1 (positive class; macro for multi-class)."""
    pred = predicted(prob)
    binary = prob.shape[1] == 2
    return {
        "auc": auc(y, prob),
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "f1": float(f1_score(y, pred, average="binary" if binary else "macro", zero_division=0)),
    }


def summarise(per_fold: list[dict[str, float]]) -> dict[str, dict[str, object]]:
    """{metric: {mean, std (sample), per_fold}} over folds."""
    out: dict[str, dict[str, object]] = {}
    for name in METRICS:
        values = np.array([m[name] for m in per_fold], dtype=float)
        finite = values[np.isfinite(values)]
        out[name] = {
            "mean": float(finite.mean()) if finite.size else math.nan,
            "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
            "per_fold": [float(v) for v in values],
        }
    return out
