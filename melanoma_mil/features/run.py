"""`extract`: encode every tile of every slide once into ``<output_dir>/<cache_key>/<id>.h5``.

Resumable and shareable by any number of processes on any hosts: each claims the next slide
(`features.queue`), a dead process's slide is taken over, and every process ends with the whole
cohort's table (``extract.csv`` in each cache folder), exiting 0 only when every slide is done
(or empty: its coords hold no tile, as `tile` reported).
Placement (GPU, reader workers, batch size, /dev/shm) is decided by `features.placement` from
what `features.hardware` measures; the closing table is `features.table`'s. The encoding loop
(`features.pipeline`) overlaps reads, forward passes and writes. A slide's h5 appears only once
complete, so a crash, a kill or a full disk never leaves a partial bag.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from melanoma_mil import __version__
from melanoma_mil.config import ExtractConfig, check
from melanoma_mil.encoders import (
    Encoder,
    build_encoder,
    encoder_identity,
    get_spec,
    resolve_precision,
)
from melanoma_mil.errors import UserError
from melanoma_mil.features import placement
from melanoma_mil.features.cache import cache_key, check_cached, slide_identity
from melanoma_mil.features.data import (
    Job,
    ReaderProcesses,
    RunBatches,
    coords_files,
    given_slides,
    plan_jobs,
)
from melanoma_mil.features.folder import check_precision, end_rebuild, folder_precision
from melanoma_mil.features.hardware import (
    choose_batch,
    choose_workers,
    keep_freed_memory,
    resolve_device,
)
from melanoma_mil.features.pipeline import Engine, Writer, failure
from melanoma_mil.features.queue import SlideQueue, SlideWork, write_record
from melanoma_mil.features.table import DONE, report
from melanoma_mil.ids import check_spellings, held_ids, id_path, rename_or_move
from melanoma_mil.io import h5_bytes, write_bytes
from melanoma_mil.outdir import claim_shared, refuse_in_the_way
from melanoma_mil.progress import progress
from melanoma_mil.tiling.coords import TileGrid, read_coords
from melanoma_mil.workshare import disk_full, disk_full_reason

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What every slide of the run shares."""

    cfg: ExtractConfig
    provenance: dict[str, Any]  # the encoder's: its `encoder_identity` until it is built
    precision: str
    out_root: Path

    @property
    def identity_source(self) -> dict[str, Any]:
        """The encoder's provenance plus the read mode, when it changes pixels (reader=fast)."""
        fast = {"read_mode": "fast"} if self.cfg.reader == "fast" else {}
        return {**self.provenance, **fast}

    def attrs(self, grid: TileGrid, key: str) -> dict[str, Any]:
        return {
            **grid.attrs(),
            **self.identity_source,
            "precision": self.precision,
            "precision_requested": self.cfg.precision,  # auto: reuse any precision's files
            "cache_key": key,
            "package_version": __version__,
            "feature_dtype": self.cfg.dtype,
        }


def write_bag(work: SlideWork) -> None:
    """The slide's h5 (features, coords, provenance), written in one go once complete."""

    def build(f: h5py.File) -> None:
        f.create_dataset("features", data=work.feats)
        f.create_dataset("coords", data=work.grid.coords)
        for k, v in work.grid.attrs().items():
            f["coords"].attrs[k] = v
        for k, v in {**work.attrs, "reader": work.reader}.items():
            f.attrs[k] = v

    write_bytes(work.out, h5_bytes(build))


def _finisher(queue: SlideQueue) -> Callable[[SlideWork, str], str]:
    def finish(work: SlideWork, error: str) -> str:
        """Write the slide (or record why not), release its claim, report it; returns why the
        run must stop ("" to go on)."""
        fatal = ""
        if not error and work.filled != work.n:
            error = f"read {work.filled} tiles, expected {work.n}"
        if not error:
            error = _non_finite(work)
        if not error:
            try:
                write_bag(work)
            except OSError as e:
                error = f"cannot write {work.out}: {e.strerror or e}"
                fatal = disk_full_reason(e, work.out.parent) if disk_full(e) else ""
            except Exception as e:  # e.g. MemoryError building the file: this slide only
                error = failure(e)
        work.feats = None
        dt = time.perf_counter() - work.start
        row = {"n_tiles": work.n, "seconds": round(dt, 2), "tiles_per_s": round(work.n / dt, 1),
               "reader": work.reader}  # fmt: skip
        status = "failed" if error else "ok"
        if error:
            log.error("slide %s failed: %s", work.slide_id, error)
        write_record(work.out, {"status": status, "reason": error, **row})
        work.claim.release()
        queue.row(work.index, status, error, cache_key=work.attrs["cache_key"], **row)
        return fatal

    return finish


