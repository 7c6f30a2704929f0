"""MIL heads in plain torch (no Lightning), reusable outside the framework."""

from melanoma_mil.models.mil import MILOutput, build_model

__all__ = ["MILOutput", "build_model"]
