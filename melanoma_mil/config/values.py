"""Values OmegaConf would take that a user cannot have meant, refused in each config layer (a
file, an override) before it is merged, naming the key and where it was given; and a value of
the wrong type, said with the type the key takes and a value it would take."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode, StringNode

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


def _field_meta(parent: DictConfig, name: str) -> Any:
    """The dataclass field's metadata (declared range) of ``name`` in a structured section."""
    schema = parent._metadata.object_type
    if not dataclasses.is_dataclass(schema):
        return {}
    return next((f.metadata for f in dataclasses.fields(schema) if f.name == name), {})


def _in_range(meta: Any, whole: bool) -> str:
    """A value inside a field's declared range, for an example where the key has no default."""
    low, high, open_low, _ = meta.get("range", (None, None, False, False))
    if low is not None and high is not None and not whole:
        return f"{(low + high) / 2:g}"
    if low is not None:
        return f"{low + 1 if open_low else low:g}"
    return "1"


def expected(base: DictConfig, key: str, given: Any) -> tuple[str, str] | None:
    """(what ``key`` takes, a value it would take) for a value of the wrong type, where
    OmegaConf's own message ("could not be converted to Integer") names neither; None where
    the key is no typed value (a section, a mapping)."""
    section, _, name = key.rpartition(".")
    parent = OmegaConf.select(base, section) if section else base
    if not isinstance(parent, DictConfig) or name not in parent:
        return None
    node = parent._get_node(name)
    current = None if node is None or node._is_none() else OmegaConf.to_container(parent)[name]
    meta = _field_meta(parent, name)
    null = " (or null)" if node is not None and node._is_optional() else ""
    if isinstance(node, BooleanNode):
        return f"true or false{null}", str(current is not False).lower()
    if isinstance(node, IntegerNode):
        return f"an integer{null}", str(current) if current is not None else _in_range(meta, True)
    if isinstance(node, FloatNode):
        example = f"{current:g}" if current is not None else _in_range(meta, False)
        return f"a number{null}", example
    if isinstance(node, StringNode):  # given a list or mapping: YAML read its brackets or colon
        return f"text{null}", json.dumps(given if isinstance(given, str) else str(given))
    if isinstance(node, ListConfig):
        if node._metadata.element_type is int:
            return "a list of integers", "[0,1]"
        return "a list", "[a,b]"
    return None


def type_error(
    base: DictConfig, layer: Any, key: str, source: str, fix: str, given: str | None
) -> UserError | None:
    """The key, the value given, the type it takes and a value it would take, in one line
    (``fix``: how to give it, a template of {example} and {pair}), or None for a key of no
    declared type; ``given``: the override's text (else the value read from ``layer``)."""
    field_key = re.sub(r"\[\d+\]$", "", key)
    if given is None:
        value = OmegaConf.to_container(layer)
        for part in field_key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        given = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    found = expected(base, field_key, given)
    if found is None:
        return None
    kind, example = found
    how = fix.format(example=example, pair=shlex.quote(f"{field_key}={example}"))
    where = f" in {source}" if source.startswith("config file") else ""
    return UserError(f"{field_key}={given}{where}: expected {kind}; {how}.")
