"""The bag store: a cohort's bags in one memory-mapped file, built once, opened by every run.

`fit` used to read every bag into each process's RAM as float32: N DDP ranks held N copies,
and every sweep run re-read the cache. The store is one ``features.npy`` ([tiles, D], every
bag a contiguous row range) plus ``index.json`` (which file each range came from, with its
size and mtime). Every fold, rank, concurrent fold process and later run maps it copy-on-write
and read-only in practice, so the kernel keeps one copy in the page cache for all of them.

- Where: ``<features_dir>/.bag_stores/<name>/``, or ``data.store_dir`` when set (a read-only
  cache needs it). A store is reused by any cohort whose files it covers unchanged (same
  path, size and mtime), with each of the cohort's bags contiguous in it.
- dtype: ``data.dtype=auto`` keeps float16 when every feature file is float16 (what `extract`
  writes; float16 -> float32 is exact, so training sees the same numbers as from float32 RAM),
  else float32. ``float16`` is the explicit, lossy choice for float32 features.
- Building is atomic (written under a temp name, then renamed) and serialised by a lock file;
  a process that loses the race waits, then opens the winner's store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from melanoma_mil.config import FitConfig
from melanoma_mil.data.bags import features_entry, read_attrs, read_bag
from melanoma_mil.data.memory import check_memory, estimate_for
from melanoma_mil.errors import UserError
from melanoma_mil.features.identity import feature_identity, identity_mismatch, plain
from melanoma_mil.progress import progress
from melanoma_mil.tiling.coords import PER_SLIDE_ATTRS
from melanoma_mil.workshare import Claim

log = logging.getLogger(__name__)

STORES = ".bag_stores"
FORMAT = 1
WAIT_S = 1.0

Members = dict[str, list[tuple[str, Path]]]


@dataclass(frozen=True)
class Source:
    """One feature file as the store records it: a changed file never matches again."""

    slide_id: str
    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, slide_id: str, path: Path) -> Source:
        st = path.stat()
        return cls(slide_id, str(path.resolve()), st.st_size, st.st_mtime_ns)

    def key(self) -> tuple[str, int, int]:
        return (self.path, self.size, self.mtime_ns)


@dataclass(frozen=True)
class Layout:
    """Shapes without data: rows per slide, the feature dim, each file's own dtype."""

    rows: dict[str, int]  # slide path -> tiles
    dim: int
    dtypes: dict[str, str]  # slide path -> numpy dtype name of the file's features

    def store_dtype(self, wanted: str) -> str:
        """auto: float16 only when every file is float16 (then the store is lossless)."""
        if wanted != "auto":
            return wanted
        return "float16" if set(self.dtypes.values()) == {"float16"} else "float32"


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
    """``data.store_dir`` when set, else ``<features_dir>/.bag_stores`` if that is writable."""
    if store_dir:
        root = Path(store_dir)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"data.store_dir '{root}' cannot be created ({e}).") from None
        if not os.access(root, os.W_OK):
            raise UserError(f"data.store_dir '{root}' is not writable; choose another folder.")
        return root
    folder = Path(features_dir or ".")
    root = folder / STORES
    if root.is_dir() and os.access(root, os.W_OK):
        return root
    if not root.exists() and os.access(folder, os.W_OK):
        return root
    raise UserError(
        f"features folder '{folder}' is not writable, so the bag store cannot live next to it: "
        "pass data.store_dir=PATH (a local disk with room for the cohort's features)."
    )


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


def _read_index(folder: Path) -> dict[str, Any] | None:
    try:
        index = json.loads((folder / "index.json").read_text())
    except (OSError, ValueError):
        return None
    ok = (
        isinstance(index, dict)
        and index.get("format") == FORMAT
        and (folder / "features.npy").is_file()
    )
    return index if ok else None


def _find(
    root: Path, files: dict[str, list[str]], sources: list[Source], wanted: str
) -> tuple[Path, Layout, dict[str, tuple[int, int]]] | None:
    """An existing store holding every source unchanged, in the wanted dtype, bags contiguous."""
    if not root.is_dir():
        return None
    need = {s.key() for s in sources}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        index = _read_index(folder)
        if index is None:
            continue
        recorded = {(r["path"], r["size"], r["mtime_ns"]): r for r in index["files"]}
        if not need <= recorded.keys():
            continue
        rows = [recorded[s.key()] for s in sources]
        dtypes = {r["path"]: r["dtype"] for r in rows}
        layout = Layout({r["path"]: r["rows"] for r in rows}, index["dim"], dtypes)
        if layout.store_dtype(wanted) != index["dtype"]:
            continue
        spans = _spans(files, {r["path"]: (r["start"], r["rows"]) for r in rows})
        if spans is not None:
            return folder, layout, spans
    return None


