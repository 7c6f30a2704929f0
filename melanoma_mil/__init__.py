"""melanoma-mil: weakly supervised WSI classification with gated-attention MIL."""

__version__ = "0.1.0"
