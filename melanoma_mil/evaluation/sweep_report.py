"""What a sweep leaves once its runs are done: sweep_results.csv and the paired comparison of its
finished runs in ``comparison/`` (a folder the sweep owns, marked as its own)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from melanoma_mil import config as C
from melanoma_mil.errors import UserError
from melanoma_mil.evaluation.compare import OUTPUTS as COMPARE_OUTPUTS
from melanoma_mil.evaluation.compare import compare_runs
from melanoma_mil.io import atomic_path
from melanoma_mil.outdir import made_by, read_marker, refuse_linked

RESULTS = "sweep_results.csv"
log = logging.getLogger(__name__)


def _comparison_marker(out: Path) -> dict[str, Any]:
    """The marker of the sweep's own comparison: a `compare` of yours has no ``run_id``."""
    return {"command": "compare", "run_id": "sweep", "run_dir": str(out)}


def own_comparison(out: Path) -> bool:
    """Whether an earlier comparison of this sweep made ``out/comparison`` (then it is
    replaced); anything else there (a `compare` of yours) is refused here, before any fit."""
    folder = out / "comparison"
    refuse_linked(out, "sweep", [folder.name])  # else written, and later replaced, elsewhere
    marker = read_marker(folder)
    if (
        marker is not None
        and marker.get("command") == "compare"
        and marker.get("run_id") == "sweep"
    ):
        return True
    if folder.exists() and not folder.is_dir():
        held = "a file"
    elif marker is not None:
        held = f"output of {made_by(marker)}"
    else:
        found = sorted({p.name for pattern in COMPARE_OUTPUTS for p in folder.glob(pattern)})
        held = f"{found} from an unknown run" if found else ""
    if held:
        raise UserError(
            f"'{folder}' holds {held}, not this sweep's comparison; move it away: the sweep "
            "writes its comparison there."
        )
    return False


def report(
    cfg: C.SweepConfig,
    spec: dict[str, Any],
    entries: list[dict[str, Any]],
    out: Path,
    replace_comparison: bool,
) -> int:
    """sweep_results.csv (sorted by the metric), the table printed, and the paired comparison of
    the finished runs; 1 if any run failed."""
    rows = [
        {"run": e["name"], "state": e["state"], **e["params"], **e.get("metrics", {})}
        for e in entries
    ]
    metric = (spec.get("metric") or {}).get("name")
    # one column order however the ledger was filled (a resumed sweep reads it back from
    # sweep.json): the swept keys, the sweep's metric, then the other metrics by name
    params = dict.fromkeys([*spec["parameters"], *(k for e in entries for k in e["params"])])
    metrics = sorted(
        sorted({k for e in entries for k in e.get("metrics", {})}), key=lambda k: k != metric
    )
    table = pd.DataFrame(rows, columns=["run", "state", *params, *metrics])
    if metric in table.columns:
        ascending = spec["metric"].get("goal") == "minimize"
        # stable: tied runs (AUCs tie often on small cohorts) keep their run order
        table = table.sort_values(metric, ascending=ascending, na_position="last", kind="stable")
    with atomic_path(out / RESULTS) as tmp:
        table.to_csv(tmp, index=False)
    shown = ["run", "state", *spec["parameters"], metric, "cv/pooled_auc"]
    print(table[[c for c in dict.fromkeys(shown) if c in table.columns]].to_string(index=False))
    finished = [str(out / e["name"]) for e in entries if e["state"] == "finished"]
    if len(finished) >= 2:
        compare_runs(
            C.CompareConfig(
                run_dirs=finished,
                output_dir=str(out / "comparison"),
                seed=cfg.seed,
                overwrite=replace_comparison,
            ),
            marker=_comparison_marker(out),
        )
    elif replace_comparison:  # an earlier sweep's (overwrite=true): not of these runs
        for name in COMPARE_OUTPUTS:
            (out / "comparison" / name).unlink(missing_ok=True)
        log.info("%s: the earlier sweep's comparison removed (under 2 finished runs)", out)
    failed = [e["name"] for e in entries if e["state"] != "finished"]
    if failed:
        log.error("%d sweep run(s) failed: %s (see %s)", len(failed), failed, out / "sweep.json")
        return 1
    return 0
