"""How much memory a `fit` needs, checked before anything is loaded.

With the bag store memory-mapped, the features themselves cost page cache, shared by every
rank and evictable: a store larger than RAM still trains, re-reading from disk each epoch (a
warning says so). What cannot be evicted is each rank's private memory: the process itself,
the largest bag as float32 plus its activations and gradients, the store build's largest file,
and pinned staging on a GPU. When that, times the ranks on this machine, exceeds what the
machine (or the job's cgroup, or ``data.memory_gb``) has, the run stops with the numbers.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from melanoma_mil.config import FitConfig
from melanoma_mil.errors import UserError

log = logging.getLogger(__name__)

GB = 1e9
# RssAnon of a `fit` rank on a tiny cohort peaks at ~0.56 GB (benchmarks/fit_memory.py, CPU,
# torch 2.14, lightning 2.6); plus headroom. CUDA adds its context and libraries' heap.
BASE_CPU = 0.7 * GB
BASE_GPU = 2.5 * GB
WORKER = 0.25 * GB  # a DataLoader worker process (forked: mostly shared pages)
PREFETCH = 2  # batches a DataLoader worker keeps ready (torch's prefetch_factor default)
EVAL_BAGS = 8  # bags per validation/test step


@dataclass(frozen=True)
class Need:
    """Bytes a run needs: private per rank (not evictable), store page cache, /dev/shm."""

    ranks: int
    per_rank: int
    store: int
    shm: int
    largest_bag: int  # tiles

    @property
    def private(self) -> int:
        return self.ranks * self.per_rank


def estimate(
    *,
    ranks: int,
    largest_bag: int,
    dim: int,
    itemsize: int,
    store_rows: int,
    hidden: int = 512,
    attention: int = 256,
    max_instances: int | None = None,
    num_workers: int = 0,
    gpu: bool = False,
    build_elements: int = 0,
    members: int = 1,
) -> Need:
    """Memory of a run with the built-in MIL heads; pure arithmetic, no probing.

    Per training step the bag becomes float32 (N x D x 4) and each instance keeps about
    D + 4 hidden + 9 attention floats of activations per ensemble member (`model.members`, all
    kept until the step's backward), doubled for gradients; evaluation keeps one member's at a
    time. A GPU keeps activations on the device; the host holds pinned copies of a few bags.
    """
    n_train = min(largest_bag, max_instances or largest_bag)
    per_instance = dim + 4 * hidden + 9 * attention
    if gpu:
        step = (PREFETCH + EVAL_BAGS) * largest_bag * dim * itemsize  # pinned staging
        base = BASE_GPU
    else:
        train = n_train * (dim + 2 * members * per_instance) * 4
        evaluate = largest_bag * (dim + per_instance) * 4
        stats = 2 * largest_bag * dim * 8  # training-fold statistics in float64
        step, base = max(train, evaluate, stats), BASE_CPU
    build = build_elements * (4 + itemsize)  # a file read as float32, cast into the store
    per_rank = int(base + max(step, build) + num_workers * WORKER)
    shm = ranks * num_workers * PREFETCH * n_train * dim * itemsize
    return Need(ranks, per_rank, store_rows * dim * itemsize, shm, largest_bag)


def _ranks(cfg: FitConfig) -> int:
    return cfg.trainer.devices


def on_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def estimate_for(
    cfg: FitConfig,
    bag_rows: list[int],
    dim: int,
    itemsize: int,
    build_elements: int = 0,
    members: int = 1,
) -> Need:
    """`estimate` for a fit config, the cohort's bag sizes (tiles per bag) and the most
    ensemble members a fold trains (resolved by `training.selection`, above this module)."""
    hidden, attention = cfg.model.head_widths(dim)
    return estimate(
        ranks=_ranks(cfg),
        largest_bag=max(bag_rows),
        dim=dim,
        itemsize=itemsize,
        store_rows=sum(bag_rows),
        hidden=hidden,
        attention=attention,
        max_instances=cfg.data.max_instances,
        num_workers=cfg.data.num_workers,
        gpu=on_gpu(cfg.trainer.accelerator),
        build_elements=build_elements,
        members=members,
    )


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_available() -> int | None:
    """Limit minus non-file usage of this process's cgroup (v2, then v1), or None."""
    v2 = Path("/sys/fs/cgroup")
    limit, used = _read_int(v2 / "memory.max"), _read_int(v2 / "memory.current")
    stat = v2 / "memory.stat"
    if limit is None:
        v1 = v2 / "memory"
        limit = _read_int(v1 / "memory.limit_in_bytes")
        used = _read_int(v1 / "memory.usage_in_bytes")
        stat = v1 / "memory.stat"
    if limit is None or used is None or limit >= 1 << 60:
        return None
    cache = 0
    try:
        for line in stat.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("file", "total_cache"):
                cache = int(value)
    except (OSError, ValueError):
        pass
    return max(0, limit - (used - cache))


def available_memory() -> tuple[int, str]:
    """(bytes, where from): MemAvailable, or the cgroup's headroom when that is smaller."""
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                mem = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    group = _cgroup_available()
    if group is not None and (mem is None or group < mem):
        return group, "the job's cgroup limit"
    if mem is None:
        return 1 << 62, "unknown (no /proc/meminfo)"
    return mem, "MemAvailable"


def shm_free() -> int | None:
    shm = Path("/dev/shm")
    return shutil.disk_usage(shm).free if shm.is_dir() else None


def verdict(
    need: Need, available: int, source: str, shm: int | None = None
) -> tuple[str | None, str | None]:
    """(error, warning) for ``need`` against ``available`` bytes; pure, so testable."""
    fixes = "fewer trainer.devices, data.max_instances=N (caps training bags)"
    if need.private > available:
        return (
            f"this run needs ~{need.private / GB:.1f} GB of private memory ({need.ranks} "
            f"rank(s) x {need.per_rank / GB:.1f} GB; the largest bag has {need.largest_bag} "
            f"tiles) but {available / GB:.1f} GB is available ({source}): use {fixes}, or a "
            "machine or job with more memory."
        ), None
    if shm is not None and need.shm > shm:
        return (
            f"DataLoader workers need ~{need.shm / GB:.1f} GB of /dev/shm but it has "
            f"{shm / GB:.1f} GB free: use data.num_workers=0 (bags are memory-mapped; "
            "workers gain little) or enlarge /dev/shm (docker --shm-size)."
        ), None
    if need.private + need.store > available:
        return None, (
            f"the bag store ({need.store / GB:.1f} GB) and the run's private memory "
            f"({need.private / GB:.1f} GB) exceed the {available / GB:.1f} GB available "
            f"({source}): epochs will re-read the store from disk. data.dtype=float16 halves "
            "a float32 store; a faster disk for data.store_dir helps."
        )
    return None, None


def check_memory(need: Need, budget_gb: float | None = None) -> None:
    """Raise UserError when ``need`` cannot fit; log a warning when the store will not stay
    cached. ``budget_gb`` (data.memory_gb) caps what counts as available."""
    available, source = available_memory()
    if budget_gb is not None and budget_gb * GB < available:
        available, source = int(budget_gb * GB), "data.memory_gb"
    error, warning = verdict(need, available, source, shm_free() if need.shm else None)
    if error:
        raise UserError(error)
    if warning:
        log.warning(warning)
    log.info(
        "memory: ~%.1f GB private (%d rank(s)), store %.1f GB shared page cache, %.1f GB "
        "available (%s)",
        need.private / GB,
        need.ranks,
        need.store / GB,
        available / GB,
        source,
    )
