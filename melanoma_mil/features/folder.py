"""What a cache folder records for all its bags, so that every `extract` process on it agrees.

Precision (``<cache>/.precision.json``) is not in the cache key (existing caches keep their
folders), and precision=auto resolves per machine (bf16 on a GPU or an AMX CPU, fp32 elsewhere),
so processes sharing a folder from mixed hardware would silently mix bf16 and fp32 bags, and an
encoder comparison would compare precisions too. So a folder's bags share one precision: the
first process to write into the folder records the one it uses (a folder made before the record
existed: that of a bag already in it); a later precision=auto process adopts it whatever its own
hardware prefers, and an explicitly asked other precision is refused before any work
(overwrite=true with an explicit precision records that one instead: it rebuilds every bag).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py
import torch

from melanoma_mil.encoders.build import cpu_has_bf16
from melanoma_mil.errors import UserError
from melanoma_mil.features.identity import plain
from melanoma_mil.io import write_json
from melanoma_mil.workshare import create_new, describe, me

log = logging.getLogger(__name__)

PRECISION_FILE = ".precision.json"


def read_json(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _bag_precision(folder: Path) -> str | None:
    """The precision a bag already in ``folder`` was made at (None: no readable bag)."""
    for bag in sorted(folder.glob("[!.]*.h5")):
        try:
            with h5py.File(bag, "r") as f:
                had = plain(f.attrs.get("precision"))
        except OSError:
            continue
        if isinstance(had, str):
            return had
    return None


def _record(folder: Path, precision: str, replace: bool) -> dict[str, Any]:
    """The folder's recorded precision, recording ``precision`` if none is (the first process
    wins), or in its place (``replace``: overwrite=true with an explicit precision)."""
    path = folder / PRECISION_FILE
    folder.mkdir(parents=True, exist_ok=True)
    record = {"precision": precision, "by": describe(me())}
    if replace:
        write_json(path, record)
        return record
    if not path.exists():  # the first process, or a folder made before the record existed
        record["precision"] = _bag_precision(folder) or precision
    if path.exists() or not create_new(path, json.dumps(record)):  # a peer's record wins
        record = read_json(path)
    if not isinstance(record.get("precision"), str):
        raise UserError(f"'{path}' is unreadable; delete it (it is recorded again from the bags).")
    return record


def folder_precision(
    folders: Iterable[Path], asked: str, resolved: str, overwrite: bool, device: torch.device
) -> str:
    """The precision this process extracts at: its folders' (``asked``: the config's, auto or
    explicit; ``resolved``: what auto gives on this machine). An explicit precision other than a
    folder's, folders that disagree, or a GPU that cannot run the folder's are refused."""
    wanted = resolved if asked == "auto" else asked
    replace = overwrite and asked != "auto"
    records = {folder: _record(folder, wanted, replace) for folder in folders}
    had = {str(r["precision"]) for r in records.values()}
    if len(had) > 1:
        raise UserError(
            f"the cache folders of this run hold features at different precisions ({had}): "
            f"{', '.join(map(str, records))}; extract them with separate output_dirs."
        )
    if not had:
        return wanted
    (precision,) = had
    folder, record = next(iter(records.items()))
    where = f"'{folder}' holds features extracted at precision={precision} ({record.get('by')})"
    if asked not in ("auto", precision):
        raise UserError(
            f"{where}, not the precision={asked} asked; use precision=auto, another output_dir, "
            f"or overwrite=true to rebuild every bag at precision={asked}."
        )
    if precision != resolved:
        _check_runs(precision, device, where)
        log.info("extract: %s; extracting at it (auto here would be %s)", where, resolved)
    return precision


def _check_runs(precision: str, device: torch.device, where: str) -> None:
    """Refuse a precision this device cannot run; warn where it runs slowly (bf16 on a CPU
    without AMX: still the same features, which is what the folder needs)."""
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"{where}, which this GPU ({torch.cuda.get_device_name(device)}) cannot run; run this "
            "process on a GPU with bf16 (or on the CPU), or give it another output_dir."
        )
    if device.type == "cpu" and precision != "fp32" and not cpu_has_bf16():
        log.warning("extract: %s; this CPU runs it slowly (no native bf16)", where)