# --------------------------------------------------------------------------- building
def _file_shape(path: Path) -> tuple[tuple[int, ...], str]:
    """(shape, dtype name) of a bag file's features without reading them."""
    try:
        if path.suffix == ".pt":
            try:  # zip-format files open lazily; legacy ones are read whole
                t = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                t = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(t, torch.Tensor | np.ndarray) and t.ndim > 0:
                return tuple(t.shape), str(t.dtype).removeprefix("torch.")
            what = type(t).__name__
        else:
            with h5py.File(path, "r") as f:
                ds = features_entry(f, path)
                if isinstance(ds, h5py.Dataset) and ds.shape and ds.dtype.kind in "biuf":
                    return tuple(ds.shape), ds.dtype.name
                what = f"{type(ds).__name__} of {getattr(ds, 'dtype', 'no dtype')}"
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise UserError(f"{path}: cannot read bag ({e}); re-run `extract` for it.") from None
    raise UserError(
        f"{path}: 'features' is a {what}, not a numeric array; re-run `extract` for this slide."
    )


def scan(sources: list[Source]) -> Layout:
    """Shapes and dtypes of every file (metadata only), checking one feature dim."""
    rows, dtypes = {}, {}
    dim: tuple[str, int] | None = None
    for s in progress(sources, desc="scanning bags", unit="bag", leave=False):
        shape, dtype = _file_shape(Path(s.path))
        if len(shape) == 3 and shape[0] == 1:
            shape = shape[1:]
        if len(shape) != 2:
            raise UserError(f"{s.path}: features have shape {shape}, expected [N, D].")
        if shape[0] == 0:
            raise UserError(f"{s.path}: empty bag (0 tiles); drop the slide or re-tile it.")
        dim = dim or (s.slide_id, shape[1])
        if shape[1] != dim[1]:
            raise UserError(
                f"{s.path}: feature dim {shape[1]} but slide {dim[0]} has {dim[1]}; "
                "bags from different encoders cannot be mixed."
            )
        rows[s.path], dtypes[s.path] = shape[0], dtype
    assert dim is not None
    return Layout(rows, dim[1], dtypes)


def _identity(path: Path) -> dict[str, Any]:
    attrs = read_attrs(path)
    return {**feature_identity(attrs), "cache_key": plain(attrs.get("cache_key"))}


def _write(tmp: Path, sources: list[Source], layout: Layout, dtype: str, lock: Claim) -> None:
    """Every source's features, checked, into tmp/features.npy; then tmp/index.json."""
    total = sum(layout.rows.values())
    out = np.lib.format.open_memmap(
        tmp / "features.npy", mode="w+", dtype=np.dtype(dtype), shape=(total, layout.dim)
    )
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
    (tmp / "index.json").write_text(json.dumps(index) + "\n")


def _name(sources: list[Source], dtype: str) -> str:
    digest = hashlib.sha256(json.dumps([dtype, [s.key() for s in sources]]).encode())
    return f"{dtype}-{len(sources)}slides-{digest.hexdigest()[:12]}"


def _check_disk(root: Path, need: int) -> None:
    free = shutil.disk_usage(root).free
    if need > free * 0.95:
        raise UserError(
            f"the bag store needs {need / 1e9:.2f} GB but '{root}' has {free / 1e9:.2f} GB free: "
            "free space there, pass data.store_dir=PATH on a disk with room, or "
            "data.dtype=float16 (half the size)."
        )


def _build(root: Path, sources: list[Source], layout: Layout, dtype: str) -> Path:
    """Build the store under its lock and return its folder; a process that finds the lock
    held waits, then returns the holder's store (or builds it, if the holder died)."""
    name = _name(sources, dtype)
    final = root / name
    root.mkdir(parents=True, exist_ok=True)
    lock = Claim(root / f".{name}.lock")
    waited = 0.0
    while not lock.acquire():
        if _read_index(final) is not None:
            return final
        if waited == 0.0:
            log.info("waiting for %s (pid %s) to build the bag store %s",
                     lock.owner.get("host"), lock.owner.get("pid"), final)  # fmt: skip
        time.sleep(WAIT_S)
        waited += WAIT_S
    try:
        if _read_index(final) is not None:  # built by the process we waited for
            return final
        if final.exists():  # never a partial build (those are renamed in whole): damaged since
            raise UserError(
                f"bag store '{final}' is damaged (no readable index.json or features.npy); "
                "delete that folder and run again: it is a cache, rebuilt from the feature files."
            )
        for stale in root.glob(f".{name}.*.tmp"):  # left by a killed builder
            shutil.rmtree(stale, ignore_errors=True)
        nbytes = sum(layout.rows.values()) * layout.dim * np.dtype(dtype).itemsize
        _check_disk(root, nbytes)
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
    if _local_rank() == 0:  # once per machine: later ranks would count the first one twice
        check_memory(need, cfg.data.memory_gb)
    if found:
        folder, _, spans = found
        log.info("bag store: %s (reused)", folder)
    else:
        folder = _build(root, sources, layout, dtype)
        index = _read_index(folder)
        assert index is not None
        starts = {r["path"]: (r["start"], r["rows"]) for r in index["files"]}
        built = _spans(files, starts)
        assert built is not None  # built in members order: every bag is contiguous
        spans = built
    first = next(iter(members.values()))[0][1]
    provenance = {k: v for k, v in read_attrs(first).items() if k not in PER_SLIDE_ATTRS}
    return BagStore(folder, spans, provenance)