def _non_finite(work: SlideWork) -> str:
    """Why the slide's features must not be stored (NaN or inf), or ""."""
    assert work.feats is not None
    bad = int((~np.isfinite(work.feats)).any(axis=1).sum())
    if not bad:
        return ""
    precision, dtype = work.attrs["precision"], work.attrs["feature_dtype"]
    if not work.computed_non_finite:  # finite output, beyond what the stored dtype holds
        why, fix = f"overflowed dtype {dtype} when stored", "re-run with dtype=float32"
    elif precision != "fp32":
        why, fix = f"overflowed at precision {precision}", "re-run with precision=fp32"
    else:
        why, fix = "gave NaN or inf at precision fp32", "check encoder.weights"
    head = f"{bad} of {work.n} tiles gave non-finite features (NaN or inf)"
    return f"{head}: the encoder {why}; {fix}"


def _plan(cfg: ExtractConfig) -> tuple[list[Job], list[TileGrid | str], dict[str, Path]]:
    """The slides to encode and their tile grids (an unreadable coords file: why, as text), and
    the slides of slides_dir / manifest that have no coords file (reported, never dropped)."""
    coords = coords_files(cfg.coords_dir)
    found = given_slides(cfg.slides_dir, cfg.manifest, list(cfg.extensions), cfg.output_dir, coords)
    read: dict[str, TileGrid | str] = {}
    for sid, p in coords.items():
        try:
            read[sid] = read_coords(p)
        except UserError as e:  # that slide fails; the others go on
            read[sid] = str(e)
    recorded = {sid: g.slide_path for sid, g in read.items() if isinstance(g, TileGrid)}
    jobs = plan_jobs(coords, found, recorded)
    untiled = {sid: p for sid, p in found.items() if sid not in coords}
    return jobs, [read[job.slide_id] for job in jobs], untiled


def _encoder(cfg: ExtractConfig, device: torch.device) -> Encoder:
    """The encoder, built (weights loaded, maybe downloaded) once the inputs and folders are
    checked, and before the output folder is claimed: a bad weights file leaves nothing behind."""
    if device.type == "cpu":
        keep_freed_memory()
    return build_encoder(cfg.encoder, device=device)


def _written(
    run: Run, jobs: list[Job], grids: list[TileGrid | str], keyed: dict[str, str]
) -> set[str]:
    """The cache folders (``keyed``: slide -> key) this call writes into: those with a slide
    left to encode, all with overwrite. A complete read-only cache (a lab's shared one) is only
    read; a slide with no tiles or no slide file is never encoded. A torn bag is encoded again
    (`SlideQueue`): looked for only in a folder that cannot be written, as it opens each bag."""
    if run.cfg.overwrite:
        return set(keyed.values())
    left: set[str] = set()
    for job, grid in zip(jobs, grids, strict=True):
        if not isinstance(grid, TileGrid) or not len(grid.coords) or job.slide_path is None:
            continue
        key = keyed[job.slide_id]
        bag = id_path(run.out_root / key, job.slide_id, ".h5")
        if not bag.is_file() or (
            not os.access(bag.parent, os.W_OK)
            and (bad := check_cached(bag, run.attrs(grid, key), grid.coords)) is not None
            and bad.worthless
        ):
            left.add(key)
    return left


def _refuse_overwriting_twins(cfg: ExtractConfig, out: Path, keyed: dict[str, str]) -> None:
    """Refuse a slide whose bag would be another's already in its cache folder, where the file
    system folds names (`s1` encoded into a folder holding `S1.h5`), before any encoding."""
    source = f"coords_dir '{cfg.coords_dir}'"  # its file names are the slide ids
    fix = rename_or_move("coords files")
    for key in sorted(set(keyed.values())):
        ids = [sid for sid, k in keyed.items() if k == key]
        check_spellings(ids, source, cfg.output_dir, fix, held=held_ids(out / key, ".h5"))


