"""`compare`'s figure, comparison.png: per-fold AUC per run and the pooled ROC curves, legible
for a whole sweep grid (the 2024 study's 81 runs), not only for a handful of runs."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from melanoma_mil import stats

if TYPE_CHECKING:
    from melanoma_mil.evaluation.compare import RunResult

_LEGEND_INSIDE = 8  # more curves than this: the legend goes beside the ROC axes, not over them


def _pooled_roc_points(run: RunResult) -> tuple[np.ndarray, np.ndarray, str]:
    """(labels, scores, legend) of the run's pooled ROC curve, the legend naming that curve's
    own AUC. Multi-class: the micro-averaged one-vs-rest curve (every bag x class a case), so
    its legend gives the micro AUC, not the table's macro AUC (the mean of per-class areas,
    which no single curve has)."""
    y, p = run.bags["y"].to_numpy(), run.probs()
    if p.ndim == 1:
        return y, p, f"{run.name} (AUC {stats.auc(y, p):.3f})"
    y, p = np.eye(p.shape[1], dtype=int)[y].ravel(), p.ravel()
    return y, p, f"{run.name} (micro AUC {stats.auc(y, p):.3f})"


def _colours(n: int) -> list[Any]:
    """One colour per run: matplotlib's ten cycle colours repeat from the 11th run on."""
    import matplotlib

    if n <= 10:
        return [f"C{i}" for i in range(n)]
    if n <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(n)]
    return [matplotlib.colormaps["turbo"](v) for v in np.linspace(0.05, 0.95, n)]


def plot(runs: list[RunResult], folds: pd.DataFrame) -> bytes:
    """Per-fold AUC per run (a line per fold: the pairing) and the pooled ROC curves; the
    figure widens with the runs, and a long legend sits beside the ROC axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    n = len(runs)
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(max(11.0, 6.0 + 0.3 * n), 4.5), width_ratios=[max(1.0, n / 8), 1.0]
    )
    wide = folds.pivot(index="fold", columns="run", values="auc")[[r.name for r in runs]]
    x = np.arange(n)
    for _, fold_aucs in wide.iterrows():
        ax1.plot(x, fold_aucs.to_numpy(), color="0.7", lw=1, marker="o", ms=4, zorder=1)
    spread = wide.std().fillna(0.0)  # one usable fold: 0, as comparison.csv says, not NaN
    ax1.errorbar(x, wide.mean(), yerr=spread, fmt="D", color="C3", capsize=4, zorder=2)
    ax1.set_xticks(x, [r.name for r in runs], rotation=20 if n <= 8 else 90, ha="right")
    ax1.set_xlim(-0.5, n - 0.5)
    ax1.set_ylabel("test AUC per fold")
    ax1.set_title("per-fold AUC (lines join the same fold)")
    for run, colour in zip(runs, _colours(n), strict=True):
        y, p, label = _pooled_roc_points(run)
        fpr, tpr, _ = roc_curve(y, p)
        ax2.plot(fpr, tpr, color=colour, label=label)
    ax2.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1)
    multiclass = len(runs[0].classes) > 2  # check_paired: every run has the same classes
    title = "pooled ROC, micro-average one-vs-rest" if multiclass else "pooled ROC"
    ax2.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    if n <= _LEGEND_INSIDE:
        ax2.legend(loc="lower right", fontsize=8)
    else:
        columns = int(np.ceil(n / 30))
        ax2.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, ncol=columns)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()
