"""Figures of `evaluate` (drawing only; the numbers come from melanoma_mil.evaluation):
ROC with a bootstrap band, precision-recall, reliability diagram, Kaplan-Meier with a
numbers-at-risk table. Each returns PNG bytes, so the same image is saved and embedded in the
HTML report."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 120


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def roc_figure(
    curves: Sequence[tuple[str, np.ndarray, np.ndarray]],
    band: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    title: str,
) -> bytes:
    """ROC curve(s); ``band``: (fpr grid, tpr low, tpr high), shaded."""
    fig, ax = plt.subplots(figsize=(5, 5))
    if band is not None and np.isfinite(band[1]).any():
        ax.fill_between(band[0], band[1], band[2], color="C0", alpha=0.2, lw=0, label="95% CI")
    for i, (label, fpr, tpr) in enumerate(curves):
        ax.plot(fpr, tpr, lw=2, color=f"C{i}", label=label)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1))
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def pr_figure(
    curves: Sequence[tuple[str, np.ndarray, np.ndarray, float, float]], title: str
) -> bytes:
    """Precision-recall curve(s) with their average precision and the prevalence baseline."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for i, (label, recall, precision, ap, prevalence) in enumerate(curves):
        ax.step(recall, precision, where="post", lw=2, color=f"C{i}", label=f"{label} AP {ap:.3f}")
        ax.axhline(prevalence, ls="--", lw=0.8, color=f"C{i}", alpha=0.6)
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title=title, xlim=(0, 1))
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower left", fontsize=8)
    return _png(fig)


def calibration_figure(
    bins: Sequence[dict[str, Any]], scores: np.ndarray, xlabel: str, title: str
) -> bytes:
    """Reliability diagram (observed frequency per bin, point size ~ cases) over a histogram."""
    fig, (ax, hist) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    full = [b for b in bins if b["n"]]
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8, label="perfect calibration")
    if full:
        x = [b["mean_prob"] for b in full]
        y = [b["observed"] for b in full]
        sizes = 20 + 180 * np.array([b["n"] for b in full]) / max(b["n"] for b in full)
        ax.plot(x, y, color="C0", lw=1.5)
        ax.scatter(x, y, s=sizes, color="C0", zorder=3, label="observed (size ~ cases)")
    ax.set(ylabel="observed frequency", title=title, xlim=(0, 1))
    ax.set_ylim(0, 1.01)
    ax.legend(loc="upper left", fontsize=8)
    edges = [bins[0]["low"], *[b["high"] for b in bins]]
    hist.hist(scores, bins=edges, color="C0", alpha=0.7)
    hist.set(xlabel=xlabel, ylabel="cases")
    return _png(fig)


def km_figure(fitters: Sequence[Any], annotation: str, time_label: str, title: str) -> bytes:
    """Kaplan-Meier curve per group (95% bands, censoring ticks), the numbers at risk under
    the axis and ``annotation`` (log-rank p, hazard ratio) on the plot."""
    from lifelines.plotting import add_at_risk_counts

    fig, ax = plt.subplots(figsize=(7, 5.5))
    for kmf in fitters:
        kmf.plot_survival_function(ax=ax, ci_show=True, show_censors=True, lw=2)
    ax.set(xlabel=time_label, ylabel="survival probability", title=title)
    ax.set_ylim(0, 1.02)
    ax.text(
        0.98,
        0.98,
        annotation,
        transform=ax.transAxes,
        ha="right",
        va="top",
        fontsize=9,
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85, "edgecolor": "0.7"},
    )
    ax.legend(loc="lower left", fontsize=8)
    add_at_risk_counts(*fitters, ax=ax, rows_to_show=["At risk"])
    return _png(fig)
