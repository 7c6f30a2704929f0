"""ROC curves of out-of-fold predictions: one thin line per fold, the pooled curve in bold."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from melanoma_mil.io import atomic_path  # noqa: E402


def plot_roc(
    predictions: pd.DataFrame, classes: list[str], path: Path, title: str, pooled_label: str
) -> None:
    """Binary: per-fold + pooled ROC of the positive class; multi-class: pooled one-vs-rest."""
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    y = predictions["y"].to_numpy()
    if len(classes) == 2:
        col = f"prob_{classes[-1]}"
        for (r, k), g in predictions.groupby(["repeat", "fold"]):
            if g["y"].nunique() == 2:
                fpr, tpr, _ = roc_curve(g["y"], g[col])
                ax.plot(fpr, tpr, lw=0.8, alpha=0.5, label=f"fold {k}" if r == 0 else None)
        fpr, tpr, _ = roc_curve(y, predictions[col])
        ax.plot(fpr, tpr, lw=2.2, color="black", label=pooled_label)
    else:
        for i, name in enumerate(classes):
            fpr, tpr, _ = roc_curve(y == i, predictions[f"prob_{name}"])
            ax.plot(fpr, tpr, lw=1.5, label=f"{name} vs rest")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a full disk leaves no truncated png
        fig.savefig(tmp, format="png")
    plt.close(fig)
