"""The table and figure of `mil_benchmarks.py` runs: per-run scores, paired differences from
the reference on the same folds, a markdown table, and a dot plot of the seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from melanoma_mil.io import atomic_path

REFERENCE = "reference"


def scores(out: Path) -> dict[str, object] | None:
    """Mean over folds of accuracy and AUC, the per-fold values, minutes; None if missing."""
    ref, fit = out / "reference_summary.json", out / "cv_summary.json"
    if ref.is_file():
        folds = json.loads(ref.read_text())
        acc_f, auc_f = folds["accuracy"], folds["auc"]
    elif fit.is_file():
        summary = json.loads(fit.read_text())
        acc_f, auc_f = summary["accuracy"]["per_fold"], summary["auc"]["per_fold"]
    else:
        return None
    timing = out / "timing.json"
    minutes = json.loads(timing.read_text())["seconds"] / 60 if timing.is_file() else math.nan
    # float arrays: an undefined fold AUC (a test fold with one class) is null in the files
    acc, auc = np.array(acc_f, float), np.array(auc_f, float)
    return {
        "accuracy": float(np.mean(acc)),
        "auc": float(np.nanmean(auc)),
        "minutes": minutes,
        "folds": {"accuracy": acc, "auc": auc},
    }


def paired(g: pd.DataFrame, ref: pd.DataFrame, metric: str) -> str:
    """Mean fold-by-fold difference from the reference on the same seeds' folds, with a t
    95% interval over those folds (the folds of one seed share bags, so it is a rough one)."""
    both = g.merge(ref, on="seed", suffixes=("", "_ref"))
    if both.empty:
        return ""
    d = np.concatenate(
        [f[metric] - r[metric] for f, r in zip(both["folds"], both["folds_ref"], strict=True)]
    )
    d = d[np.isfinite(d)]
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return f"{d.mean():+.3f} ({d.mean() - half:+.3f}, {d.mean() + half:+.3f})"


def table(rows: list[dict[str, object]], n_seeds: int) -> str:
    df = pd.DataFrame(rows)
    lines = [
        "| set | method | seeds | accuracy | AUC | Δ accuracy vs reference (95% CI) "
        "| Δ AUC vs reference (95% CI) | wall min / seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (s, m), g in df.groupby(["set", "method"], sort=False):
        acc, auc = g["accuracy"], g["auc"]
        sd = lambda v: f" ± {v.std(ddof=1):.3f}" if len(v) > 1 else ""  # noqa: E731
        ref = df[(df["set"] == s) & (df["method"] == REFERENCE)][["seed", "folds"]]
        vs = ["", ""] if m == REFERENCE else [paired(g, ref, k) for k in ("accuracy", "auc")]
        lines.append(
            f"| {s} | {m} | {len(g)}/{n_seeds} | {acc.mean():.3f}{sd(acc)} | "
            f"{auc.mean():.3f}{sd(auc)} | {vs[0]} | {vs[1]} | {g['minutes'].mean():.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, object]], path: Path) -> None:
    """One row of panels per set (accuracy, AUC): each method's seeds as dots, their mean as a
    bar, and the reference's mean as a dashed line, so a gap reads against the seed spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame(rows)
    sets = list(dict.fromkeys(df["set"]))
    methods = list(dict.fromkeys(df["method"]))
    fig, axes = plt.subplots(
        len(sets), 2, figsize=(9, 0.35 * len(methods) * len(sets) + 1.2), squeeze=False
    )
    for row, name in zip(axes, sets, strict=True):
        d = df[df["set"] == name]
        for ax, metric in zip(row, ("accuracy", "auc"), strict=True):
            for y, m in enumerate(methods):
                v = d.loc[d["method"] == m, metric].to_numpy(float)
                if len(v):
                    ax.plot(v, np.full(len(v), y), "o", ms=3, color="grey", alpha=0.7)
                    ax.plot([v.mean()] * 2, [y - 0.3, y + 0.3], lw=2.5, color="C0")
            ref = d.loc[d["method"] == REFERENCE, metric]
            if len(ref):
                ax.axvline(ref.mean(), ls="--", lw=1, color="C3")
            ax.set_yticks(range(len(methods)), methods, fontsize=7)
            ax.invert_yaxis()
            ax.set_title(f"{name}: {metric}", fontsize=9)
    fig.suptitle("dots: seeds, bar: their mean, dashed line: the reference's mean", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
