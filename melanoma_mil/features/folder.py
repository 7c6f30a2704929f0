"""What a cache folder records for all its bags, so that every `extract` process on it agrees.

Precision (``<cache>/.precision.json``) is not in the cache key (existing caches keep their
folders), and precision=auto resolves per machine (bf16 on a GPU or an AMX CPU, fp32 elsewhere),
so processes sharing a folder from mixed hardware would silently mix bf16 and fp32 bags, and an
encoder comparison would compare precisions too. So a folder's bags share one precision: the
first process to write into the folder records the one it uses (a folder made before the record
existed: that of a bag already in it); a later precision=auto process adopts it whatever its own
hardware prefers, and an explicitly asked other precision is refused before any work
(overwrite=true records its own instead: it rebuilds every bag).

Overwrite (``<cache>/.overwrite.json``): overwrite=true rebuilds every bag once, however many
processes share it and whenever each starts. The first overwrite process records a rebuild (id,
start time, precision); one started with overwrite=true while that rebuild is unfinished joins
it, keeping the bags written since it began and taking its precision. The rebuild ends when a
process finishes with every slide of its cohort done (exit 0); the next overwrite=true starts a
new one. Deleting the file starts a new one at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from melanoma_mil.encoders.build import cpu_has_bf16
from melanoma_mil.errors import UserError
from melanoma_mil.features.identity import plain
from melanoma_mil.fsutil import create_once
from melanoma_mil.io import json_text, read_h5, write_json
from melanoma_mil.workshare import describe, me

log = logging.getLogger(__name__)

PRECISION_FILE = ".precision.json"
OVERWRITE_FILE = ".overwrite.json"


def read_json(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def made_at(bag: Path) -> str | None:
    """The precision the bag ``bag`` was extracted at (None: unreadable, or not recorded)."""
    try:
        with read_h5(bag) as f:
            had = plain(f.attrs.get("precision"))
    except OSError:
        return None
    return had if isinstance(had, str) else None


def _bags(folder: Path) -> list[Path]:
    return sorted(folder.glob("[!.]*.h5"))


def _bag_precision(folder: Path) -> str | None:
    """The precision a bag already in ``folder`` was made at (None: no readable bag)."""
    return next((had for bag in _bags(folder) if (had := made_at(bag))), None)


def _first_record(folder: Path) -> str | None:
    """`_bag_precision` for the record of a folder made before records existed, whose bags may
    already disagree (made on mixed hardware): then say so, as nothing else would."""
    each = [had for bag in _bags(folder) if (had := made_at(bag))]
    made, first = Counter(each), next(iter(each), None)
    if len(made) > 1:
        log.warning("extract: '%s' holds bags made at several precisions (%s), before folders "
                    "recorded one; recording %s for the bags made from now on; overwrite=true "
                    "rebuilds every bag at one", folder, dict(made), first)  # fmt: skip
    return first


def folder_precision_of(folder: Path) -> str | None:
    """The precision ``folder``'s bags are made at: its record's, else its first bag's."""
    had = read_json(folder / PRECISION_FILE).get("precision")
    return had if isinstance(had, str) else _bag_precision(folder)


