"""What a sweep writes once its runs are done: sweep_results.csv ranked by the sweep's metric."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from melanoma_mil.config import SweepConfig
from melanoma_mil.evaluation.sweep_report import RESULTS, report


def test_tied_runs_keep_their_run_order_in_the_ranking(tmp_path: Path) -> None:
    """AUCs tie often on small cohorts (they are multiples of 1/(positives x negatives)); an
    81-run grid listed its tied runs in an arbitrary order (an unstable sort), as if ranked.
    Entries as sweep.json holds them (failed, so no comparison is drawn: no run folders)."""
    metric = "cv/auc_mean"
    spec = {"method": "grid", "metric": {"name": metric, "goal": "maximize"},
            "parameters": {"seed": {"values": list(range(81))}}}  # fmt: skip
    values = [(0.5, 0.75, 1.0)[(i * 7) % 3] for i in range(81)]
    entries = [
        {
            "name": f"{i:03d}_seed-{i}",
            "state": "failed",
            "params": {"seed": i},
            "metrics": {metric: v},
        }  # fmt: skip
        for i, v in enumerate(values)
    ]
    cfg = SweepConfig(output_dir=str(tmp_path))
    assert report(cfg, spec, entries, tmp_path, replace_comparison=False) == 1
    table = pd.read_csv(tmp_path / RESULTS)
    assert list(table[metric]) == sorted(values, reverse=True)
    for _, tied in table.groupby(metric, sort=False):
        assert list(tied["seed"]) == sorted(tied["seed"]), list(tied["seed"])
