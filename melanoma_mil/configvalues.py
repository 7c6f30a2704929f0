"""Values OmegaConf would take that a user cannot have meant, refused in each config layer (a
file, an override) before it is merged, naming the key and where it was given."""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.nodes import BooleanNode, StringNode

from melanoma_mil.errors import UserError


def layer_items(layer: DictConfig | Any) -> list[tuple[Any, Any]]:
    """The top-level entries of a config layer, as plain values."""
    plain = OmegaConf.to_container(layer) if OmegaConf.is_config(layer) else layer
    return list(plain.items()) if isinstance(plain, dict) else []


def _loose_bool(base: Any, layer: Any, prefix: str = "") -> tuple[str, Any] | None:
    """(key, value) of the first boolean key given a number other than 0 or 1 (as a number or
    text): OmegaConf takes any non-zero integer as true, and overwrite=2 is more likely a slip."""
    for k, v in layer_items(layer):
        node = base._get_node(k) if isinstance(base, DictConfig) and k in base else None
        if isinstance(node, BooleanNode) and not isinstance(v, bool):
            text = str(v).strip()
            if re.fullmatch(r"[+-]?\d+", text) and text not in ("0", "1"):
                return f"{prefix}{k}", v
        found = _loose_bool(node, v, f"{prefix}{k}.") if isinstance(node, DictConfig) else None
        if found:
            return found
    return None


def refuse_loose_bool(base: DictConfig, layer: Any, source: str) -> None:
    loose = _loose_bool(base, layer)
    if loose:
        raise UserError(
            f"bad value for '{loose[0]}' in {source}: {loose[1]!r} is not a boolean; give true or "
            "false (or 1 / 0)."
        )


def _unset_text(base: Any, layer: Any, prefix: str = "") -> str | None:
    """The first text key that cannot be None given null or the text None / null: taken as
    text, output_dir=None would write into ./None. (`merge_overrides` has made None null for
    the keys that may be None.)"""
    for k, v in layer_items(layer):
        node = base._get_node(k) if isinstance(base, DictConfig) and k in base else None
        if isinstance(node, StringNode) and not node._is_optional() and v in (None, "None", "null"):
            return f"{prefix}{k}"
        found = _unset_text(node, v, f"{prefix}{k}.") if isinstance(node, DictConfig) else None
        if found:
            return found
    return None


def refuse_unset_text(base: DictConfig, layer: Any, source: str) -> None:
    key = _unset_text(base, layer)
    if key:
        raise UserError(
            f"bad value for '{key}' in {source}: this key cannot be unset (null / None); give it "
            "a value (see --help)."
        )
