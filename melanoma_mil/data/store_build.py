"""Building a bag store: given the files' shapes (`data.store_layout`), every bag checked and
written under a temp name and renamed (`build`), serialised by a lock file; and the upkeep of a
store folder (`prune`, `clear_dead_builds`). See `data.store`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from melanoma_mil.data.bags import read_attrs, read_bag
from melanoma_mil.data.store_layout import Layout, Source
from melanoma_mil.errors import UserError
from melanoma_mil.features.identity import feature_identity, identity_mismatch, plain
from melanoma_mil.fsutil import reserve
from melanoma_mil.io import json_text
from melanoma_mil.progress import progress
from melanoma_mil.workshare import Claim, clear_drafts, disk_full, warn_left

log = logging.getLogger(__name__)

FORMAT = 2  # 2: files keyed on ctime too (1 missed an edit whose mtime was set back)
WAIT_S = 1.0
UNUSED_S = 24 * 3600.0  # a store nobody opened for this long, and never reusable, is removed
# what `store_name` makes (`bags` before stores were named by slide count): data.store_dir may
# be a folder of yours, and only folders named so are ever pruned there
STORE_NAME = re.compile(r"float(16|32)-\d+(slides|bags)-[0-9a-f]{12}")
# a build's (and `prune`'s) temp folder, `.<store name>.<pid>.tmp`, holding only these files
TMP_NAME = re.compile(rf"\.({STORE_NAME.pattern})\.\d+\.tmp")
TMP_FILES = frozenset({"features.npy", "index.json"})


def read_index(folder: Path) -> dict[str, Any] | None:
    """The index of the complete store in ``folder``, or None (see `load_index`)."""
    index, problem = load_index(folder)
    return None if problem else index


def load_index(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """(its index.json, '') for the complete store in ``folder``, else (the index where it can
    be read, what is wrong, naming the file: 'incomplete: it has no index.json'): a user is
    told what to fix, not that there is no store. A copy cut short may keep index.json but not
    all of features.npy, so its shape is checked against the index (a header and a mapping,
    nothing read): else every run maps it and ends on a traceback."""
    try:
        index = json.loads((folder / "index.json").read_text())
    except FileNotFoundError:
        return None, "incomplete: it has no index.json"
    except (OSError, ValueError) as e:
        return None, f"damaged: its index.json cannot be read ({getattr(e, 'strerror', e) or e})"
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        what = f"format {index.get('format')}" if isinstance(index, dict) else "no store index"
        return None, f"damaged: its index.json is {what}, not a store of format {FORMAT}"
    try:
        shape = np.load(folder / "features.npy", mmap_mode="r").shape
    except FileNotFoundError:
        return index, "incomplete: it has no features.npy"
    except (OSError, ValueError, EOFError) as e:
        return index, f"damaged: its features.npy cannot be mapped ({e}; cut short?)"
    if shape != (index.get("rows"), index.get("dim")):
        return index, (
            f"damaged: its features.npy holds {list(shape)} where its index.json says "
            f"{[index.get('rows'), index.get('dim')]}"
        )
    return index, ""


def recorded(index: dict[str, Any]) -> dict[tuple[str, int, int, int], dict[str, Any]]:
    """The files a store's index records, by `Source.key`."""
    return {(r["path"], r["size"], r["mtime_ns"], r["ctime_ns"]): r for r in index["files"]}


def _identity(path: Path) -> dict[str, Any]:
    attrs = read_attrs(path)
    return {**feature_identity(attrs), "cache_key": plain(attrs.get("cache_key"))}


def _reserve(path: Path) -> None:
    """Allocate the whole of ``path`` before any of its memory map is written: a disk that
    fills meanwhile (another process writing) kills a process writing through a map with
    SIGBUS, no message; reserved, it is an OSError (`_no_room` says a full disk in one line).
    A file system without fallocate is written as before."""
    with open(path, "r+b") as f:
        try:
            reserve(f.fileno(), os.fstat(f.fileno()).st_size)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(path)) from None


def _room_fix(dtype: str) -> str:
    """The fix for a disk without room for a store of ``dtype`` (float16 only where it halves
    the store)."""
    if dtype == "float16":
        return "free space there or pass data.store_dir=PATH on a disk with room."
    return (
        "free space there, pass data.store_dir=PATH on a disk with room, or data.dtype=float16 "
        "(half the size)."
    )


@contextlib.contextmanager
def _no_room(root: Path, need: int, dtype: str) -> Iterator[None]:
    """A disk (or quota) that fills while the store is built, said in one line naming the
    store's folder (data.store_dir, or its default) and the fix: the temp folder an OSError
    names is removed by then, and one raised writing the file's header names no file at all
    (the CLI would blame output_dir, which does not move a bag store)."""
    try:
        yield
    except OSError as e:
        if not disk_full(e):
            raise
        raise UserError(
            f"the bag store needs {need / 1e9:.2f} GB in '{root}', which filled while it was "
            f"built ({e.strerror}): {_room_fix(dtype)}"
        ) from None


