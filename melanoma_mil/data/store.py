"""The bag store: a cohort's bags in one memory-mapped file, built once, opened by every run.

`fit` used to read every bag into each process's RAM as float32: N DDP ranks held N copies,
and every sweep run re-read the cache. The store is one ``features.npy`` ([tiles, D], every
bag a contiguous row range) plus ``index.json`` (which file each range came from, with its
size, mtime and ctime). Every fold, rank, concurrent fold process and later run maps it
copy-on-write and read-only in practice, so the kernel keeps one copy in the page cache for
all of them.

- Where: ``<features_dir>/.bag_stores/<name>/``, or ``data.store_dir`` when set (a read-only
  cache needs it). A store is reused by any cohort whose files it covers unchanged (same
  path, size, mtime and ctime), with each of the cohort's bags contiguous in it. A complete
  store in a read-only folder (a lab's shared one, another user's) is mapped as is: reading
  needs no lock, and its 'last used' stamp is skipped; only a build needs to write there.
- Pruned: a store that can never be reused again (a file it holds has changed since, or an
  older store format) is removed once no process has opened it for a day (`prune`).
- dtype: ``data.dtype=auto`` keeps float16 when every feature file is float16 (what `extract`
  writes; float16 -> float32 is exact, so training sees the same numbers as from float32 RAM),
  else float32. ``float16`` is the explicit, lossy choice for float32 features.
- Building is atomic (written under a temp name, then renamed) and serialised by a lock file;
  a process that loses the race waits, then opens the winner's store. A killed builder's
  full-size temp folder is removed by the next run that builds or reuses any store in the
  folder, once its lock says that builder is gone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from melanoma_mil.config import FitConfig
from melanoma_mil.data.bags import read_attrs
from melanoma_mil.data.memory import check_memory, estimate_for
from melanoma_mil.data.store_build import (
    build,
    clear_dead_builds,
    load_index,
    mark_used,
    prune,
    read_index,
    recorded,
    store_name,
)
from melanoma_mil.data.store_layout import Layout, Source, feature_dim, scan
from melanoma_mil.errors import UserError
from melanoma_mil.tiling.coords import PER_SLIDE_ATTRS

log = logging.getLogger(__name__)

STORES = ".bag_stores"

Members = dict[str, list[tuple[str, Path]]]


class _Bags(Mapping[str, torch.Tensor]):
    """bag_id -> a zero-copy view [N, D] of the mapped file."""

    def __init__(self, store: BagStore) -> None:
        self.store = store

    def __getitem__(self, bag_id: str) -> torch.Tensor:
        start, n = self.store.spans[bag_id]
        return self.store.features[start : start + n]

    def __iter__(self) -> Iterator[str]:
        return iter(self.store.spans)

    def __len__(self) -> int:
        return len(self.store.spans)


class BagStore:
    """A cohort's bags as views of one memory-mapped [tiles, D] array.

    ``bags[bag_id]`` is a view (no copy); ``spans[bag_id]`` its (first row, rows). Pickling
    (ddp_spawn, DataLoader workers under spawn) sends the path and reopens the map.
    """

    def __init__(
        self, folder: Path, spans: dict[str, tuple[int, int]], provenance: dict[str, Any]
    ) -> None:
        self.folder = folder
        self.spans = spans
        self.provenance = provenance
        self.bags = _Bags(self)
        self._open()

    def _open(self) -> None:
        # mode "c": private copy-on-write mapping; clean pages stay shared in the page cache
        mark_used(self.folder)
        array = np.load(self.folder / "features.npy", mmap_mode="c")
        self.features = torch.from_numpy(array)
        self.device_features: dict[str, torch.Tensor] = {}

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.features.dtype

    def nbytes(self, bag_ids: list[str] | None = None) -> int:
        rows = sum(self.spans[b][1] for b in bag_ids) if bag_ids is not None else None
        rows = self.features.shape[0] if rows is None else rows
        return int(rows * self.dim * self.features.element_size())

    def on_device(self, device: torch.device) -> torch.Tensor:
        """The whole array on ``device``, copied once per process and shared by every fold."""
        key = str(device)
        if key not in self.device_features:
            self.device_features[key] = self.features.to(device)
        return self.device_features[key]

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "spans": self.spans, "provenance": self.provenance}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], state["spans"], state["provenance"])  # type: ignore[misc]


# --------------------------------------------------------------------------- where
def store_root(features_dir: str | None, store_dir: str | None) -> Path:
    """``data.store_dir`` (made if missing) when set, else ``<features_dir>/.bag_stores``. It
    may be read-only (a lab's shared store): a complete store there is used as is, and only a
    build needs to write (`_cannot_build`)."""
    if store_dir:
        root = Path(store_dir)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"data.store_dir '{root}' cannot be created ({e}).") from None
        return root
    return Path(features_dir or ".") / STORES


def _writable(root: Path) -> bool:
    """Whether this process may write in ``root``: not on a read-only mount, nor another
    user's folder it may only read. Probed with an anonymous temp file, as `io.check_writable`
    does: ``os.access`` says yes where the server refuses (NFS with root squash)."""
    try:
        with tempfile.TemporaryFile(dir=root):
            return True
    except OSError:
        return False


def _cannot_build(
    root: Path, store_dir: str | None, sources: list[Source], dtype: str, need: int
) -> str | None:
    """Why the store of ``sources`` in ``dtype`` (``need`` bytes) cannot be built in ``root``,
    or None when it can."""
    fix = f"pass data.store_dir=PATH, a writable folder with room for {need / 1e9:.2f} GB"
    if not root.exists():
        if store_dir or _writable(root.parent):  # a data.store_dir exists by now
            return None
        return (
            f"features folder '{root.parent}' is not writable, so the bag store cannot live "
            f"next to it: {fix}."
        )
    if _writable(root):
        return None
    where = "data.store_dir" if store_dir else "bag store folder"
    unusable = _unusable(root, sources, dtype)
    if unusable:
        what, owner = unusable
        return (
            f"{where} '{root}' is read-only (for this user) and its bag store of these feature "
            f"files {what}; {fix}, or have the folder's owner {owner}."
        )
    return (
        f"{where} '{root}' is read-only (for this user) and holds no bag store of these feature "
        "files (never built there, another data.dtype, or a file changed since) to use as is: "
        f"{fix}, or have the folder's owner run `fit` once to build it there."
    )


def _unusable(root: Path, sources: list[Source], dtype: str) -> tuple[str, str] | None:
    """(what is wrong, what the folder's owner can do) with a store of ``sources`` in ``dtype``
    that is in ``root`` but cannot be used, or None when there is none: the one built for them
    or one whose index holds them, damaged or incomplete (a copy cut short); or only a build's
    temp folder (being built now, or its builder was stopped)."""
    name = store_name(sources, dtype)
    need = {s.key() for s in sources}
    for folder in dict.fromkeys([root / name, *sorted(root.iterdir())]):  # its own first
        if folder.name.startswith(".") or not (folder.is_dir() or folder.is_symlink()):
            continue
        index, problem = load_index(folder)
        holds = index is not None and index.get("dtype") == dtype
        if problem and (folder.name == name or holds and need <= recorded(index).keys()):
            return f"'{folder}' is {problem}", "delete it and run `fit` once to build it again"
    temp = sorted(root.glob(f".{name}.*.tmp"))
    if temp:
        what = f"is incomplete: only a build's temp folder '{temp[0]}' is there"
        return what, "run `fit` once to build it there (a build under way: wait for it)"
    return None


# --------------------------------------------------------------------------- finding
def _resolve(members: Members) -> tuple[dict[str, list[str]], list[Source]]:
    """bag_id -> its files' resolved paths, and every file once (in bag order) with its stat."""
    files: dict[str, list[str]] = {}
    seen: dict[str, Source] = {}
    for bag_id, parts in members.items():
        for slide_id, path in parts:
            src = Source.of(slide_id, path)
            seen.setdefault(src.path, src)
            files.setdefault(bag_id, []).append(src.path)
    return files, list(seen.values())


def features_identity(members: Members, features_dir: str | None) -> tuple[int, str]:
    """(feature dim, hash of every file's path under features_dir, size and mtime): what a run
    records of bags without a cache key, so a resume on other features is refused. Paths are
    relative, so another mount of the same files (a cluster node) or a moved folder resumes."""
    root = features_dir or "."
    entries = []
    for parts in members.values():
        for slide_id, path in parts:
            st = path.stat()
            entries.append((slide_id, os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
    first = next(iter(members.values()))[0][1]
    digest = hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()
    return feature_dim(first), digest


def _spans(
    files: dict[str, list[str]], starts: Mapping[str, tuple[int, int]]
) -> dict[str, tuple[int, int]] | None:
    """bag_id -> (start, rows) when each bag's files lie back to back in order, else None."""
    spans = {}
    for bag_id, paths in files.items():
        start, n = starts[paths[0]]
        for path in paths[1:]:
            s, k = starts[path]
            if s != start + n:
                return None
            n += k
        spans[bag_id] = (start, n)
    return spans


def _find(
    root: Path, files: dict[str, list[str]], sources: list[Source], wanted: str
) -> tuple[Path, Layout, dict[str, tuple[int, int]]] | None:
    """An existing store holding every source unchanged, in the wanted dtype, bags contiguous."""
    if not root.is_dir():
        return None
    need = {s.key() for s in sources}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        index = read_index(folder)
        if index is None:
            continue
        files_of = recorded(index)
        if not need <= files_of.keys():
            continue
        rows = [files_of[s.key()] for s in sources]
        dtypes = {r["path"]: r["dtype"] for r in rows}
        layout = Layout({r["path"]: r["rows"] for r in rows}, index["dim"], dtypes)
        if layout.store_dtype(wanted) != index["dtype"]:
            continue
        spans = _spans(files, {r["path"]: (r["start"], r["rows"]) for r in rows})
        if spans is not None:
            return folder, layout, spans
    return None


def _local_rank() -> int:
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def open_store(members: Members, cfg: FitConfig, model_members: int = 1) -> BagStore:
    """The cohort's bags from an existing store, or one built now, after a memory pre-check.

    ``members`` maps bag_id -> [(slide_id, path), ...] (several = patient bag). Nothing is
    read before the check: sizes come from the store's index or the files' metadata.
    ``model_members``: the most ensemble members a fold trains (for the check).
    """
    root = store_root(cfg.data.features_dir, cfg.data.store_dir)
    files, sources = _resolve(members)
    found = _find(root, files, sources, cfg.data.dtype)
    layout = found[1] if found else scan(sources)
    dtype = layout.store_dtype(cfg.data.dtype)
    bag_rows = [sum(layout.rows[p] for p in paths) for paths in files.values()]
    largest_file = max(layout.rows.values()) * layout.dim
    need = estimate_for(cfg, bag_rows, layout.dim, np.dtype(dtype).itemsize,
                        build_elements=0 if found else largest_file,
                        members=model_members)  # fmt: skip
    size = layout.nbytes(dtype)
    why = None if found else _cannot_build(root, cfg.data.store_dir, sources, dtype, size)
    if why:
        raise UserError(why)
    writable = _writable(root)
    if _local_rank() == 0:  # once per machine: later ranks would count the first one twice
        check_memory(need, cfg.data.memory_gb)
        if writable:  # a read-only folder's leftovers are its owner's to remove
            prune(root, sources)
        if found and writable:  # a build clears them itself, under its lock
            clear_dead_builds(root)
    if found:
        folder, _, spans = found
        read_only = "" if writable else "; its folder is read-only: used as is"
        log.info("bag store: %s (reused%s)", folder, read_only)
    else:
        folder = build(root, sources, layout, dtype)
        index = read_index(folder)
        assert index is not None
        starts = {r["path"]: (r["start"], r["rows"]) for r in index["files"]}
        built = _spans(files, starts)
        assert built is not None  # built in members order: every bag is contiguous
        spans = built
    first = next(iter(members.values()))[0][1]
    provenance = {k: v for k, v in read_attrs(first).items() if k not in PER_SLIDE_ATTRS}
    return BagStore(folder, spans, provenance)
