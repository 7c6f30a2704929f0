"""How configs are declared (fields with choices, ranges, patterns), loaded (defaults -> YAML
files -> dotlist overrides, unknown keys named with the closest valid one) and checked, before
any work. The schemas are this package's other modules; `config` re-exports these."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    InterpolationResolutionError,
    OmegaConfBaseException,
)

from melanoma_mil.config.files import yaml_file_problem, yaml_problem
from melanoma_mil.config.values import (
    layer_items,
    refuse_loose_bool,
    refuse_unset_text,
    type_error,
)
from melanoma_mil.errors import UserError

T = TypeVar("T")


def choice(default: str | None, *allowed: str | None) -> Any:
    """A field whose value must be one of ``allowed`` (checked at parse time, shown by --help);
    None among them lets an optional field stay unset (shown as null)."""
    return field(default=default, metadata={"choices": tuple(allowed)})


def _choices_text(choices: tuple[str | None, ...]) -> str:
    return "|".join("null" if c is None else c for c in choices)


def bounded(
    default: Any,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
    why: str | None = None,
) -> Any:
    """A numeric field in [low, high] (an end excluded with ``open_low`` / ``open_high``); None
    stays allowed for optional fields. ``why``: said when a value is out of range, where the
    bound alone would leave a user guessing."""
    meta: dict[str, Any] = {"range": (low, high, open_low, open_high)}
    return field(default=default, metadata={**meta, "why": why} if why else meta)


def positive(default: Any) -> Any:
    """A numeric field > 0."""
    return bounded(default, 0, open_low=True)


def pattern(default: str, regex: str, shown: str) -> Any:
    """A string field matching ``regex`` in full (checked at parse time); ``shown`` is the form
    --help and errors give, e.g. "predicted|median|quantiles:K"."""
    return field(default=default, metadata={"pattern": (regex, shown)})


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys: list[str] = []
    if isinstance(node, DictConfig):
        for k in node:
            full = f"{prefix}{k}"
            keys.append(full)
            child = node._get_node(k)
            if isinstance(child, DictConfig) and not child._is_none():
                keys.extend(_all_keys(child, f"{full}."))
    return keys


# keys of earlier versions -> what replaced them: users get the new key's name; the config.yaml
# of a run recorded by an earlier version still loads (the key only shaped its training)
RETIRED_KEYS = {
    "trainer.average_epochs": "trainer.average_fraction (the share of the final epochs whose "
    "weights are averaged, e.g. 0.5)",
}


def _unknown_key_error(schema: DictConfig, key: str, source: str) -> UserError:
    if key in RETIRED_KEYS:
        return UserError(f"'{key}' in {source} was replaced by {RETIRED_KEYS[key]}.")
    valid = _all_keys(schema)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else " Run with --help to list the keys."
    return UserError(f"unknown config key '{key}' in {source}.{hint}")


def _clash(base: Any, layer: Any, prefix: str = "") -> tuple[str, str, str] | None:
    """(key, given, wanted) of the first list given where the schema has a mapping, or the
    reverse: OmegaConf's merge fails on it with a bare TypeError naming no key."""
    for k, v in layer_items(layer):
        node = base._get_node(k) if k in base else None
        if isinstance(node, DictConfig) and isinstance(v, list):
            return f"{prefix}{k}", "a list", "a mapping ({key: value})"
        if isinstance(node, ListConfig) and isinstance(v, dict):
            return f"{prefix}{k}", "a mapping", "a list ([a, b])"
        found = _clash(node, v, f"{prefix}{k}.") if isinstance(node, DictConfig) else None
        if found:
            return found
    return None


def _merge(
    base: DictConfig,
    layer: DictConfig | Any,
    source: str,
    fix: str = "set it to e.g. {example}",
    given: str | None = None,
) -> DictConfig:
    """``layer`` merged onto ``base``; a value it cannot take is refused naming ``source``."""
    refuse_loose_bool(base, layer, source)
    try:
        return OmegaConf.merge(base, layer)  # type: ignore[return-value]
    except TypeError:
        found = _clash(base, layer)
        if found is None:
            raise
        key, given, wanted = found
        why = f"{given} where {wanted} is expected"
        raise UserError(f"bad value for '{key}' in {source}: {why}.") from None
    except (ConfigKeyError, ConfigAttributeError) as e:
        key = getattr(e, "full_key", None) or str(e)
        raise _unknown_key_error(base, str(key), source) from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        if msg.startswith("Key ") and "is incompatible with (str)" in msg:  # e.g. `yes: drop`
            msg += "; quote the key in the YAML ('yes': ...)"
        if not key and msg.startswith("Merge error:"):  # a whole section given one value
            name = next(
                (
                    str(k)
                    for k, v in layer_items(layer)
                    if k in base and OmegaConf.is_dict(base[k]) and not isinstance(v, dict)
                ),
                "a section",
            )
            raise UserError(
                f"{source}: '{name}' is a group of keys, not a value; set one of its keys "
                f"({name}.KEY=value, see --help)."
            ) from None
        typed = type_error(base, layer, str(key), source, fix, given) if key else None
        raise typed or UserError(f"bad value for '{key or '?'}' in {source}: {msg}") from None


