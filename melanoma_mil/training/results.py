"""A `fit` run's results once every fold is done: cv_summary.json, predictions.csv and roc.png
(written through `rundir`), and the table `fit` prints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from melanoma_mil import rundir
from melanoma_mil.config import FitConfig
from melanoma_mil.metrics import METRICS, bag_metrics, summarise
from melanoma_mil.stats import bootstrap_auc_ci
from melanoma_mil.training.orchestrate import Plan
from melanoma_mil.viz.roc import auc_label, plot_roc


def _summary(
    preds: pd.DataFrame, classes: list[str], digest: str, provenance: dict[str, Any], seed: int
) -> dict[str, Any]:
    """cv_summary.json: per-fold metrics and the pooled out-of-fold AUC with a patient CI."""
    prob_cols = [f"prob_{c}" for c in classes]
    per_fold = [
        bag_metrics(g["y"].to_numpy(), g[prob_cols].to_numpy())
        for _, g in preds.groupby(["repeat", "fold"])
    ]
    # pooled out-of-fold: each bag once (its mean over repeats); CI resamples patients
    pooled = rundir.pooled_predictions(preds, classes)
    y, p = pooled["y"].to_numpy(), pooled[prob_cols].to_numpy()
    value, lo, hi = bootstrap_auc_ci(
        y,
        p[:, 1] if p.shape[1] == 2 else p,
        groups=pooled["patient_id"].to_numpy(),
        n_boot=2000,
        seed=seed,
    )
    return {
        **summarise(per_fold),
        "pooled_auc": {
            "value": value,
            "ci_low": lo,
            "ci_high": hi,
            "ci_level": 0.95,
            "bootstrap": 2000,
            "resampled": "patients",
        },
        "classes": classes,
        "n_bags": int(len(pooled)),
        "n_folds": int(len(per_fold)),
        "splits_sha256": digest,
        "encoder": provenance.get("encoder"),
        "cache_key": provenance.get("cache_key"),
    }


def table(summary: dict[str, Any]) -> str:
    """The per-fold metrics and the pooled AUC as `fit` prints them."""
    folds = len(summary["auc"]["per_fold"])
    head = (
        f"{'metric':<18}" + "".join(f"{'f' + str(i):>7}" for i in range(folds)) + "   mean +- std"
    )
    rows = [head, "-" * len(head)]
    for m in METRICS:
        s = summary[m]
        mean = f"{s['mean']:.3f} +- {s['std']:.3f}" if math.isfinite(s["mean"]) else "n/a"
        rows.append(f"{m:<18}" + "".join(f"{_cell(v):>7}" for v in s["per_fold"]) + "   " + mean)
    if any(not math.isfinite(v) for v in summary["auc"]["per_fold"]):
        rows.append("n/a: a test fold lacking a class has no AUC; mean +- std over the others")
    p = summary["pooled_auc"]
    rows.append(
        f"pooled AUC {p['value']:.3f} (95% CI {p['ci_low']:.3f}-{p['ci_high']:.3f}), "
        f"{summary['n_bags']} bags"
    )
    return "\n".join(rows)


def _cell(value: float) -> str:
    """A fold's metric as `fit` prints it: 'n/a' where it is undefined (not 'nan')."""
    return f"{value:.3f}" if math.isfinite(value) else "n/a"


def results_writer(
    plan: Plan, cfg: FitConfig, classes: list[str]
) -> tuple[Any, list[pd.DataFrame]]:
    """The writer `finish` calls once every fold is done, and the predictions it wrote."""
    written: list[pd.DataFrame] = []

    def write(target: Path) -> dict[str, Any]:
        preds = rundir.fold_predictions(target, plan.names)
        summary = _summary(
            preds, classes, plan.splits_doc["sha256"], rundir.read_provenance(target), cfg.seed
        )
        pooled = summary["pooled_auc"]
        label = auc_label(pooled["value"], "pooled AUC")
        title = f"{rundir.display_name(target)}: out-of-fold ROC"
        rundir.write_results(
            target, preds, summary, lambda png: plot_roc(preds, classes, png, title, label)
        )
        written.append(preds)
        return summary

    return write, written