def _write(tmp: Path, sources: list[Source], layout: Layout, dtype: str, lock: Claim) -> None:
    """`_write_all`, a disk that fills meanwhile said by `_no_room`."""
    with _no_room(tmp.parent, layout.nbytes(dtype), dtype):
        _write_all(tmp, sources, layout, dtype, lock)


def _write_all(tmp: Path, sources: list[Source], layout: Layout, dtype: str, lock: Claim) -> None:
    """Every source's features, checked, into tmp/features.npy; then tmp/index.json."""
    total = sum(layout.rows.values())
    out = np.lib.format.open_memmap(
        tmp / "features.npy", mode="w+", dtype=np.dtype(dtype), shape=(total, layout.dim)
    )
    _reserve(tmp / "features.npy")
    first: tuple[Source, dict[str, Any]] | None = None
    files, start = [], 0
    for s in progress(sources, desc="building bag store", unit="bag", leave=False):
        path = Path(s.path)
        feats, _ = read_bag(path)  # checked first: a broken file is named as such
        ident = _identity(path)
        first = first or (s, ident)
        why = identity_mismatch(ident, first[1]) or (
            ident["cache_key"] != first[1]["cache_key"] and "has another cache_key"
        )
        if why:
            raise UserError(
                f"{path} {why} (as slide {first[0].slide_id} has): features_dir mixes feature "
                "caches. Point data.features_dir at one cache."
            )
        n = layout.rows[s.path]
        if feats.shape != (n, layout.dim):
            raise UserError(f"{path} changed while the bag store was built; run again.")
        block = out[start : start + n]
        block[...] = feats
        if not np.isfinite(block).all():
            raise UserError(f"{path}: features overflow {dtype}; use data.dtype=float32 (or auto).")
        files.append({**asdict(s), "start": start, "rows": n, "dtype": layout.dtypes[s.path]})
        start += n
        lock.heartbeat()
    out.flush()
    del out
    index = {
        "format": FORMAT,
        "dtype": dtype,
        "dim": layout.dim,
        "rows": total,
        "identity": first[1] if first else {},
        "built": {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()},
        "files": files,
    }
    (tmp / "index.json").write_text(json_text(index) + "\n")


def store_name(sources: list[Source], dtype: str) -> str:
    """The folder name of the store of ``sources`` in ``dtype`` (found by content otherwise)."""
    digest = hashlib.sha256(json.dumps([dtype, [s.key() for s in sources]]).encode())
    return f"{dtype}-{len(sources)}slides-{digest.hexdigest()[:12]}"


def _check_disk(root: Path, need: int, dtype: str) -> None:
    free = shutil.disk_usage(root).free
    if need > free * 0.95:
        raise UserError(
            f"the bag store needs {need / 1e9:.2f} GB but '{root}' has {free / 1e9:.2f} GB free: "
            f"{_room_fix(dtype)}"
        )