def _text_keys(node: Any) -> Any:
    """Numeric YAML keys as text: ``1: immune_high`` in data.label_map means the label '1' (every
    mapping key in the schemas is a str); booleans stay, for OmegaConf to refuse."""
    if isinstance(node, dict):
        return {
            str(k) if isinstance(k, int | float) and not isinstance(k, bool) else k: _text_keys(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_text_keys(v) for v in node]
    return node


def load_config(
    schema: type[T],
    files: list[str] | None = None,
    dotlist: list[str] | None = None,
    recorded: bool = False,
) -> T:
    """Merge defaults, YAML files and ``key=value`` overrides into a typed ``schema`` instance.

    ``recorded``: the files were written by `fit` (a run's config.yaml), maybe by an earlier
    version: RETIRED_KEYS in them are dropped instead of refused."""
    cfg: DictConfig = OmegaConf.structured(schema)
    sources: dict[str, str] = {}  # key -> the file or override that set it last, for errors
    for file in files or []:
        layer = _file_layer(file, recorded)
        if not recorded:  # a run's config.yaml is read as it was written
            refuse_unset_text(cfg, layer, f"config file '{file}'")
        cfg = _merge(cfg, layer, f"config file '{file}'")
        sources.update(dict.fromkeys(_all_keys(layer), f"config file '{file}'"))
    cfg = merge_overrides(cfg, dotlist or [], sources)
    typed: T = to_checked(cfg, sources)
    return typed


def _file_layer(file: str, recorded: bool) -> DictConfig:
    """One YAML config file as a layer; what is not a mapping of keys is refused, naming it."""
    path = Path(file)
    if problem := yaml_file_problem(file, "config file", "--config "):
        raise UserError(problem)
    try:
        layer = OmegaConf.load(path)
    except OSError as e:
        raise UserError(f"config file '{file}' cannot be read ({e.strerror}).") from None
    except Exception as e:  # yaml errors come in many types
        raise UserError(f"config file '{file}' is not valid YAML: {yaml_problem(e)}.") from None
    if not isinstance(layer, DictConfig):
        raise UserError(
            f"config file '{file}' holds a list, not a mapping of keys: write one "
            "`key: value` per line (e.g. `seed: 1`, sections nested by indentation)."
        )
    layer = OmegaConf.create(_text_keys(OmegaConf.to_container(layer)))
    if recorded:
        for key in RETIRED_KEYS:
            section, _, name = key.rpartition(".")
            node = OmegaConf.select(layer, section)
            if isinstance(node, DictConfig) and name in node:
                node.pop(name)
    return layer


def _optional(cfg: DictConfig, key: str) -> bool:
    section, _, name = key.rpartition(".")
    parent = OmegaConf.select(cfg, section) if section else cfg
    if not isinstance(parent, DictConfig) or name not in parent:
        return False
    node = parent._get_node(name)
    return node is not None and bool(node._is_optional())


def merge_overrides(
    cfg: DictConfig,
    dotlist: list[str],
    sources: dict[str, str] | None = None,
    what: str = "override",
) -> DictConfig:
    """``key=value`` items merged onto ``cfg`` in order. A value of exactly None (what `wandb
    agent` passes for a null sweep value, as str(None)) unsets an optional key like null does;
    a key that cannot be None keeps refusing it."""
    for item in dotlist:
        if "=" not in item:
            raise UserError(f"{what} '{item}' is not key=value (e.g. trainer.max_epochs=20).")
        key, _, value = item.lstrip("+").partition("=")
        if value == "None" and _optional(cfg, key):
            value = "null"
        try:
            layer = OmegaConf.from_dotlist([f"{key}={value}"])
            layer = OmegaConf.create(_text_keys(OmegaConf.to_container(layer)))  # as in YAML
        except OmegaConfBaseException as e:
            raise UserError(f"cannot parse {what} '{item}': {e}") from None
        except yaml.YAMLError as e:  # a value YAML reads as syntax: @x, `x, [x, {a:[1]}
            quoted = json.dumps(value)
            fix = f"pass {shlex.quote(f'{key}={quoted}')}"
            if what != "override":  # a sweep file's value, passed on by the agent as key=value
                fix = f"quote it inside the value: {quoted!r}"
            raise UserError(
                f"cannot parse {what} '{item}': {yaml_problem(e)}; to give it as text, {fix}."
            ) from None
        refuse_unset_text(cfg, layer, f"{what} '{key}'")
        fix = "pass e.g. {pair}" if what == "override" else "use e.g. {example} instead"
        cfg = _merge(cfg, layer, f"{what} '{key}'", fix, value)
        if sources is not None:  # a section's keys too (``cv={seed: 1}``), as files' are
            sources.update(dict.fromkeys(_all_keys(layer), f"{what} '{item}'"))
    return cfg


def to_checked(cfg: DictConfig, sources: dict[str, str] | None = None) -> Any:
    """The typed object, every declared choice and range checked. A ${...} that cannot be
    resolved (unset environment variable, unknown key) is named with what wrote it."""
    try:
        typed = OmegaConf.to_object(cfg)
    except InterpolationResolutionError as e:
        key = str(getattr(e, "full_key", "") or "?")
        msg = str(e).splitlines()[0]
        where = (sources or {}).get(key, "the config")
        raise UserError(
            f"cannot resolve '{key}' in {where}: {msg}; set what it reads or replace the "
            "${...} with a value."
        ) from None
    expand_home(typed)
    check(typed, sources=sources)
    return typed


def expand_home(node: Any) -> None:
    """'~/...' in a text setting (a path, in practice: no name or label starts so) is the home
    folder, as a shell makes it: YAML files and dotted keys (data.features_dir=~/x) are not
    expanded by the shell."""
    if not dataclasses.is_dataclass(node):
        return
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if isinstance(value, str) and (value == "~" or value.startswith("~/")):
            setattr(node, f.name, os.path.expanduser(value))
        elif isinstance(value, list) and any(isinstance(v, str) for v in value):
            home = [os.path.expanduser(v) if isinstance(v, str) and v.startswith("~/") else v
                    for v in value]  # fmt: skip
            setattr(node, f.name, home)
        else:
            expand_home(value)


def _bounds_text(spec: tuple[float | None, float | None, bool, bool]) -> str:
    low, high, open_low, open_high = spec
    if high is None:
        return f"{'>' if open_low else '>='} {_number(low)}"
    ends = f"{_number(low)}, {_number(high)}"
    return f"in {'(' if open_low else '['}{ends}{')' if open_high else ']'}"


def _number(value: float | None) -> str:
    """An integer bound in full (4000000000, not 4e+09), others short."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def _problem(value: Any, meta: Any) -> str | None:
    """Why ``value`` breaks a field's declared choices or range, or None."""
    if "choices" in meta and value not in meta["choices"]:
        named = {c.lower(): c for c in meta["choices"] if c is not None}
        close = difflib.get_close_matches(str(value).lower(), named, n=1, cutoff=0.6)
        hint = f" (did you mean '{named[close[0]]}'?)" if close else ""
        return f"is not one of {_choices_text(meta['choices'])}{hint}"
    if "pattern" in meta and value is not None and not re.fullmatch(meta["pattern"][0], value):
        return f"is not of the form {meta['pattern'][1]}"
    if "range" in meta and value is not None:
        low, high, open_low, open_high = meta["range"]
        if not math.isfinite(value):  # inf passed a range open at the top, yet no key means it
            return f"must be a finite number {_bounds_text(meta['range'])}"
        below = low is not None and (value <= low if open_low else value < low)
        above = high is not None and (value >= high if open_high else value > high)
        if below or above:
            why = f" ({meta['why']})" if "why" in meta else ""
            return f"must be {_bounds_text(meta['range'])}{why}"
    return None


def _fix(key: str, sources: Mapping[str, str]) -> str:
    """Where to fix ``key``: the override or config file that set it last, if known."""
    where = sources.get(key)
    if where is None:
        return "fix the override or config file"
    return f"fix the {where}" if where.startswith("override") else f"fix it in {where}"


def check(cfg: Any, prefix: str = "", sources: Mapping[str, str] | None = None) -> None:
    """Every declared choice and range of ``cfg``'s fields, recursively: one error, before work.
    ``sources``: key -> the override or config file that set it (`load_config`), to name.

    Called by `load_config`, and by code that builds configs itself (sweep runs)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check(value, f"{prefix}{f.name}.", sources)
            continue
        why = _problem(value, f.metadata)
        if why:
            fix = _fix(f"{prefix}{f.name}", sources or {})
            raise UserError(f"{prefix}{f.name}={value!r} {why}; {fix}.")
        items = value.items() if isinstance(value, dict) else ()
        # OmegaConf lets a list or mapping into a dict[str, str] (data.label_map)
        nested = [k for k, v in items if isinstance(v, list | dict)]
        if nested:
            key = f"{prefix}{f.name}.{nested[0]}"
            given = json.dumps(value[nested[0]], separators=(",", ":"))
            raise UserError(
                f"{key}={given}: expected text, one value per key; give e.g. {key}={nested[0]}."
            )


def to_yaml(cfg: Any) -> str:
    """Resolved config as YAML (what `--print-config` shows and runs save as config.yaml)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def describe(schema: type | Any, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, type, default) rows for `--help`, walking nested sections' actual defaults."""
    defaults = schema() if isinstance(schema, type) else schema
    rows: list[tuple[str, str, str]] = []
    for f in dataclasses.fields(defaults):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe(value, f"{prefix}{f.name}."))
        else:
            kind = str(f.type)
            if "choices" in f.metadata:
                kind = _choices_text(f.metadata["choices"])
            elif "pattern" in f.metadata:
                kind = f.metadata["pattern"][1]
            elif "range" in f.metadata:
                kind = f"{kind}, {_bounds_text(f.metadata['range'])}"
            rows.append((f"{prefix}{f.name}", kind, repr(value)))
    return rows
