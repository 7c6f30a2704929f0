"""`predict`: a trained run's fold-model ensemble on new slides.

Slides are tiled and encoded exactly as the run recorded (or read from a matching feature
cache); the ensemble probability is the mean over fold models. predictions.csv holds, per slide:
slide_id, prob (binary: the positive = last class) and prob_<class>, pred, one prob_<fold> per
fold model (prob_<fold>_<class> for several classes), n_tiles, status and reason.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from melanoma_mil.config import PredictConfig
from melanoma_mil.errors import UserError
from melanoma_mil.io import atomic_path
from melanoma_mil.viz.heatmap import FAILED, analyse_all, check_common, log_to_wandb
from melanoma_mil.viz.inference import Ensemble, prepare_inputs

META = ["n_tiles", "status", "reason"]


def _ordered(table: pd.DataFrame) -> pd.DataFrame:
    """slide_id and prediction columns first, file paths and bookkeeping last."""
    files = [c for c in ("heatmap", "montage", "geojson") if c in table]
    front = [c for c in table.columns if c not in {"slide_id", *META, *files}]
    return table[["slide_id", *front, *META, *files]].sort_values("slide_id")


def run_predict(cfg: PredictConfig) -> int:
    """Predict every slide; 0 if none failed, else 1 (after finishing the others)."""
    from melanoma_mil.features.run import resolve_device

    out = Path(cfg.output_dir)
    target = out / "predictions.csv"
    if target.exists() and not cfg.overwrite:
        raise UserError(f"'{target}' exists; pass overwrite=true or choose another output_dir.")
    run = check_common(cfg)
    inputs, _ = prepare_inputs(run, cfg)
    if not inputs:
        raise UserError("no slides to predict: check slides_dir / manifest / slide_ids.")
    ensemble = Ensemble(run, resolve_device(cfg.device))
    table = _ordered(analyse_all(inputs, ensemble, cfg, render=cfg.heatmaps, desc="predict"))
    with atomic_path(target) as tmp:
        table.to_csv(tmp, index=False)
    log_to_wandb(run, table, out, "predict")
    ok = table[table["status"].isin(["ok", "no_heatmap"])]
    counts = ok["pred"].value_counts().to_dict() if len(ok) else {}
    print(
        f"predict: {len(ok)}/{len(table)} slides, {len(ensemble.models)} fold models, "
        f"predicted {counts} -> {target}"
    )
    return 1 if table["status"].isin(FAILED).any() else 0
