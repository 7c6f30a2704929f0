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

# [resamples x cases] of a `resample_tprs` block: arrays past a few MB cost more in page faults
# than in arithmetic (10,000 cases x 400 resamples: all at once 3.6 s, 26 at a time 0.4 s)
BLOCK = 2**18
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
    """Pointwise 95% band of the binary ROC (TPR at each FPR) over patient resamples; every
    resample's curve at once (`resample_tprs`): a roc_curve call per resample was most of
    `evaluate`'s time (benchmarks/roc_bootstrap.py)."""
    grid = np.linspace(0, 1, 101)
    rng = np.random.default_rng(seed + 1)
    tprs = [
        resample_tprs(y, score, _cluster_weights(patients, b, rng), grid)
        for b in _chunks(min(n_boot, 1000), len(y))
    ]
    if not tprs or not (reps := np.concatenate(tprs)).size:
        return grid, np.full_like(grid, np.nan), np.full_like(grid, np.nan)
    low, high = np.quantile(reps, [0.025, 0.975], axis=0)
    return grid, low, high


def resample_tprs(y: np.ndarray, score: np.ndarray, w: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """[resamples, grid]: for each row of case counts ``w`` [B, N] whose resample has both
    classes, ``np.interp(grid, *roc_curve(y, score, sample_weight=row)[:2])`` bit for bit; rows
    lacking a class are left out, as before. Counts are whole numbers, so every sum is exact:
    each resample's curve has roc_curve's points, and its TPRs take np.interp's operations (a
    np.interp compiled with fused multiply-add, as GCC does on aarch64, may differ in the last
    bit)."""
    order = np.argsort(-score, kind="stable")  # roc_curve's thresholds: highest score first
    starts = np.flatnonzero(np.r_[True, np.diff(score[order]) != 0])  # a new score's first case
    positive = y[order] == 1
    rows = max(1, BLOCK // len(score))
    blocks = [
        _block_tprs(w[i : i + rows, order], positive, starts, grid) for i in range(0, len(w), rows)
    ]
    return np.concatenate(blocks) if blocks else np.empty((0, len(grid)))


def _block_tprs(
    w: np.ndarray, positive: np.ndarray, starts: np.ndarray, grid: np.ndarray
) -> np.ndarray:
    """`resample_tprs` of case counts ``w`` whose columns are sorted by descending score."""
    tp = np.add.reduceat(w * positive, starts, axis=1)  # drawn positives per distinct score
    fp = np.add.reduceat(w, starts, axis=1) - tp
    tps, fps = np.cumsum(tp, axis=1), np.cumsum(fp, axis=1)
    both = (tps[:, -1] > 0) & (fps[:, -1] > 0)
    tp, fp, tps, fps = tp[both], fp[both], tps[both], fps[both]
    n_rows = len(tp)
    # roc_curve's drop_intermediate: a point (a drawn score) whose step in (its own counts)
    # equals its step out (the next drawn score's counts) is dropped; the first and last stay
    row, col = np.nonzero((tp > 0) | (fp > 0))  # drawn scores, row by row
    tp, fp = tp[row, col], fp[row, col]
    edge = np.diff(row, prepend=-1, append=-1) != 0  # where a row's points begin and end
    step_out = (np.diff(tp, append=-1) != 0) | (np.diff(fp, append=-1) != 0)  # counts >= 0
    kept = edge[:-1] | edge[1:] | step_out
    row, col = row[kept], col[kept]
    # each row's curve: (0, 0), then its points as fps / fps[-1] and tps / tps[-1]
    n_points = np.bincount(row, minlength=n_rows) + 1
    at = np.arange(len(row)) + row + 1  # after the row's origin and the rows before
    fpr, tpr = np.zeros(len(row) + n_rows), np.zeros(len(row) + n_rows)
    fpr[at], tpr[at] = fps[row, col] / fps[row, -1], tps[row, col] / tps[row, -1]
    # np.interp: a grid FPR x reads the last point with fpr <= x and the one after it
    n_grid = len(grid)
    first_x = np.searchsorted(grid, fpr, side="left")  # the first x at or right of a point
    key = np.repeat(np.arange(n_rows), n_points) * (n_grid + 1) + first_x
    upto = np.bincount(key, minlength=n_rows * (n_grid + 1)).reshape(n_rows, n_grid + 1)
    upto = upto.cumsum(axis=1)[:, :n_grid]  # points with fpr <= x
    left = (np.cumsum(n_points) - n_points)[:, None] + upto - 1
    end = upto == n_points[:, None]
    right = np.where(end, left, left + 1)
    fl, tl, fr, tr = fpr[left], tpr[left], fpr[right], tpr[right]
    with np.errstate(divide="ignore", invalid="ignore"):  # the last point: no segment after it
        between = (tr - tl) / (fr - fl) * (grid - fl) + tl
    return np.where(end | (grid == fl), tl, between)


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