def _ours(folder: Path) -> bool:
    """A temp folder a build or `prune` made: named so, a real folder, only a store's files."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        with os.scandir(folder) as listing:
            return all(e.name in TMP_FILES and e.is_file(follow_symlinks=False) for e in listing)
    except OSError:
        return False


def _clear_dead_build(root: Path, folder: Path, store: str, held: str | None) -> None:
    """Remove ``folder``, a temp folder of the store named ``store``, if its builder is dead."""
    lock = None if store == held else Claim(root / f".{store}.lock")
    if lock is not None and not lock.acquire():
        return  # its builder is alive (or its lock's owner cannot be told dead yet)
    try:
        if _ours(folder):  # a peer that held the lock before us may have removed it
            shutil.rmtree(folder)
            log.info("removed %s, left by a bag store build that was killed", folder)
    finally:
        if lock is not None:
            lock.release()


def clear_dead_builds(root: Path, held: str | None = None) -> None:
    """Remove the temp folders of builds whose builder is dead, of any store in ``root``, and
    the lock drafts of claimants killed while claiming.

    A builder SIGKILLed mid-build leaves a full-size temp folder; only a build of that same
    store used to remove it, and runs that all reuse a store build nothing. A temp folder is
    written only under its store's lock (``held``: the one a build holds), so one whose lock
    we can take (`Claim` breaks a dead owner's) has no live builder, here or on another host;
    a lock held by a live builder leaves its folder alone. What cannot be removed (another
    user's files, a read-only folder) costs disk, not the run: one warning names it.
    """
    failed: list[str] = []
    try:
        folders = sorted(root.iterdir())
    except OSError as e:
        folders, failed = [], [str(e)]
    for folder in folders:
        match = TMP_NAME.fullmatch(folder.name)
        if match is None or not _ours(folder):
            continue
        try:
            _clear_dead_build(root, folder, match.group(1), held)
        except (OSError, UserError) as e:  # UserError: a symbolic link where its lock goes
            failed.append(f"{folder} ({e})")
    warn_left(root, "killed bag store builds", failed)
    clear_drafts(root)


def build(root: Path, sources: list[Source], layout: Layout, dtype: str) -> Path:
    """Build the store under its lock and return its folder; a process that finds the lock
    held waits, then returns the holder's store (or builds it, if the holder died)."""
    name = store_name(sources, dtype)
    final = root / name
    root.mkdir(parents=True, exist_ok=True)
    lock = Claim(root / f".{name}.lock")
    waited = 0.0
    while not lock.acquire():
        if read_index(final) is not None:
            return final
        if waited == 0.0:
            log.info("waiting for %s (pid %s) to build the bag store %s",
                     lock.owner.get("host"), lock.owner.get("pid"), final)  # fmt: skip
        time.sleep(WAIT_S)
        waited += WAIT_S
    try:
        problem = load_index(final)[1]
        if not problem:  # built by the process we waited for
            return final
        if final.exists():  # never a partial build (those are renamed in whole): damaged since
            raise UserError(
                f"bag store '{final}' is {problem}; delete that folder and run again: it is a "
                "cache, rebuilt from the feature files."
            )
        clear_dead_builds(root, name)
        nbytes = layout.nbytes(dtype)
        _check_disk(root, nbytes, dtype)
        tmp = root / f".{name}.{os.getpid()}.tmp"
        tmp.mkdir()
        try:
            started = time.perf_counter()
            _write(tmp, sources, layout, dtype, lock)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("built bag store %s (%.2f GB) in %.0f s", final, nbytes / 1e9,
                 time.perf_counter() - started)  # fmt: skip
        return final
    finally:
        lock.release()


def mark_used(folder: Path) -> None:
    """Stamp the store as in use (index.json's mtime), so `prune` leaves it for a day."""
    with contextlib.suppress(OSError):  # a read-only copy: nothing prunes there either
        os.utime(folder / "index.json")


def _superseded(index: dict[str, Any] | None, current: dict[str, tuple[Any, ...]]) -> bool:
    """An older format, or a file this cohort also holds that has changed since the build. A
    newer format (another package version sharing the folder) is that version's to judge."""
    version = index.get("format") if index is not None else None
    if not isinstance(version, int) or version < FORMAT:
        return True
    if version > FORMAT:
        return False
    for r in index.get("files", []):
        now = current.get(r.get("path"))
        if now is not None and now != (r["path"], r["size"], r["mtime_ns"], r["ctime_ns"]):
            return True
    return False


def prune(root: Path, sources: list[Source], unused_s: float = UNUSED_S) -> None:
    """Remove the stores beside this cohort's that can never be reused (an older format, or a
    file of this cohort changed since they were built) and no process opened for ``unused_s``.

    Every re-extraction would otherwise leave a whole cohort's copy behind. Stores of other
    cohorts' files are kept; one being built or removed by a peer (its lock held) is skipped.
    """
    if not root.is_dir():
        return
    current = {s.path: s.key() for s in sources}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and STORE_NAME.fullmatch(p.name)):
        try:  # the age first: a store in use is not read again (`_find` has just read it)
            age = time.time() - (folder / "index.json").stat().st_mtime
            index = json.loads((folder / "index.json").read_text()) if age >= unused_s else None
        except (OSError, ValueError):
            continue  # damaged or half-removed: named by whoever needs it, never guessed at
        if not isinstance(index, dict) or not isinstance(index.get("files"), list):
            continue  # in use, or not a store's index: never guessed at
        if not _superseded(index, current):
            continue
        lock = Claim(root / f".{folder.name}.lock")
        try:  # a lock it may not break (another user's) keeps the store, as a held one does
            if not lock.acquire():
                continue
            trash = root / f".{folder.name}.{os.getpid()}.tmp"
            os.replace(folder, trash)  # gone at once for readers; the bytes go next
            shutil.rmtree(trash, ignore_errors=True)
            log.info("removed bag store %s: none of its uses can come back (its feature files "
                     "changed, or an older format) and no run opened it for %.0f h",
                     folder, age / 3600)  # fmt: skip
        except (OSError, UserError) as e:  # UserError: a symbolic link where its lock goes
            log.warning("could not remove the stale bag store %s: %s", folder, e)
        finally:
            lock.release()