def _record(folder: Path, precision: str, overwrite: bool) -> dict[str, Any]:
    """The folder's recorded precision, recording ``precision`` if none is (the first process
    wins); with ``overwrite``, the unfinished rebuild's, or a new rebuild's at ``precision``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (OVERWRITE_FILE if overwrite else PRECISION_FILE)
    record = {"precision": precision, "by": describe(me()), "started": time.time()}
    if overwrite:
        record["id"] = secrets.token_hex(4)
    elif not path.exists():  # the first process, or a folder made before the record existed
        record["precision"] = _first_record(folder) or precision
    if path.exists() or not create_once(path, json_text(record).encode()):  # a peer's record wins
        record = _readable(path)
    elif overwrite:
        write_json(folder / PRECISION_FILE, record)  # what the bags will all be made at
        log.info("extract: overwrite %s of '%s' started: processes started with "
                 "overwrite=true before it ends join it", record["id"], folder)  # fmt: skip
    if overwrite and record.get("by") != describe(me()):
        hours = (time.time() - float(record.get("started", time.time()))) / 3600
        log.warning("extract: joining overwrite %s of '%s' (%s, %.1f h ago, not yet ended: a slide "
                 "is left to rebuild): the bags it rebuilt are kept; delete %s to rebuild them "
                 "all again", record.get("id"), folder, record["by"], hours, path)  # fmt: skip
    return record


def _readable(path: Path) -> dict[str, Any]:
    """The record at ``path``, refused if it names no precision (corrupt, or cut short)."""
    record = read_json(path)
    if isinstance(record.get("precision"), str):
        return record
    after = (
        "overwrite=true then starts a new rebuild of every bag"
        if path.name == OVERWRITE_FILE
        else "it is recorded again from the bags"
    )
    raise UserError(f"'{path}' is unreadable or names no precision; delete it ({after}).")


def _peek(folder: Path, overwrite: bool) -> dict[str, Any]:
    """The record `_record` would take for ``folder`` ({}: it would make one), written nowhere;
    an unreadable one refused, as `_record` would refuse it (after the encoder is built)."""
    path = folder / (OVERWRITE_FILE if overwrite else PRECISION_FILE)
    if path.exists():
        return _readable(path)
    return {} if overwrite else _read_record(folder)  # a folder made before records: its bags'


def _read_record(folder: Path) -> dict[str, Any]:
    """`_record` of a folder that cannot be written, written nowhere: its record, else that of
    a folder made before records existed (its first bag's precision); {} if it has neither."""
    record = read_json(folder / PRECISION_FILE)
    if isinstance(record.get("precision"), str):
        return record
    made = _bag_precision(folder)
    return {"precision": made, "by": "as its bags record"} if made else {}


def end_rebuild(folder: Path, started: float) -> None:
    """End the folder's rebuild (this process's cohort is all done): the next overwrite=true
    starts afresh. A rebuild started by another since is put back."""
    path = folder / OVERWRITE_FILE
    aside = folder / f".overwrite-ended-{secrets.token_hex(4)}.json"
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    if read_json(aside).get("started") != started:
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    aside.unlink(missing_ok=True)


def folder_precision(
    folders: list[Path],
    asked: str,
    resolved: str,
    overwrite: bool,
    device: torch.device,
    read_only: Collection[Path],
) -> tuple[str, dict[str, float]]:
    """The precision this process extracts at: its folders' (``asked``: the config's, auto or
    explicit; ``resolved``: what auto gives on this machine), and with ``overwrite`` when each
    folder's rebuild started (by folder name). An explicit precision other than a folder's,
    folders that disagree, or a GPU that cannot run the folder's are refused. ``read_only``:
    folders whose precision is read, never recorded: those only read (nothing to encode there,
    cannot be written). `check_precision` makes these refusals first, before any work."""
    wanted = resolved if asked == "auto" else asked
    # folders with a precision already first: a new one (another tile size) takes theirs, and
    # is recorded only once this process is known to extract at it
    records = {f: r for f in folders if f in read_only and (r := _read_record(f))}
    held = [f for f in folders if f not in read_only and _has_precision(f, overwrite)]
    records |= {folder: _record(folder, wanted, overwrite) for folder in held}
    precision = _one_precision(records) or wanted
    if records:
        first = next(iter(records.items()))
        _check_asked(*first, asked, precision, resolved, overwrite, device, say=True)
    new = [f for f in folders if f not in records and f not in read_only]
    records |= {f: _record(f, precision, overwrite) for f in new}
    _one_precision(records)  # a peer may have recorded another in a new folder meanwhile
    return precision, {f.name: float(r["started"]) for f, r in records.items() if overwrite}


def check_precision(
    folders: list[Path],
    asked: str,
    resolved: str,
    overwrite: bool,
    device: torch.device,
    read_only: Collection[Path],
) -> None:
    """`folder_precision`'s refusals for the records the folders hold now, recording nothing:
    made before the encoder is built (loading a foundation model takes minutes), so a
    precision the folders, or an unfinished rebuild of them, do not hold is refused at once.
    Silent: what it would log, the real call logs."""
    peek = {f: _read_record(f) if f in read_only else _peek(f, overwrite) for f in folders}
    records = {f: r for f, r in peek.items() if r}
    precision = _one_precision(records)
    if precision is not None:
        first = next(iter(records.items()))
        _check_asked(*first, asked, precision, resolved, overwrite, device, say=False)


def _one_precision(records: dict[Path, dict[str, Any]]) -> str | None:
    """The one precision the folders' records hold (None: no record); refused if several."""
    had = {str(r["precision"]) for r in records.values()}
    if len(had) > 1:
        raise UserError(
            f"the cache folders of this run hold features at different precisions ({had}): "
            f"{', '.join(map(str, records))}; extract them with separate output_dirs."
        )
    return next(iter(had), None)


def _has_precision(folder: Path, overwrite: bool) -> bool:
    """Whether ``folder`` already has a precision for this process: a record, or (without
    ``overwrite``, which rebuilds every bag) a bag."""
    if (folder / (OVERWRITE_FILE if overwrite else PRECISION_FILE)).exists():
        return True
    return not overwrite and _bag_precision(folder) is not None


def _check_asked(
    folder: Path,
    record: dict[str, Any],
    asked: str,
    precision: str,
    resolved: str,
    overwrite: bool,
    device: torch.device,
    *,
    say: bool,
) -> None:
    """Refuse an explicit precision other than the folder's, or one this device cannot run;
    ``say``: log the precision taken, not this machine's own (once a run: at the real call)."""
    where = f"'{folder}' holds features extracted at precision={precision} ({record.get('by')})"
    if asked not in ("auto", precision):
        raise UserError(
            f"{where}, not the precision={asked} asked, in an overwrite not yet ended; use "
            f"precision=auto, another output_dir, or delete '{folder / OVERWRITE_FILE}' to "
            f"rebuild every bag at precision={asked}."
            if overwrite
            else f"{where}, not the precision={asked} asked; use precision=auto, another "
            f"output_dir, or overwrite=true to rebuild every bag at precision={asked}."
        )
    if precision != resolved:
        _check_runs(precision, device, where, say)
        if say:
            log.info("extract: %s; extracting at it (auto here would be %s)", where, resolved)


def _check_runs(precision: str, device: torch.device, where: str, say: bool) -> None:
    """Refuse a precision this device cannot run; warn (``say``) where it runs slowly (bf16 on
    a CPU without AMX: still the same features, which is what the folder needs)."""
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"{where}, which this GPU ({torch.cuda.get_device_name(device)}) cannot run; run this "
            "process on a GPU with bf16 (or on the CPU), or give it another output_dir."
        )
    if say and device.type == "cpu" and precision != "fp32" and not cpu_has_bf16():
        log.warning("extract: %s; this CPU runs it slowly (no native bf16)", where)