def _read_only(folders: list[Path], left: set[str]) -> set[Path]:
    """The cache folders this call only reads (no slide left to encode) and cannot write, as a
    lab's finished shared cache: nothing is written there, so they are used as they are."""
    return {f for f in folders if f.name not in left and f.is_dir() and not os.access(f, os.W_OK)}


def _checked_folders(
    run: Run, jobs: list[Job], grids: list[TileGrid | str], device: torch.device
) -> tuple[list[Path], set[Path]]:
    """The run's cache folders and those it only reads (`_read_only`), once every refusal that
    needs no encoder is made: folders in the way or not writable, another command's
    output_dir, another precision than the folders' or their unfinished rebuild's (checked,
    nothing recorded). The encoder is built after this: loading, maybe downloading, a
    foundation model takes minutes."""
    cfg = run.cfg
    keyed = {
        job.slide_id: cache_key(slide_identity(run.identity_source, g))
        for job, g in zip(jobs, grids, strict=True)
        if isinstance(g, TileGrid)
    }
    keys = sorted(set(keyed.values()))
    _refuse_overwriting_twins(cfg, run.out_root, keyed)
    left = _written(run, jobs, grids, keyed)
    refuse_in_the_way(cfg.output_dir, "extract", keys, sorted(left))
    claim_shared(cfg.output_dir, "extract", write=False)
    folders = [run.out_root / key for key in keys]
    read_only = _read_only(folders, left)
    check_precision(folders, cfg.precision, run.precision, cfg.overwrite, device, read_only)
    return folders, read_only


def run_extract(cfg: ExtractConfig) -> int:
    """Extract features for every coords file under ``cfg.coords_dir``; 1 unless every slide
    is done or empty (failed, or still held by another process: see the table)."""
    check(cfg)  # also configs built in code (predict, heatmap, demo)
    jobs, grids, untiled = _plan(cfg)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, get_spec(cfg.encoder.name), device)
    run = Run(cfg, encoder_identity(cfg.encoder), precision, Path(cfg.output_dir))
    folders, read_only = _checked_folders(run, jobs, grids, device)
    encoder = _encoder(cfg, device)
    run.provenance = encoder.provenance
    claim_shared(cfg.output_dir, "extract")
    precision, rebuilds = folder_precision(
        folders, cfg.precision, precision, cfg.overwrite, device, read_only
    )
    run.precision = precision
    tile = max((g.tile_size for g in grids if isinstance(g, TileGrid)), default=224)
    if encoder.low_precision_weights(precision, tile):
        log.info("extract: %s matmul weights stored in %s", encoder.name, precision)
    batch = choose_batch(cfg, encoder, precision, tile)
    read = max((g.read_size for g in grids if isinstance(g, TileGrid)), default=tile)
    plan = choose_workers(cfg, device, placement.largest_item(batch, read * read * 3))
    workers = plan.workers
    queue = SlideQueue(jobs, grids, run.out_root, run.identity_source, run.attrs, rebuilds,
                       cfg.stale_after_s)  # fmt: skip
    log.info(
        "extract: %d slides, encoder %s on %s (%s), batch %d, %s", len(jobs), encoder.name,
        device, precision, batch,
        f"{workers} reader processes" if workers else "in-process readers",
    )  # fmt: skip
    total = sum(len(g.coords) for g in grids if isinstance(g, TileGrid))
    writer = Writer(_finisher(queue), threaded=cfg.async_write)
    processes = None
    if workers:
        slides = [(job.slide_path or Path(), job.coords_path) for job in jobs]
        processes = ReaderProcesses(
            RunBatches(slides, cfg.reader), workers, pin_memory=device.type == "cuda",
            prefetch=plan.prefetch,
        )  # fmt: skip
    threads = max(1, torch.get_num_threads())
    try:
        with (
            ThreadPoolExecutor(threads) as pool,
            progress(
                total=total, unit="tile", desc=f"extract {encoder.name}", mininterval=1.0
            ) as bar,  # fmt: skip
        ):
            engine = Engine(encoder, precision, batch, cfg.dtype, cfg.reader, queue, writer, bar,
                            pool, threads, processes)  # fmt: skip
            engine.run()
            writer.close()
    finally:
        writer.close()
        if processes is not None:
            processes.close()
    queue.tidy(DONE)
    code = report(encoder.name, run.out_root, queue, jobs, untiled, read_only)
    for key, started in rebuilds.items() if code == 0 else ():  # every slide rebuilt
        end_rebuild(run.out_root / key, started)
    return code
