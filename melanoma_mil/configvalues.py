"""Values OmegaConf would take that a user cannot have meant, refused in each config layer (a
file, an override) before it is merged, naming the key and where it was given."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.nodes import BooleanNode, StringNode

from melanoma_mil.errors import UserError


def layer_items(layer: DictConfig | Any) -> list[tuple[Any, Any]]:
    """The top-level entries of a config layer, as plain values."""
    plain = OmegaConf.to_container(layer) if OmegaConf.is_config(layer) else layer
    return list(plain.items()) if isinstance(plain, dict) else []


def _first(
    base: Any, layer: Any, bad: Callable[[Any, Any], bool], prefix: str = ""
) -> tuple[str, Any] | None:
    """(dotted key, value) of the first entry of ``layer`` whose node in ``base`` and value
    ``bad`` flags, nested sections included."""
    for k, v in layer_items(layer):
        node = base._get_node(k) if isinstance(base, DictConfig) and k in base else None
        if bad(node, v):
            return f"{prefix}{k}", v
        found = _first(node, v, bad, f"{prefix}{k}.") if isinstance(node, DictConfig) else None
        if found:
            return found
    return None


def _loose_bool(node: Any, value: Any) -> bool:
    """A boolean key given a number other than 0 or 1 (as a number or text): OmegaConf takes
    any non-zero integer as true, and overwrite=2 is more likely a slip."""
    if not isinstance(node, BooleanNode) or isinstance(value, bool):
        return False
    text = str(value).strip()
    return re.fullmatch(r"[+-]?\d+", text) is not None and text not in ("0", "1")


def _unset_text(node: Any, value: Any) -> bool:
    """A text key that cannot be None given null or the text None / null: taken as text,
    output_dir=None would write into ./None. (`merge_overrides` has made None null for the
    keys that may be None.)"""
    optional = isinstance(node, StringNode) and node._is_optional()
    return isinstance(node, StringNode) and not optional and value in (None, "None", "null")


def refuse_loose_bool(base: DictConfig, layer: Any, source: str) -> None:
    loose = _first(base, layer, _loose_bool)
    if loose:
        raise UserError(
            f"bad value for '{loose[0]}' in {source}: {loose[1]!r} is not a boolean; give true or "
            "false (or 1 / 0)."
        )


def refuse_unset_text(base: DictConfig, layer: Any, source: str) -> None:
    unset = _first(base, layer, _unset_text)
    if unset:
        raise UserError(
            f"bad value for '{unset[0]}' in {source}: this key cannot be unset (null / None); give "
            "it a value (see --help)."
        )
