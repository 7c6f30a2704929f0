"""Where an `extract` process runs and with how much: GPU, reader workers, batch size, /dev/shm.

Decisions are pure functions of the environment (env vars, visible GPUs, CPU affinity, free
memory) so they are tested with plain dicts; `extract` feeds them the real values.

- GPU: ``cuda:<local rank>`` among the visible GPUs, the local rank from LOCAL_RANK (torchrun,
  Lightning) or SLURM_LOCALID (srun). Under srun without per-task GPU binding every task sees
  every GPU, so the local rank picks one; with binding (or a plain CUDA_VISIBLE_DEVICES per
  process) each sees one, cuda:0.
- Reader workers: the CPUs this process may run on (sched_getaffinity). When that is the whole
  machine, several ranks on the node share it, so it is divided among them; a launcher that
  pinned this rank to its own CPUs has already divided them.
- /dev/shm: reader processes hand tiles over in shared memory; a container's default 64 MB
  ends in a bus error, so the need is checked first and, if short, prefetch and workers shrink,
  and at worst reads move to threads in this process, with a message saying why.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

MAX_READERS = 12
PREFETCH = 4  # items (tile ranges) in flight per reader process
READ_PART_BYTES = 16 << 20  # most tile bytes of one reader-process item (`read_parts`)
SHM_MARGIN = 1.5  # pinned copies, the item being collated, fragmentation
CPU_BATCH = 64
GPU_BATCH_RANGE = (16, 1024)


def local_rank(env: Mapping[str, str]) -> int:
    """This process's rank among the processes of its node (0 without a launcher)."""
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        if env.get(key, "").strip().isdigit():
            return int(env[key])
    return 0


def local_world(env: Mapping[str, str]) -> int:
    """How many processes of this job run on this node (1 without a launcher)."""
    if env.get("LOCAL_WORLD_SIZE", "").strip().isdigit():
        return max(1, int(env["LOCAL_WORLD_SIZE"]))
    for key in ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        m = re.match(r"\s*(\d+)", env.get(key, ""))  # "4", "4(x2)", "2(x3),1"
        if m:
            return max(1, int(m.group(1)))
    return 1


def gpu_index(env: Mapping[str, str], visible: int) -> int:
    """Index of this process's GPU among the ``visible`` ones."""
    if visible <= 1:
        return 0
    return local_rank(env) % visible


def reader_workers(cpus: int, machine_cpus: int, ranks_on_node: int) -> int:
    """Reader processes for one GPU rank: its share of the CPUs, one left for the main process."""
    share = cpus // ranks_on_node if cpus >= machine_cpus else cpus
    return max(0, min(MAX_READERS, share - 1))


@dataclass(frozen=True)
class ShmPlan:
    workers: int
    prefetch: int
    note: str  # why the plan differs from what was asked, "" when it does not


def shm_plan(workers: int, item_bytes: int, shm_free: int | None) -> ShmPlan:
    """Reader processes and prefetch depth that fit in ``shm_free`` bytes of /dev/shm."""
    if workers == 0:
        return ShmPlan(0, PREFETCH, "")
    if shm_free is None:
        return ShmPlan(workers, PREFETCH, "")

    def need(w: int, p: int) -> float:
        return w * p * item_bytes * SHM_MARGIN

    for w in range(workers, 0, -1):
        for p in range(PREFETCH, 0, -1):
            if need(w, p) <= shm_free:
                if (w, p) == (workers, PREFETCH):
                    return ShmPlan(w, p, "")
                return ShmPlan(w, p, (
                    f"/dev/shm has {shm_free / 2**20:.0f} MB free, {workers} reader processes "
                    f"need {need(workers, PREFETCH) / 2**20:.0f} MB: using {w} with prefetch {p} "
                    "(give the container more, e.g. docker --shm-size=8g)"))  # fmt: skip
    return ShmPlan(0, PREFETCH, (
        f"/dev/shm has {shm_free / 2**20:.0f} MB free, one reader process needs "
        f"{need(1, 1) / 2**20:.0f} MB: reading in threads of this process instead "
        "(give the container more, e.g. docker --shm-size=8g)"))  # fmt: skip


def batch_size(
    device: str, free_bytes: int | None = None, per_tile_bytes: int | None = None
) -> int:
    """The batch when none is given: 64 on CPU (larger gains nothing there); on a GPU the largest
    power of two whose activations fill at most half the free memory, within 16..1024."""
    if device == "cpu" or not free_bytes or not per_tile_bytes:
        return CPU_BATCH
    fit = int(free_bytes * 0.5 // per_tile_bytes)
    low, high = GPU_BATCH_RANGE
    if fit < low:
        return max(1, fit)
    return min(high, 1 << (fit.bit_length() - 1))


def read_parts(tiles: int, tile_bytes: int) -> list[tuple[int, int]]:
    """How reader processes split one forward batch of ``tiles``: contiguous ranges of at most
    READ_PART_BYTES whose sizes differ by at most one tile, joined again before the forward.
    A whole GPU batch as one item (1024 tiles of 256 px, 192 MiB) kept a 9-batch slide on 9 of
    12 readers and the first forward waiting for a whole batch's reads: on an H200, splitting
    doubled resnet50's extract rate (benchmarks/extract_gpu.py)."""
    k = math.ceil(tiles / max(1, READ_PART_BYTES // max(1, tile_bytes)))
    return [(tiles * p // k, tiles * (p + 1) // k) for p in range(k)]


def largest_item(batch: int, tile_bytes: int) -> int:
    """Bytes of the largest reader-process item of a run whose tiles take at most ``tile_bytes``
    (a batch, capped at READ_PART_BYTES or one tile): what /dev/shm must hold per item."""
    return min(batch * tile_bytes, max(tile_bytes, READ_PART_BYTES))
