"""`heatmap`: per-tile attention of every fold model of a trained run, drawn on its slides.

Per slide, in ``<output_dir>/<slide_id>/``: attention.h5 (coords, fold-mean attention, one
column per fold, probabilities), heatmap.png (percentile-normalised attention over the
thumbnail, tissue outline, predicted probability), montage.png (top- and bottom-k tiles at full
resolution) and, with geojson=true, tiles.geojson for QuPath.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from melanoma_mil.config import HeatmapConfig
from melanoma_mil.errors import UserError
from melanoma_mil.inference.analyse import (
    ATTENTION_FILE,
    FAILED,
    analyse_all,
    check_common,
    claim_for_run,
    made_for,
)
from melanoma_mil.inference.ensemble import Ensemble
from melanoma_mil.inference.inputs import prepare_inputs
from melanoma_mil.io import write_text
from melanoma_mil.tracking.loggers import log_slides

OUTPUTS = (f"*/{ATTENTION_FILE}", "heatmaps.csv")


def run_heatmap(cfg: HeatmapConfig) -> int:
    """Heatmaps for every slide; 0 if none failed, else 1 (after finishing the others)."""
    from melanoma_mil.features.run import resolve_device

    run = check_common(cfg)
    out = Path(cfg.output_dir)
    claim_for_run(cfg, run, "heatmap", OUTPUTS, write=False)
    found = [] if cfg.overwrite else sorted(out.glob(f"*/{ATTENTION_FILE}"))
    done = {p.parent.name for p in found if made_for(p, run)}
    inputs, skipped_ids = prepare_inputs(run, cfg, skip=done)
    claim_for_run(cfg, run, "heatmap", OUTPUTS, write=True)
    skipped = pd.DataFrame(
        {
            "slide_id": skipped_ids,
            "status": "skipped",
            "reason": f"{ATTENTION_FILE} of this run exists (overwrite=true redoes it)",
        }
    )
    table = pd.DataFrame()
    if inputs:
        ensemble = Ensemble(run, resolve_device(cfg.device))
        table = analyse_all(inputs, ensemble, cfg, render=True, desc="heatmap")
    table = pd.concat([table, skipped], ignore_index=True).sort_values("slide_id")
    if table.empty:
        raise UserError(f"no slides to draw: none found, or all already in '{out}'.")
    write_text(out / "heatmaps.csv", table.to_csv(index=False))
    log_slides(run.config, run.run_dir, table, out, "heatmap")
    counts = table["status"].value_counts().to_dict()
    print(
        f"heatmap: {counts} -> {out}/<slide_id>/ (heatmap.png, montage.png, {ATTENTION_FILE});"
        f" table {out / 'heatmaps.csv'}"
    )
    return 1 if table["status"].isin(FAILED).any() else 0
