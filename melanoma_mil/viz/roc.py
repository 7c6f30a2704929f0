"""ROC curves of out-of-fold predictions: one thin line per fold, the pooled curve in bold."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from melanoma_mil.io import atomic_path  # noqa: E402
from melanoma_mil.rundir import pooled_predictions  # noqa: E402


def auc_label(value: float, prefix: str = "AUC") -> str:
    """A legend's AUC; a fold or cohort lacking a class has none (multi-class: NaN)."""
    return f"{prefix} {value:.3f}" if value == value else f"{prefix} n/a (a class has no cases)"


def plot_roc(
    predictions: pd.DataFrame, classes: list[str], path: Path, title: str, pooled_label: str
) -> None:
    """Binary: per-fold + pooled ROC of the positive class; multi-class: pooled one-vs-rest.

    The pooled curves are drawn from each bag's mean over repeats (`pooled_predictions`), the
    rows `fit`'s pooled AUC (``pooled_label``) is computed from, so with ``cv.repeats > 1`` the
    bold curve's area is the number in its legend, not the AUC of every (repeat, bag) row."""
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    pooled = pooled_predictions(predictions, classes)
    y = pooled["y"].to_numpy()
    if len(classes) == 2:
        col = f"prob_{classes[-1]}"
        for (r, k), g in predictions.groupby(["repeat", "fold"]):
            if g["y"].nunique() == 2:
                fpr, tpr, _ = roc_curve(g["y"], g[col])
                ax.plot(fpr, tpr, lw=0.8, alpha=0.5, label=f"fold {k}" if r == 0 else None)
        if len(set(y)) == 2:
            fpr, tpr, _ = roc_curve(y, pooled[col])
            ax.plot(fpr, tpr, lw=2.2, color="black", label=pooled_label)
        legend_title = None
    else:  # the macro AUC (pooled_label) is the mean area of the curves of classes with cases
        for i, name in enumerate(classes):
            if 0 < (y == i).sum() < len(y):
                score = pooled[f"prob_{name}"]
                fpr, tpr, _ = roc_curve(y == i, score)
                auc = roc_auc_score(y == i, score)
                ax.plot(fpr, tpr, lw=1.5, label=f"{name} vs rest (AUC {auc:.3f})")
        legend_title = f"macro: {pooled_label}"
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower right", fontsize=7, title=legend_title, title_fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a full disk leaves no truncated png
        fig.savefig(tmp, format="png")
    plt.close(fig)
