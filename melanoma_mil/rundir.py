"""A finished `fit` run as objects: config, classes, provenance, fold models, predictions."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from melanoma_mil.config import FitConfig, ModelConfig, load_config
from melanoma_mil.errors import UserError
from melanoma_mil.models import build_model


def save_fold_model(
    path: Path, model: nn.Module, cfg: ModelConfig, in_dim: int, classes: list[str]
) -> None:
    """Plain-torch export of a fold's best model (loads without Lightning, weights_only)."""
    torch.save(
        {
            "state_dict": model.state_dict(),
            "model": asdict(cfg),
            "in_dim": in_dim,
            "classes": classes,
        },
        path,
    )


def load_fold_model(path: Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a fold model saved by `save_fold_model`, in eval mode."""
    blob = torch.load(path, map_location=device, weights_only=True)
    model = build_model(ModelConfig(**blob["model"]), blob["in_dim"], len(blob["classes"]))
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise UserError(
            f"{path}: fold model does not match this version of melanoma-mil "
            f"({first}); re-run `fit` to retrain it."
        ) from None
    return model.to(device).eval()


@dataclass
class TrainedRun:
    run_dir: Path
    config: FitConfig
    classes: list[str]
    provenance: dict[str, Any]

    @property
    def model_paths(self) -> list[Path]:
        """One model per (repeat, fold), in order."""
        return sorted((self.run_dir / "folds").glob("*/model.pt"))

    def fold_names(self) -> list[str]:
        return [p.parent.name for p in self.model_paths]

    def fold_models(self, device: str | torch.device = "cpu") -> list[nn.Module]:
        return [load_fold_model(p, device) for p in self.model_paths]

    @cached_property
    def cv_summary(self) -> dict[str, Any]:
        """cv_summary.json: per-fold metrics, pooled out-of-fold AUC with its CI."""
        return json.loads((self.run_dir / "cv_summary.json").read_text())

    @property
    def roc_path(self) -> Path:
        """The run's ROC figure (each test fold and the pooled curve)."""
        return self.run_dir / "roc.png"

    @cached_property
    def predictions(self) -> pd.DataFrame:
        return pd.read_csv(
            self.run_dir / "predictions.csv", dtype={"slide_id": str, "patient_id": str}
        )


def load_run(run_dir: str | Path) -> TrainedRun:
    """Open a `fit` output folder; a clear error when it is not a finished run."""
    root = Path(run_dir)
    needed = ["config.yaml", "cv_summary.json", "provenance.json"]
    missing = [n for n in needed if not (root / n).is_file()]
    if missing:
        raise UserError(f"run_dir '{root}' is not a finished `fit` run (missing {missing}).")
    provenance = json.loads((root / "provenance.json").read_text())
    run = TrainedRun(
        root,
        load_config(FitConfig, [str(root / "config.yaml")]),
        list(provenance["classes"]),
        provenance,
    )
    if not run.model_paths:
        raise UserError(f"run_dir '{root}' has no fold models (folds/*/model.pt).")
    return run
