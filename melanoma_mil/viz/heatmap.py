"""`heatmap`: per-tile attention of every fold model of a trained run, drawn on its slides.

Per slide, in ``<output_dir>/<slide_id>/``: attention.h5 (coords, fold-mean attention, one
column per fold, probabilities), heatmap.png (percentile-normalised attention over the
thumbnail, tissue outline, predicted probability), montage.png (top- and bottom-k tiles at full
resolution) and, with geojson=true, tiles.geojson for QuPath. `predict` reuses `analyse_slide`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from melanoma_mil.config import HeatmapConfig
from melanoma_mil.data.bags import read_attrs, read_bag
from melanoma_mil.errors import UserError
from melanoma_mil.io import write_text
from melanoma_mil.tiling.coords import TileGrid, read_coords
from melanoma_mil.tiling.slides import open_slide
from melanoma_mil.training.artifacts import TrainedRun, load_run
from melanoma_mil.viz.inference import Ensemble, SlideInput, prepare_inputs
from melanoma_mil.viz.render import AttentionMap, render_slide, write_attention

log = logging.getLogger(__name__)
ATTENTION_FILE = "attention.h5"
FAILED = ("failed", "no_heatmap")  # statuses that make the command exit 1
PROVENANCE_ATTRS = (
    "encoder",
    "encoder_weights",
    "cache_key",
    "tile_size",
    "target_mpp",
    "level0_mpp",
)


def check_common(cfg: HeatmapConfig) -> TrainedRun:
    """Validate the keys `heatmap` and `predict` share and open the run."""
    if not cfg.run_dir:
        raise UserError("run_dir is not set: pass run_dir=PATH to a `fit` output folder.")
    if cfg.top_k < 1 or cfg.thumbnail_size < 64:
        raise UserError(
            f"top_k ({cfg.top_k}) must be >= 1 and thumbnail_size ({cfg.thumbnail_size}) >= 64."
        )
    if cfg.batch_size < 1 or (cfg.num_workers or 0) < 0:
        raise UserError("batch_size must be >= 1 and num_workers >= 0.")
    return load_run(cfg.run_dir)


def _failure(e: Exception) -> str:
    if isinstance(e, UserError):
        return str(e)
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"[:300]


def _attention_map(inp: SlideInput, ensemble: Ensemble) -> tuple[AttentionMap, TileGrid]:
    assert inp.features is not None
    feats, _ = read_bag(inp.features)
    grid = read_coords(inp.features)
    if len(grid.coords) != len(feats):
        raise UserError(
            f"{inp.features}: {len(feats)} features but {len(grid.coords)} coords;"
            " re-run `extract` for this slide."
        )
    probs, attention = ensemble(feats)
    attrs = read_attrs(inp.features)
    amap = AttentionMap(
        slide_id=inp.slide_id,
        coords=grid.coords,
        level0_size=grid.level0_size,
        attention=attention,
        probs=probs,
        fold_names=ensemble.fold_names,
        classes=ensemble.classes,
        attrs={
            "run_dir": str(ensemble.run.run_dir.resolve()),
            "slide_path": str(inp.slide_path or grid.slide_path),
            "features": str(inp.features.resolve()),
            **{k: attrs[k] for k in PROVENANCE_ATTRS if k in attrs},
        },
    )
    return amap, grid


def _render(
    inp: SlideInput, amap: AttentionMap, grid: TileGrid, cfg: HeatmapConfig
) -> dict[str, str]:
    """Heatmap files of one slide; attention.h5 is written last, so its presence means done."""
    if inp.slide_path is None:
        raise UserError(
            f"slide file for '{inp.slide_id}' not found (recorded '{grid.slide_path}'); "
            "pass slides_dir or manifest."
        )
    out = Path(cfg.output_dir) / inp.slide_id
    slide = open_slide(inp.slide_path)
    try:
        files = render_slide(amap, slide, grid, out, cfg.top_k, cfg.thumbnail_size, cfg.geojson)
    finally:
        slide.close()
    write_attention(out / ATTENTION_FILE, amap)
    return {k: str(v) for k, v in files.items()}


def analyse_slide(
    inp: SlideInput, ensemble: Ensemble, cfg: HeatmapConfig, render: bool
) -> tuple[dict[str, Any], AttentionMap | None]:
    """Ensemble probabilities and attention of one slide (+ its heatmap files when ``render``).

    Never raises for a bad slide: status is ok, failed (no prediction) or no_heatmap (a
    prediction, but the drawing failed), and reason says why.
    """
    row: dict[str, Any] = {
        "slide_id": inp.slide_id,
        "status": "failed",
        "n_tiles": 0,
        "reason": inp.reason,
    }
    if inp.features is None:
        return row, None
    try:
        amap, grid = _attention_map(inp, ensemble)
    except Exception as e:  # one bad slide (unreadable bag...) must not stop the rest
        row["reason"] = _failure(e)
        log.warning("%s: FAILED: %s", inp.slide_id, row["reason"])
        return row, None
    row.update(status="ok", reason="", n_tiles=len(grid.coords))
    if render:
        try:
            row.update(_render(inp, amap, grid, cfg))
        except Exception as e:  # corrupt or missing slide file: the prediction still stands
            row.update(status="no_heatmap", reason=_failure(e))
            log.warning("%s: no heatmap: %s", inp.slide_id, row["reason"])
    return row, amap


def probability_columns(amap: AttentionMap) -> dict[str, Any]:
    """prob (binary: positive = last class) / prob_<class>, pred, per-fold prob_<fold>[_<class>]."""
    return ensemble_columns(amap.probs, amap.fold_names, amap.classes)


def ensemble_columns(probs: np.ndarray, folds: list[str], classes: list[str]) -> dict[str, Any]:
    """The columns of :func:`probability_columns` from fold probabilities [F, C] of one bag."""
    mean = probs.mean(0)
    binary = len(classes) == 2
    cols: dict[str, Any] = {"prob": float(mean[1])} if binary else {}
    cols.update({f"prob_{c}": float(p) for c, p in zip(classes, mean, strict=True)})
    cols["pred"] = classes[int(mean.argmax())]
    for name, p in zip(folds, probs, strict=True):
        if binary:
            cols[f"prob_{name}"] = float(p[1])
        else:
            cols.update({f"prob_{name}_{c}": float(v) for c, v in zip(classes, p, strict=True)})
    return cols


def analyse_all(
    inputs: list[SlideInput], ensemble: Ensemble, cfg: HeatmapConfig, render: bool, desc: str
) -> pd.DataFrame:
    """analyse_slide over all inputs with a progress bar; one row per slide."""
    rows = []
    start, tiles = time.perf_counter(), 0
    with tqdm(total=len(inputs), desc=desc, unit="slide") as bar:
        for inp in inputs:
            row, amap = analyse_slide(inp, ensemble, cfg, render)
            if amap is not None:
                row.update(probability_columns(amap))
            rows.append(row)
            tiles += row["n_tiles"]
            bar.set_postfix(tiles_per_s=f"{tiles / (time.perf_counter() - start):.0f}")
            bar.update(1)
    return pd.DataFrame(rows)


def log_to_wandb(run: TrainedRun, table: pd.DataFrame, out: Path, job_type: str) -> None:
    """When the run logged to W&B, log heatmaps/montages and the table to one run of its group."""
    if run.config.logger != "wandb":
        return
    import wandb

    from melanoma_mil.tracking.loggers import DEFAULT_PROJECT, experiment_name, resolve_mode

    cfg, group = run.config, experiment_name(run.config, run.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    with wandb.init(
        project=cfg.wandb.project or DEFAULT_PROJECT,
        entity=cfg.wandb.entity,
        group=group,
        job_type=job_type,
        name=f"{group}/{job_type}",
        dir=str(out),
        tags=list(cfg.wandb.tags),
        mode=resolve_mode(cfg, out),
        settings=wandb.Settings(console="off", quiet=True),
    ) as wb:
        payload: dict[str, Any] = {f"{job_type}/slides": wandb.Table(dataframe=table.astype(str))}
        for r in table.itertuples():
            for kind in ("heatmap", "montage"):
                path = getattr(r, kind, None)
                if isinstance(path, str) and Path(path).is_file():
                    payload[f"{kind}/{r.slide_id}"] = wandb.Image(path)
        wb.log(payload)


def run_heatmap(cfg: HeatmapConfig) -> int:
    """Heatmaps for every slide; 0 if none failed, else 1 (after finishing the others)."""
    from melanoma_mil.features.run import resolve_device

    run = check_common(cfg)
    out = Path(cfg.output_dir)
    done = set() if cfg.overwrite else {p.parent.name for p in out.glob(f"*/{ATTENTION_FILE}")}
    inputs, skipped_ids = prepare_inputs(run, cfg, skip=done)
    skipped = pd.DataFrame(
        {
            "slide_id": skipped_ids,
            "status": "skipped",
            "reason": f"{ATTENTION_FILE} exists (overwrite=true redoes it)",
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
    log_to_wandb(run, table, out, "heatmap")
    counts = table["status"].value_counts().to_dict()
    print(
        f"heatmap: {counts} -> {out}/<slide_id>/ (heatmap.png, montage.png, {ATTENTION_FILE});"
        f" table {out / 'heatmaps.csv'}"
    )
    return 1 if table["status"].isin(FAILED).any() else 0
