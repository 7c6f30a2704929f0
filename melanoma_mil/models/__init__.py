"""MIL heads in plain torch (no Lightning), reusable outside the framework."""

from melanoma_mil.models.mil import MILOutput, build_model, feature_norm

__all__ = ["MILOutput", "build_model", "feature_norm"]
