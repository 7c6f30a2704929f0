"""The one table of MIL models: `model.name` -> builder. `config.MODEL_NAMES` lists the same
names (so `--help` and config errors answer without importing torch); a test keeps them equal."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from melanoma_mil.config import MODEL_NAMES, ModelConfig
from melanoma_mil.errors import UserError
from melanoma_mil.models.attention import AttentionMIL
from melanoma_mil.models.clam import ClamMB, ClamSB
from melanoma_mil.models.common import FeatureNorm, head_dims
from melanoma_mil.models.dsmil import DSMIL
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
    """The model named by ``cfg.name``, its head sized for ``in_dim`` where cfg leaves it open."""
    builder = MODELS.get(cfg.name)
    if builder is None:
        raise UserError(f"model.name={cfg.name!r} is not one of {'|'.join(MODEL_NAMES)}.")
    return builder(in_dim, n_classes, head_dims(cfg, in_dim))


def feature_norm(model: nn.Module) -> FeatureNorm:
    """The input standardisation layer of any model built here (the first layer of its embed)."""
    norm = model.embed[0]
    assert isinstance(norm, FeatureNorm)
    return norm
