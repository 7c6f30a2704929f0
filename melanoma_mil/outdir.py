"""Output folders say which command (and which trained run) made them.

Each command's output folder holds a small marker, ``.melanoma-mil.json``: ``{"command": ...}``
and, for `predict` and `heatmap`, the ``run_id`` and ``run_dir`` of the run they applied (a
sweep's own comparison: ``run_id`` "sweep" and the sweep's folder). A
command refuses a folder another command made (one would replace the other's files, or resume
from them) and a folder of its own made for another run unless ``overwrite=true``. `fit`'s run
folders carry the same marker with the run's identity (see `rundir`); `tile`, `extract` and
`sweep` mark theirs with `claim_shared`.

An output_dir may be a folder of its own inside a `fit` run folder (`fit overwrite=true` carries
it over to the new run), but not inside the run's own entries (folds/, logs/, ...), which are
replaced with the run: `inside_run` refuses those for every command, before any work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from melanoma_mil.errors import UserError
from melanoma_mil.fsutil import create_once
from melanoma_mil.io import check_writable, json_file_text, write_json

MARKER = ".melanoma-mil.json"


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The folder's marker, None when it has none; an unreadable one names no command."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"command": "?"}
    return data if isinstance(data, dict) else {"command": "?"}


def write_marker(folder: Path, record: dict[str, Any]) -> bool:
    """Create the marker unless one exists (race-safe); True if this call made it."""
    return create_once(Path(folder) / MARKER, _encode(record))


def _encode(record: dict[str, Any]) -> bytes:
    return json_file_text(record).encode()


def made_by(marker: dict[str, Any]) -> str:
    """'`heatmap` for run <dir>' and the like, for messages."""
    what = f"`{marker.get('command', '?')}`"
    return f"{what} for run {marker['run_dir']}" if marker.get("run_dir") else what


def is_empty(folder: Path) -> bool:
    """Missing, or holding only hidden entries (markers, leftovers of interrupted writes)."""
    folder = Path(folder)
    return not folder.exists() or all(p.name.startswith(".") for p in folder.iterdir())


def claim_output(
    folder: str | Path,
    record: dict[str, Any],
    overwrite: bool,
    outputs: tuple[str, ...],
    write: bool = True,
) -> None:
    """Make ``folder`` this command's (``record``: command[, run_id, run_dir]) or refuse it;
    ``write=False`` only checks (before any work), the marker comes with the first output.

    ``outputs`` are glob patterns of the files the command writes: a folder without a marker
    that already holds some is taken over only with ``overwrite``."""
    command = record["command"]
    out = output_folder(folder, command)
    marker = read_marker(out)
    if marker is not None:
        _same_command(out, marker, command)
        if marker.get("run_id") != record.get("run_id"):
            if not overwrite:
                this = f"run {record['run_dir']}" if record.get("run_dir") else "this call"
                raise UserError(
                    f"output_dir '{out}' holds output of {made_by(marker)}, not of {this}; "
                    "choose another output_dir or pass overwrite=true to redo it here."
                )
            if write:
                write_json(out / MARKER, record)
        return
    # as paths under output_dir: a slide's file is named with its folder, where the user finds it
    found = (
        sorted({p.relative_to(out).as_posix() for pattern in outputs for p in out.glob(pattern)})
        if out.exists()
        else []
    )
    if not overwrite:
        refuse_unknown(out, found)
    if not write:
        return
    out.mkdir(parents=True, exist_ok=True)
    if not write_marker(out, record):  # another process was faster: check its claim
        claim_output(out, record, overwrite, outputs)


def refuse_unknown(out: Path, found: list[str]) -> None:
    """Refuse an output_dir without a marker whose ``found`` entries (paths under it) a command
    would replace: no earlier call is known to have made them."""
    if found:
        raise UserError(
            f"output_dir '{out}' already holds {found[:5]} from an unknown run; pass "
            "overwrite=true to replace them or choose another output_dir."
        )


def claim_shared(folder: str | Path, command: str, write: bool = True) -> None:
    """Make ``folder`` ``command``'s or refuse it, for commands that resume file by file and
    that many processes share (`tile`, `extract`; `sweep` one at a time). A folder without a
    marker is adopted, as folders made before markers existed: these commands keep each
    slide's file and each run there unless ``overwrite``, and rewrite only their summary tables
    and QC images. ``write=False`` only checks (before heavy work)."""
    out = output_folder(folder, command)
    marker = read_marker(out)
    if marker is None and not write:
        return
    if marker is None:
        out.mkdir(parents=True, exist_ok=True)
        if write_marker(out, {"command": command}):
            return
        marker = read_marker(out) or {}  # another process was faster: check its claim
    _same_command(out, marker, command)


def refuse_linked(
    folder: str | Path, command: str, names: Iterable[str], output_dir: str | Path | None = None
) -> None:
    """Refuse a link among the folders ``command`` writes into inside ``folder`` (``names``):
    its writes would go through and replace files elsewhere. A linked output_dir itself, or a
    linked file in it, is fine (a file is replaced, not written through). ``output_dir``, the
    one the message names, when ``folder`` is a folder inside it."""
    root = Path(folder)
    for name in names:
        path = root / name
        if path.is_symlink() and path.is_dir():
            raise UserError(
                f"'{path}' is a link to '{os.readlink(path)}': `{command}` writes into it, so "
                f"files outside output_dir '{output_dir or root}' would be replaced; replace the "
                "link by a folder, or choose another output_dir."
            )


def refuse_in_the_way(
    folder: str | Path, command: str, names: Iterable[str], written: Iterable[str] | None = None
) -> None:
    """`refuse_linked`, and refuse a file at one of ``names``, the folders ``command`` makes in
    ``folder``, or one of ``written`` (default: all ``names``), those it writes into in this
    call, that it cannot write: else every slide would fail on it (or a traceback end the run)
    after the work. A read-only folder it only reads (all its slides done) is fine."""
    names = list(names)
    refuse_linked(folder, command, names)
    root = Path(folder)
    for name in names:
        path = root / name
        if path.exists() and not path.is_dir():
            raise UserError(
                f"'{path}' is a file, and `{command}` makes a folder of that name in output_dir "
                f"'{root}'; move the file away, or choose another output_dir."
            )
    refuse_unwritable([root / name for name in (names if written is None else written)], command)


def refuse_unwritable(folders: Iterable[Path], command: str) -> None:
    """Refuse an existing folder among ``folders``, those ``command`` writes into in this call,
    that cannot be written (a read-only mount, another user's folder): else every slide fails
    on it, each after its tiling or encoding. A missing one is made in a folder checked too."""
    for folder in folders:
        if folder.is_dir():
            check_writable(folder, name=f"`{command}`'s folder")


def refuse_folders_at(folder: str | Path, command: str, names: Iterable[str]) -> None:
    """Refuse a folder at one of ``names``, the files ``command`` writes (or, with overwrite,
    removes) in ``folder``: else the call fails on it after all its work."""
    root = Path(folder)
    for name in names:
        path = root / name
        if path.is_dir():
            raise UserError(
                f"'{path}' is a folder, and `{command}` writes its file of that name in "
                f"output_dir '{root}'; move it away, or choose another output_dir."
            )


def output_folder(folder: str | Path, command: str) -> Path:
    """``folder`` as ``command``'s output_dir: not a file, not inside a run's own entries."""
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir '{out}' is a file, not a folder; choose another output_dir.")
    inside_run(out, command)
    return out


def inside_run(folder: str | Path, command: str) -> None:
    """Refuse ``folder`` inside an entry of a `fit` run that is the run's own (`rundir.run_owns`):
    `fit overwrite=true` would delete it with the run. `fit`'s own report (`evaluate` into
    <run>/evaluation) is the exception."""
    from melanoma_mil.rundir.layout import WRITTEN_FOR_RUN, run_owns  # rundir imports this

    out = Path(folder).resolve()
    for run in out.parents:
        if (read_marker(run) or {}).get("command") != "fit":
            continue
        parts = out.relative_to(run).parts
        if run_owns(parts[0]) and WRITTEN_FOR_RUN.get(parts) != command:
            raise UserError(
                f"output_dir '{folder}' is inside '{parts[0]}' of the `fit` run '{run}', which is "
                f"the run's own (replaced with it); choose a folder of its own, e.g. "
                f"'{run / command}'."
            )


def _same_command(out: Path, marker: dict[str, Any], command: str) -> None:
    if marker.get("command") != command:
        raise UserError(
            f"output_dir '{out}' holds output of {made_by(marker)}; `{command}` writes into a "
            "folder of its own: choose another output_dir."
        )
