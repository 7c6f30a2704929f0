"""Classification metrics with patient-bootstrap 95% CIs, and the ROC / PR curves to draw.

Every metric is computed from (weighted) confusion counts, so one matrix product scores all
bootstrap replicates at once: a replicate is a row of case weights saying how often each
case's patient was drawn (`melanoma_mil.stats._cluster_weights`, the resampling `fit` and
`compare` use). Binary: the positive class is the last one and is predicted when its
probability is >= threshold. Multi-class: the predicted class is the most probable one and
every metric is the macro average of its one-vs-rest values over the classes that have cases or
predictions, as scikit-learn's macro with zero_division=0 (a class never predicted has PPV 0,
one only predicted PPV and F1 0: neither is left out); sensitivity (and so balanced accuracy)
over the classes that have cases. A bootstrap replicate lacking one of those
classes leaves every metric undefined (NaN): it is left out of the CIs and counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

from melanoma_mil.metrics import predicted
from melanoma_mil.stats import _chunks, _cluster_weights, macro_auc

METRICS = ("auc", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")
DEFINITIONS = {
    "sensitivity": "TP / (TP + FN)",
    "specificity": "TN / (TN + FP)",
    "ppv": "TP / (TP + FP)",
    "npv": "TN / (TN + FN)",
    "f1": "2 TP / (2 TP + FP + FN)",
    "balanced_accuracy": "(sensitivity + specificity) / 2; multi-class: mean recall",
    "auc": "ROC AUC of the positive class; multi-class: macro one-vs-rest",
}


def _one_vs_rest(
    w: np.ndarray, y: np.ndarray, pred: np.ndarray, c: int, zero_division: float
) -> dict[str, np.ndarray]:
    """Rates of class ``c`` against the rest. PPV / NPV are ``zero_division`` when nothing is
    predicted on their side; the others are NaN only when the cases lack a side."""
    pos, hit = y == c, pred == c
    tp, fn = w @ (pos & hit), w @ (pos & ~hit)
    fp, tn = w @ (~pos & hit), w @ (~pos & ~hit)

    def ratio(num: np.ndarray, den: np.ndarray, undefined: float = np.nan) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / den, undefined)

    return {
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp, zero_division),
        "npv": ratio(tn, tn + fn, zero_division),
        "f1": ratio(2 * tp, 2 * tp + fp + fn, zero_division),
    }


def _scores(w: np.ndarray, y: np.ndarray, probs: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """Every metric for each row of case weights ``w`` [B, N] -> {name: [B]}; NaN in a row
    (replicate) lacking a class that has cases, so every metric drops the replicates the
    AUC drops (a mean over fewer classes is not the same metric)."""
    n_classes = probs.shape[1]
    score = probs[:, 1] if n_classes == 2 else probs
    out: dict[str, Any] = {"auc": macro_auc(y, score, w)}
    classes = np.unique(y)
    if n_classes == 2:  # a single metric: an undefined ratio stays NaN (shown as n/a)
        rates = _one_vs_rest(w, y, pred, 1, np.nan)
        out.update(rates)
        out["balanced_accuracy"] = (rates["sensitivity"] + rates["specificity"]) / 2
    else:
        # as scikit-learn's macro: over the classes with cases or predictions (a class only
        # predicted has PPV and F1 0); sensitivity, undefined without cases, over the former
        labels = np.union1d(classes, pred)
        per_class = {int(c): _one_vs_rest(w, y, pred, int(c), 0.0) for c in labels}
        for name in ("specificity", "ppv", "npv", "f1"):
            out[name] = np.mean(np.stack([r[name] for r in per_class.values()]), axis=0)
        out["sensitivity"] = np.mean([per_class[int(c)]["sensitivity"] for c in classes], axis=0)
        out["balanced_accuracy"] = out["sensitivity"]
    complete = np.all([w @ (y == c) > 0 for c in classes], axis=0)
    for name in METRICS:
        out[name] = np.where(complete, out[name], np.nan)
    return out


def classification_metrics(
    y: np.ndarray,
    probs: np.ndarray,
    patients: np.ndarray,
    threshold: float,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """{metric: {value, ci_low, ci_high}} (percentile CIs over patient-bootstrap replicates),
    and ``bootstrap_dropped``: {metric: replicates left out of its CI as undefined (NaN)}."""
    pred = predicted(probs, threshold)
    value = _scores(np.ones((1, len(y))), y, probs, pred)
    rng = np.random.default_rng(seed)
    reps: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    for b in _chunks(n_boot, len(y)):
        scores = _scores(_cluster_weights(patients, b, rng), y, probs, pred)
        for m in METRICS:
            reps[m].append(scores[m])
    out: dict[str, Any] = {"bootstrap_dropped": {}}
    for m in METRICS:
        r = np.concatenate(reps[m])
        finite = np.isfinite(r)
        if not finite.all():
            out["bootstrap_dropped"][m] = int((~finite).sum())
        r = r[finite]
        low, high = np.quantile(r, [0.025, 0.975]) if len(r) else (np.nan, np.nan)
        out[m] = {"value": float(value[m][0]), "ci_low": float(low), "ci_high": float(high)}
    return out


def roc_curves(
    y: np.ndarray, probs: np.ndarray, classes: list[str]
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, fpr, tpr): the positive class, or each class against the rest."""
    if probs.shape[1] == 2:
        fpr, tpr, _ = roc_curve(y == 1, probs[:, 1])
        return [(classes[1], fpr, tpr)]
    curves = []
    for c, name in enumerate(classes):
        if 0 < (y == c).sum() < len(y):
            fpr, tpr, _ = roc_curve(y == c, probs[:, c])
            curves.append((f"{name} vs rest", fpr, tpr))
    return curves


def roc_band(
    y: np.ndarray, score: np.ndarray, patients: np.ndarray, n_boot: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pointwise 95% band of the binary ROC (TPR at each FPR) over patient resamples."""
    grid = np.linspace(0, 1, 101)
    rng = np.random.default_rng(seed + 1)
    tprs = []
    for b in _chunks(min(n_boot, 1000), len(y)):
        for w in _cluster_weights(patients, b, rng):
            keep = w > 0
            if len(np.unique(y[keep])) < 2:
                continue
            fpr, tpr, _ = roc_curve(y[keep], score[keep], sample_weight=w[keep])
            tprs.append(np.interp(grid, fpr, tpr))
    if not tprs:
        return grid, np.full_like(grid, np.nan), np.full_like(grid, np.nan)
    low, high = np.quantile(np.array(tprs), [0.025, 0.975], axis=0)
    return grid, low, high


def pr_curves(
    y: np.ndarray, probs: np.ndarray, classes: list[str]
) -> list[tuple[str, np.ndarray, np.ndarray, float, float]]:
    """(label, recall, precision, average precision, prevalence) per positive class."""
    targets = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    curves = []
    for c in targets:
        pos = y == c
        if 0 < pos.sum() < len(y):
            precision, recall, _ = precision_recall_curve(pos, probs[:, c])
            ap = float(average_precision_score(pos, probs[:, c]))
            label = classes[c] if probs.shape[1] == 2 else f"{classes[c]} vs rest"
            curves.append((label, recall, precision, ap, float(pos.mean())))
    return curves
