"""Tile encoders by name: ImageNet CNN/ViT baselines and pathology foundation models."""

from melanoma_mil.encoders.build import (
    RANDOM,
    Encoder,
    RandomEncoderWarning,
    TileTransform,
    build_encoder,
    encoder_identity,
    resolve_precision,
    warn_if_random,
)
from melanoma_mil.encoders.registry import REGISTRY, EncoderSpec, get_spec

__all__ = [
    "RANDOM",
    "REGISTRY",
    "Encoder",
    "EncoderSpec",
    "RandomEncoderWarning",
    "TileTransform",
    "build_encoder",
    "encoder_identity",
    "get_spec",
    "resolve_precision",
    "warn_if_random",
]
