"""`extract`: encode every tile of every slide once into ``<output_dir>/<cache_key>/<id>.h5``.

Resumable and shareable: finished slides are validated and skipped, each slide is claimed with a
lock file, and ranks (torchrun / Lightning / SLURM env) take every world_size-th slide. With a
GPU, DataLoader reader processes (one OpenSlide handle each, started once per run) overlap reads
with the forward pass; on CPU, where both compete for the same cores, reader threads fill each
batch between forward passes instead (measured faster). A slide's h5 appears only once
complete, so a crash or kill never leaves a partial bag.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from melanoma_mil import __version__
from melanoma_mil.config import ExtractConfig, check
from melanoma_mil.encoders import Encoder, build_encoder, resolve_precision
from melanoma_mil.errors import UserError
from melanoma_mil.features.cache import (
    SlideLock,
    cache_key,
    check_cached,
    clean_temp_files,
    slide_identity,
)
from melanoma_mil.features.data import (
    Job,
    ReaderProcesses,
    RunBatches,
    SlideBatches,
    coords_files,
    plan_jobs,
)
from melanoma_mil.io import atomic_h5, write_text
from melanoma_mil.progress import progress
from melanoma_mil.tiling.coords import TileGrid, read_coords

log = logging.getLogger(__name__)

_STORE = {"float16": np.float16, "float32": np.float32}
CSV_COLUMNS = ["slide_id", "path", "status", "n_tiles", "reason", "seconds", "tiles_per_s"]


@dataclass
class Ctx:
    """Everything a slide needs that is shared across slides."""

    cfg: ExtractConfig
    encoder: Encoder
    precision: str
    device: torch.device
    out_root: Path
    workers: int  # DataLoader reader processes; 0: in-process reader threads
    pool: ThreadPoolExecutor | None = None  # the in-process reader threads (workers == 0)
    readers: int = 1  # size of ``pool``
    processes: ReaderProcesses | None = None  # the run's reader processes (workers > 0)


def dist_rank() -> tuple[int, int]:
    """(rank, world_size) from torchrun / Lightning (RANK, WORLD_SIZE) or SLURM env vars."""
    for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if r in os.environ and w in os.environ:
            rank, world = int(os.environ[r]), int(os.environ[w])
            if not 0 <= rank < world:
                raise UserError(f"{r}={rank} is outside 0..{w}-1={world - 1}; check the launcher.")
            return rank, world
    return 0, 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device '{name}' unknown; use auto, cpu, cuda or cuda:N.") from None
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


def _attrs(ctx: Ctx, grid: TileGrid, key: str) -> dict[str, Any]:
    return {
        **grid.attrs(),
        **ctx.encoder.provenance,
        "precision": ctx.precision,
        "cache_key": key,
        "package_version": __version__,
        "feature_dtype": ctx.cfg.dtype,
    }


def _encode_slide(
    ctx: Ctx,
    index: int,
    job: Job,
    grid: TileGrid,
    out: Path,
    attrs: dict[str, Any],
    lock: SlideLock,
    bar: tqdm,
) -> None:
    """Stream the slide's features into a temp h5 that is renamed into place when complete."""
    assert job.slide_path is not None
    cfg, enc = ctx.cfg, ctx.encoder
    data = SlideBatches(job.slide_path, grid, cfg.batch_size, direct=cfg.reader == "auto")
    if ctx.processes is not None:  # slide ``index`` of the run's persistent reader processes
        loader: Iterable[torch.Tensor] = ctx.processes.batches(index, len(data))
    else:  # read each batch with all cores, then compute with all cores: no contention
        loader = (data.read(i, ctx.pool, ctx.readers) for i in range(len(data)))
    n = len(grid.coords)
    try:
        with atomic_h5(out) as f:
            feats = f.create_dataset("features", (n, enc.dim), dtype=_STORE[cfg.dtype])
            f.create_dataset("coords", data=grid.coords)
            for k, v in grid.attrs().items():
                f["coords"].attrs[k] = v
            for k, v in attrs.items():
                f.attrs[k] = v
            start = 0
            for tiles in loader:
                x = tiles.permute(0, 3, 1, 2)  # NHWC storage = channels_last, no copy
                y = enc.encode(x, grid.tile_size, ctx.precision)
                feats[start : start + len(y)] = y.cpu().numpy().astype(_STORE[cfg.dtype])
                start += len(y)
                bar.update(len(y))
                lock.heartbeat()
            if start != n:
                raise RuntimeError(f"read {start} tiles, expected {n}")
    finally:
        data.close()


