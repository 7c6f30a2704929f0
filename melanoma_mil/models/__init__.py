"""MIL heads in plain torch (no Lightning), reusable outside the framework."""

from melanoma_mil.models.common import MILOutput, class_scores, set_progress
from melanoma_mil.models.registry import (
    MODELS,
    build_model,
    feature_norm,
    fit_feature_stats,
    warmup_epochs,
)

__all__ = [
    "MILOutput",
    "MODELS",
    "build_model",
    "class_scores",
    "feature_norm",
    "fit_feature_stats",
    "set_progress",
    "warmup_epochs",
]
