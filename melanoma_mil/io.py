"""Atomic file writes and hashing shared by every stage (no partial files, ever)."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from melanoma_mil.errors import UserError
from melanoma_mil.fsutil import TEMP_NAME, new_temp, shareable
from melanoma_mil.locks import check_locks, locked

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path next to ``path``; rename it onto ``path`` only if the block succeeds.
    A temp file that cannot be made (a read-only folder) or written (a full disk: the write call
    names no file) is reported as ``path``, the file the user knows."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = new_temp(final)  # after removing those of this file's writers that were killed
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        shareable(tmp_path)
        os.replace(tmp_path, final)
    except OSError as e:
        if e.filename not in (None, tmp) or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(final)) from e
    finally:
        tmp_path.unlink(missing_ok=True)


def temp_files(path: str | os.PathLike[str]) -> list[Path]:
    """The temp files `atomic_path` left for ``path`` when its writer died before the rename."""
    final = Path(path)
    return sorted(final.parent.glob(f".{glob.escape(final.name)}.*.tmp"))


def remove_temp_files(*paths: str | os.PathLike[str]) -> None:
    """Remove what writers of ``paths`` killed before the rename left (call only while no live
    writer can be renaming one: holding the file's claim or lock)."""
    for path in paths:
        for tmp in temp_files(path):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def locked_writes(lock: Path, *paths: Path) -> Iterator[None]:
    """Hold ``lock``, the one lock every writer of ``paths`` holds until its rename, after
    removing the temp files of ``paths``: whoever left one while holding it died (a live writer
    would still hold it), so a run killed mid-write leaves no hidden file for good."""
    with locked(lock):
        remove_temp_files(*paths)
        yield


def temp_target(name: str) -> str | None:
    """The file name an `atomic_path` temp file ``name`` was written for, or None."""
    found = TEMP_NAME.fullmatch(name)
    return found["target"] if found else None


def read_h5(path: str | os.PathLike[str]) -> h5py.File:
    """``path`` opened read-only without HDF5's own file lock: every h5 file here is written
    whole under a temp name and renamed, never changed in place, so the lock guards nothing,
    and on a mount without locks (NFS without a lock manager: ENOLCK) it fails every read."""
    return h5py.File(path, "r", locking=False)


@contextlib.contextmanager
def atomic_h5(path: str | os.PathLike[str]) -> Iterator[h5py.File]:
    """A new h5 file, built in memory (see `h5_bytes`), that appears at ``path`` only once it is
    completely written."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        yield f
    write_bytes(path, buffer.getvalue())


def h5_bytes(build: Callable[[h5py.File], None]) -> bytes:
    """An h5 file made in memory by ``build(f)``, as bytes for `write_bytes`.

    HDF5 must never write to a disk that can fill up: after a failed write (ENOSPC) its file
    object cannot be closed cleanly and the interpreter segfaults at exit. In memory nothing can
    fail but RAM, and the bytes are then written with plain Python I/O.
    """
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        build(f)
    return buffer.getvalue()


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write bytes atomically: a full disk raises OSError and leaves nothing behind."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def json_safe(obj: Any) -> Any:
    """JSON-safe: NaN and infinities become null, numpy scalars Python numbers."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def json_text(obj: Any, **kwargs: Any) -> str:
    """Strict JSON of ``obj``, a missing number (NaN, infinity) written as null: Python writes
    NaN by default, which jq, JavaScript and most JSON readers refuse."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def json_file_text(obj: Any) -> str:
    """Strict JSON as every result file holds it: indented, sorted keys, a final newline."""
    return json_text(obj, indent=2, sort_keys=True) + "\n"


def write_together(files: dict[Path, bytes]) -> None:
    """Write several files as one result: each to its temp name, then all renamed (in reverse
    order: the first named is the last to appear). A failed write (a full disk) replaces none,
    so an earlier result is never left mixed with part of the new one."""
    with contextlib.ExitStack() as stack:
        temps = {path: stack.enter_context(atomic_path(path)) for path in files}
        for path, tmp in temps.items():
            try:
                tmp.write_bytes(files[path])
            except OSError as e:  # the write names no file: every open context would claim it
                e.filename = e.filename or str(tmp)  # this one's context names it ``path``
                raise


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write strict JSON atomically (indented, sorted keys) so readers never see half a file."""
    with atomic_path(path) as tmp:
        tmp.write_text(json_file_text(obj))


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def check_writable(
    path: str | os.PathLike[str],
    key: str = "output_dir",
    name: str | None = None,
    locks: bool = False,
) -> None:
    """Refuse, before any work, an output folder that is a file or cannot be written (read-only
    disk, no permission), or, with ``locks`` (a command whose processes take turns there), whose
    file system has no file locks: otherwise a command learns it only when its first result or
    lock is due. ``name``: how the message names the folder (default ``key``), for a folder
    inside ``key``.

    A missing folder is fine when its nearest existing parent is a writable folder. The probe is
    an anonymous temp file (O_TMPFILE where supported), so nothing is left behind. A '..' is
    followed as making the folder would (``missing/../x`` is ``x``, ``link/..`` the link's
    target's parent), so the folder checked is the one that would be made."""
    target = Path(path)
    name = name or key
    probe = Path(os.path.realpath(target)) if ".." in target.parts else target
    while not (probe.exists() or probe.is_symlink()) and probe.parent != probe:
        probe = probe.parent
    if probe.is_symlink() and not probe.exists():
        raise UserError(
            f"{name} '{target}' needs '{probe}', a link to '{os.readlink(probe)}', which does not "
            f"exist; make that folder, or choose another {key}."
        )
    if not probe.is_dir():
        what = "is" if probe == target else f"cannot be made: '{probe}' is"
        raise UserError(f"{name} '{target}' {what} a file, not a folder; choose another {key}.")
    try:
        with tempfile.TemporaryFile(dir=probe) as f:
            if locks:
                check_locks(f.fileno(), target, key, name)
    except OSError as e:
        raise UserError(
            f"{name} '{target}' cannot be written ({e.strerror} in '{probe}'); choose another "
            f"{key} or fix its permissions."
        ) from None


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed so multi-GB weights do not fill memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_text_csv(
    path: Path, what: str, key: str, used: Collection[str] | None = None
) -> pd.DataFrame:
    """A CSV as stripped strings (empty cells ''), or a UserError naming the file (``what``
    given by config ``key``) and the fix. A column name given twice is refused when the caller
    reads it (``used``; None: every column), else both copies are left out: exports often
    repeat the names of columns nobody reads."""
    if not path.is_file():
        found = "is a folder, not a CSV file" if path.is_dir() else "not found"
        raise UserError(f"{what} '{path}' {found}: check {key}.")
    options = {"dtype": str, "keep_default_na": False, "index_col": False}
    try:
        # index_col=False: rows with one cell more than the header (a trailing comma, an extra
        # value) must not turn the first column into the index, shifting every value one column
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(path, **options)
        header = pd.read_csv(path, header=None, nrows=1, **options).iloc[0].tolist()
    except pd.errors.ParserWarning:
        raise UserError(
            f"{what} '{path}' has rows with more cells than its header has columns; give each "
            "extra column a name in the header, or remove the extra cells."
        ) from None
    except (OSError, pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{what} '{path}' is unreadable ({msg}); save it as UTF-8 CSV.") from None
    names = [str(h).strip() for h in header]
    twice = sorted({n for n in names if n and names.count(n) > 1})
    clash = [n for n in twice if used is None or n in used]
    if clash:  # pandas would rename the second 'label' to 'label.1' and the first would be used
        raise UserError(f"{what} '{path}' has column(s) {clash} more than once; keep one of each.")
    if twice:
        log.warning("%s '%s': column(s) %s appear more than once; not read", what, path, twice)
    df.columns = [str(c).strip() for c in df.columns]  # cells are stripped, names too
    df = df.iloc[:, [i for i, n in enumerate(names) if n not in twice]]
    seps = [name for sep, name in ((";", "semicolons"), ("\t", "tabs")) if sep in df.columns[0]]
    if len(df.columns) == 1 and seps:  # e.g. a spreadsheet's export in a comma-decimal locale
        raise UserError(
            f"{what} '{path}' is separated by {seps[0]}, not commas; save it as "
            "comma-separated CSV."
        )
    return df.apply(lambda c: c.str.strip())