def _one_slide(ctx: Ctx, index: int, job: Job, grid: TileGrid | str, bar: tqdm) -> dict[str, Any]:
    row: dict[str, Any] = {
        "slide_id": job.slide_id,
        "path": str(job.slide_path or ""),
        "status": "failed",
        "n_tiles": 0,
        "reason": job.reason,
    }
    if isinstance(grid, str):  # the coords file could not be read
        row["reason"] = grid
        return row
    n = len(grid.coords)
    row["n_tiles"] = n
    if job.slide_path is None:
        return row
    if n == 0:
        row.update(status="empty", reason="no tiles in the coords file")
        return row
    key = cache_key(slide_identity(ctx.encoder.provenance, grid))
    out = ctx.out_root / key / f"{job.slide_id}.h5"
    attrs = _attrs(ctx, grid, key)
    row["cache_key"] = key
    if _finished(ctx, out, attrs, grid, row):
        return row
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = SlideLock(out.with_name(f"{job.slide_id}.lock"))
    if not lock.acquire():
        row.update(status="locked", reason=f"in progress elsewhere: {lock.owner} ({lock.path})")
        return row
    t0 = time.perf_counter()
    try:
        if _finished(ctx, out, attrs, grid, row):  # another process completed it meanwhile
            return row
        clean_temp_files(out.parent, job.slide_id)
        _encode_slide(ctx, index, job, grid, out, attrs, lock, bar)
        dt = time.perf_counter() - t0
        row.update(status="ok", reason="", seconds=round(dt, 2), tiles_per_s=round(n / dt, 1))
    except Exception as e:  # one bad slide must not stop the cohort
        last = (str(e).strip().splitlines() or [""])[-1]  # worker errors end with the cause
        row["reason"] = (last if isinstance(e, UserError) else f"{type(e).__name__}: {last}")[:300]
        log.error("slide %s failed: %s", job.slide_id, row["reason"])
        if ctx.processes is not None:  # a worker may have died with the slide
            ctx.processes.close()
    finally:
        lock.release()
    return row


def _finished(
    ctx: Ctx, out: Path, attrs: dict[str, Any], grid: TileGrid, row: dict[str, Any]
) -> bool:
    """True (row filled in) when ``out`` is already there: a valid bag, or one we must not touch."""
    if not out.exists() or ctx.cfg.overwrite:
        return False
    why = check_cached(out, attrs, grid.coords)
    if why is None:
        row.update(status="skipped", reason="already extracted")
    else:
        row["reason"] = f"{out} exists but {why}; pass overwrite=true to recompute it"
    return True


def _read_grid(job: Job) -> TileGrid | str:
    try:
        return read_coords(job.coords_path)
    except UserError as e:
        return str(e)


def run_extract(cfg: ExtractConfig) -> int:
    """Extract features for every coords file under ``cfg.coords_dir``; 1 if any slide failed."""
    check(cfg)  # also configs built in code (predict, heatmap, demo)
    coords = coords_files(cfg.coords_dir)
    rank, world = dist_rank()
    recorded = {}
    if not (cfg.slides_dir or cfg.manifest):
        for sid, p in coords.items():
            with h5py.File(p, "r") as f:
                recorded[sid] = str(f.attrs.get("slide_path", ""))
    jobs = plan_jobs(coords, cfg.slides_dir, cfg.manifest, list(cfg.extensions), recorded)
    mine = jobs[rank::world]
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()
    encoder = build_encoder(cfg.encoder, device=device)
    precision = resolve_precision(cfg.precision, encoder.spec, device)
    workers = cfg.num_workers
    if workers is None:
        workers = 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)
    ctx = Ctx(cfg, encoder, precision, device, Path(cfg.output_dir), workers)
    log.info(
        "extract: %d slides (rank %d/%d takes %d), encoder %s on %s (%s), batch %d, %s",
        len(jobs), rank, world, len(mine), encoder.name, device, precision, cfg.batch_size,
        f"{workers} reader processes" if workers else "in-process readers",
    )  # fmt: skip
    grids = [_read_grid(job) for job in mine]
    total = sum(len(g.coords) for g in grids if not isinstance(g, str))
    rows = []
    ctx.readers = max(1, torch.get_num_threads())
    if workers:
        slides = [(job.slide_path or Path(), job.coords_path) for job in mine]
        data = RunBatches(slides, cfg.batch_size, direct=cfg.reader == "auto")
        ctx.processes = ReaderProcesses(data, workers, pin_memory=device.type == "cuda")
    try:
        with (
            ThreadPoolExecutor(ctx.readers) as ctx.pool,
            progress(
                total=total, unit="tile", desc=f"extract {encoder.name}", mininterval=1.0
            ) as bar,
        ):
            for i, (job, grid) in enumerate(zip(mine, grids, strict=True)):
                before = bar.n
                row = _one_slide(ctx, i, job, grid, bar)
                rows.append(row)
                if row["status"] != "ok" and not isinstance(grid, str):
                    # tiles not computed here leave the total, so tiles/s and the ETA stay honest
                    bar.total -= len(grid.coords) - (bar.n - before)
                    bar.refresh()
                bar.set_postfix_str(f"slides {i + 1}/{len(mine)}")
    finally:
        if ctx.processes is not None:
            ctx.processes.close()
    return _report(ctx, rows, rank, world)


def _report(ctx: Ctx, rows: list[dict[str, Any]], rank: int, world: int) -> int:
    """extract.csv (extract_rank<r>.csv under several ranks) in each cache folder + a summary."""
    df = pd.DataFrame(rows)
    for col in CSV_COLUMNS:
        if col not in df:
            df[col] = np.nan
    name = "extract.csv" if world == 1 else f"extract_rank{rank}.csv"
    keys = sorted(df["cache_key"].dropna().unique()) if "cache_key" in df else []
    for key in keys:
        sub = df[(df["cache_key"] == key) | df["cache_key"].isna()]
        write_text(ctx.out_root / key / name, sub[CSV_COLUMNS].to_csv(index=False))
    if not keys:
        write_text(ctx.out_root / name, df[CSV_COLUMNS].to_csv(index=False))
    counts = df["status"].value_counts().to_dict()
    where = ", ".join(str(ctx.out_root / k) for k in keys) or str(ctx.out_root)
    log.info("extract done: %s -> %s", counts, where)
    failed = df[df["status"] == "failed"]
    for _, r in failed.iterrows():
        log.error("  failed %s: %s", r["slide_id"], r["reason"])
    return 1 if len(failed) else 0
