"""The one table of MIL models: `model.name` -> builder. `config.MODEL_NAMES` lists the same
names (so `--help` and config errors answer without importing torch); a test keeps them equal."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from melanoma_mil.config import MODEL_NAMES, ModelConfig
from melanoma_mil.errors import UserError
from melanoma_mil.models.attention import AttentionMIL
from melanoma_mil.models.clam import ClamMB, ClamSB
from melanoma_mil.models.common import FeatureNorm, head_dims
from melanoma_mil.models.dsmil import DSMIL
from melanoma_mil.models.ensemble import Ensemble
from melanoma_mil.models.instance import MaxMIL, MeanMIL, TopKMIL
from melanoma_mil.models.transmil import TransMIL

Builder = Callable[[int, int, ModelConfig], nn.Module]  # (in_dim, n_classes, cfg) -> model

MODELS: dict[str, Builder] = {
    "gated_attention": partial(AttentionMIL, gated=True),
    "abmil": partial(AttentionMIL, gated=False),
    "clam_sb": ClamSB,
    "clam_mb": ClamMB,
    "transmil": TransMIL,
    "dsmil": DSMIL,
    "topk": TopKMIL,
    "mean": MeanMIL,
    "max": MaxMIL,
}


def build_model(cfg: ModelConfig, in_dim: int, n_classes: int) -> nn.Module:
    """The model named by ``cfg.name``, its head sized for ``in_dim`` where cfg leaves it open;
    an `Ensemble` of ``cfg.members`` of them when that is over 1 (None counts as 1 here: `fit`
    resolves it per fold before building)."""
    builder = MODELS.get(cfg.name)
    if builder is None:
        raise UserError(f"model.name={cfg.name!r} is not one of {'|'.join(MODEL_NAMES)}.")
    sized = head_dims(cfg, in_dim)
    members = cfg.members or 1
    if members == 1:
        return builder(in_dim, n_classes, sized)
    return Ensemble([builder(in_dim, n_classes, sized) for _ in range(members)])


def warmup_epochs(cfg: ModelConfig, epochs: int) -> int:
    """How many first epochs of a run of ``epochs`` train differently from the rest (topk's
    warm-up; 0 for the other models): `fit` averages no weights of theirs, and early stopping
    waits `trainer.patience` epochs past them (a warm-up epoch may still be the one selected:
    validation scores it with the pooling that is tested)."""
    builder = MODELS.get(cfg.name)
    counter = getattr(getattr(builder, "func", builder), "warmup_epochs", None)  # or a partial's
    return counter(cfg, epochs) if counter is not None else 0


def feature_norm(model: nn.Module) -> FeatureNorm:
    """The input standardisation layer of any model built here (an ensemble's first member's)."""
    return next(m for m in model.modules() if isinstance(m, FeatureNorm))


def fit_feature_stats(model: nn.Module, bags: list[torch.Tensor]) -> None:
    """Standardise ``model``'s input (every member's) with statistics of ``bags``, computed once."""
    first = feature_norm(model)
    first.fit_stats(bags)
    for norm in model.modules():
        if isinstance(norm, FeatureNorm) and norm is not first:
            norm.load_state_dict(first.state_dict())
