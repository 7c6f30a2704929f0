"""The feature cache: its key, what makes a cached slide valid, and locks for shared folders.

The cache key names a folder per (encoder, weights, transform, tiling) so two settings can never
share files; a human-readable prefix keeps folders recognisable, a hash keeps them distinct.
Locks are O_EXCL files holding pid/host; a lock is stale when its process is gone (same host)
or its heartbeat (mtime) is older than ``STALE_AFTER_S`` (other hosts, e.g. a dead node).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from melanoma_mil.features.identity import (
    IDENTITY_FIELDS,
    feature_identity,
    identity_mismatch,
    plain,
)
from melanoma_mil.tiling.coords import TileGrid

STALE_AFTER_S = 900.0  # a lock not touched for this long belongs to a dead process
HEARTBEAT_S = 30.0


def slide_identity(provenance: Mapping[str, Any], grid: TileGrid) -> dict[str, Any]:
    """The feature identity of an encoder (its provenance) applied to a tile grid."""
    return feature_identity({**provenance, **grid.attrs()})


def cache_key(identity: Mapping[str, Any]) -> str:
    """``<encoder>-<weights>-<tile>px-<mpp>mpp-<hash8>``: readable, and unique per identity."""
    hashed = {k: identity[k] for k in IDENTITY_FIELDS}
    # the hash input keeps the names it had before IDENTITY_FIELDS, so caches keep their folders
    hashed["arch"], hashed["pooling"] = hashed.pop("encoder_arch"), hashed.pop("encoder_pooling")
    digest = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:8]
    weights = str(identity["encoder_weights"])
    wtag = weights if weights == "random" else "hub" if weights.startswith("hub:") else weights[:8]
    mpp = "nompp" if identity["target_mpp"] is None else f"{identity['target_mpp']:g}mpp"
    name = re.sub(r"[^A-Za-z0-9_.]+", "-", str(identity["encoder"]))
    overlap = f"-ov{identity['overlap']}" if identity["overlap"] else ""
    return f"{name}-{wtag}-{identity['tile_size']}px-{mpp}{overlap}-{digest}"


def check_cached(path: Path, expected: Mapping[str, Any], coords: np.ndarray) -> str | None:
    """None when ``path`` is a complete cache entry for these settings and coords, else why not."""
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            feats, cached_coords = f["features"], f["coords"][:]
            shape = feats.shape
    except (OSError, KeyError) as e:
        return f"unreadable or incomplete ({type(e).__name__})"
    key = plain(attrs.get("cache_key"))
    if key != expected["cache_key"]:
        return f"attr cache_key={key!r}, expected {expected['cache_key']!r}"
    why = identity_mismatch(feature_identity(attrs), feature_identity(expected))
    if why:
        return why
    if shape != (len(coords), expected["embed_dim"]):
        return f"features {shape}, expected ({len(coords)}, {expected['embed_dim']})"
    if not np.array_equal(cached_coords, coords):
        return "coords differ from the tile grid (tiling was re-run)"
    return None


def clean_temp_files(directory: Path, slide_id: str) -> int:
    """Remove temp files a killed writer of ``slide_id`` left (call only while holding its lock)."""
    n = 0
    for tmp in directory.glob(f".{_glob_escape(slide_id)}.h5.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            n += 1
    return n


def _glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SlideLock:
    """Exclusive claim on one slide's output, safe across processes and hosts sharing a folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = False
        self._touched = 0.0
        self.owner: dict[str, Any] = {}

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _stale(self, owner: Mapping[str, Any]) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
            return not _pid_alive(owner["pid"])
        return age > STALE_AFTER_S

    def acquire(self) -> bool:
        """Take the lock (breaking a stale one); False if another live process holds it."""
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self.owner = self._read()
                if not self._stale(self.owner):
                    return False
                self._break(self.owner)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held, self._touched = True, time.time()
            return True
        return False

    def _break(self, seen: Mapping[str, Any]) -> None:
        """Move the stale lock aside atomically; put it back if it changed hands meanwhile."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        try:
            if json.loads(aside.read_text() or "{}") != dict(seen):
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)  # a fresh lock was taken meanwhile: restore it
        except (OSError, ValueError):
            pass
        aside.unlink(missing_ok=True)

    def heartbeat(self) -> None:
        """Refresh the mtime so other hosts do not consider this lock stale."""
        now = time.time()
        if self.held and now - self._touched > HEARTBEAT_S:
            with contextlib.suppress(OSError):
                os.utime(self.path)
            self._touched = now

    def release(self) -> None:
        if self.held and self._read().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False
