"""The machine an `extract` process runs on, measured and handed to `features.placement`'s pure
decisions: the device asked for, the GPU memory one tile's forward takes, the CPUs this process
may use, the free /dev/shm; and glibc told to keep the CPU forward's freed memory."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
from pathlib import Path

import torch

from melanoma_mil.config import ExtractConfig
from melanoma_mil.encoders import Encoder
from melanoma_mil.errors import UserError
from melanoma_mil.features import placement

log = logging.getLogger(__name__)

SHM = Path("/dev/shm")  # where reader processes hand tiles over (torch's shared memory)


def resolve_device(name: str) -> torch.device:
    """``auto``: this rank's GPU (`placement.gpu_index`), else the CPU."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", placement.gpu_index(os.environ, torch.cuda.device_count()))
    try:
        device: torch.device | None = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # mps, xla: torch knows, we do not
        raise UserError(f"device '{name}' unknown; use auto, cpu, cuda or cuda:N.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available; use device=cpu.")
    return device


def keep_freed_memory() -> bool:
    """Make glibc keep freed large blocks in the heap instead of unmapping them.

    A CPU forward allocates hundreds of MB of activations per batch; by default glibc maps and
    unmaps each, so every batch page-faults them in again (30-45% of CPU time, measured with
    ResNet18/50 on a 2-core Xeon). Reusing the heap's pages removes that. No-op off glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30) == 1 and mallopt(m_trim_threshold, 1 << 30) == 1)


def _probe_tile_bytes(encoder: Encoder, tile: int, precision: str) -> int:
    """Peak GPU memory per tile of a forward (measured on 8 blank tiles)."""
    device = encoder.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    encoder.encode(torch.zeros(8, 3, tile, tile, dtype=torch.uint8, device=device), tile, precision)
    torch.cuda.synchronize(device)
    return max(1, (torch.cuda.max_memory_allocated(device) - base) // 8)


def choose_batch(cfg: ExtractConfig, encoder: Encoder, precision: str, tile: int) -> int:
    if cfg.batch_size is not None:
        return cfg.batch_size
    device = encoder.device
    if device.type != "cuda":
        return placement.batch_size("cpu")
    free = torch.cuda.mem_get_info(device)[0]
    return placement.batch_size("cuda", free, _probe_tile_bytes(encoder, tile, precision))


def choose_workers(cfg: ExtractConfig, device: torch.device, item_bytes: int) -> placement.ShmPlan:
    """Reader processes: asked for, or this rank's share of the CPUs on a GPU; then fitted to
    the free /dev/shm (fewer, or threads instead), with the reason logged."""
    workers = cfg.num_workers
    if workers is None:
        if device.type == "cpu":
            return placement.shm_plan(0, item_bytes, None)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        workers = placement.reader_workers(
            cpus, os.cpu_count() or cpus, placement.local_world(os.environ)
        )
    try:
        free: int | None = shutil.disk_usage(SHM).free
    except OSError:
        free = None
    plan = placement.shm_plan(workers, item_bytes, free)
    if plan.note:
        log.warning("extract: %s", plan.note)
    return plan
