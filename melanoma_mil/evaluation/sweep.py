"""`sweep SWEEP.yaml`: run a W&B sweep file locally, each run a `fit` in its own subfolder.

W&B's own sweep engine (the `sweeps` package) plans grid, random and bayes runs without a
server, so a sweep file behaves the same here and under `wandb agent`. Locally only `method`,
`metric` and `parameters` are used; fixed settings come from this command line (`--config`,
key=value), as for `fit` — the file's `command` is what `wandb agent` runs.

All runs share one set of splits (the first run's, or cv.splits_file), so the final comparison
is paired. A ledger (`sweep.json`) makes an interrupted sweep resume where it stopped: with the
same fixed settings only, retrying failed runs, and drawing what one invocation would have.
Several `sweep` processes into one output_dir (a SLURM array) share its runs (`sweep_ledger`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from melanoma_mil import config as C
from melanoma_mil.errors import OtherRun, UserError
from melanoma_mil.evaluation.sweep_ledger import (
    LEDGER,
    Ledger,
    note_replaced,
    orphaned,
    paired_splits,
    read_ledger,
    recheck_finished,
    run_lock,
    take_unfinished,
    takeover_overwrites,
    unpaired,
)
from melanoma_mil.evaluation.sweep_plan import (
    check_metric,
    fit_config,
    listed_values,
    load_sweep,
    overrides,
    plain,
    suggest,
)
from melanoma_mil.evaluation.sweep_report import RESULTS, own_comparison, report
from melanoma_mil.io import locked_writes, remove_temp_files, write_text
from melanoma_mil.locks import Lock, shared_lock, try_lock
from melanoma_mil.outdir import claim_shared, output_folder, read_marker
from melanoma_mil.rundir import load_run, settings
from melanoma_mil.tracking.loggers import check_logger, summary_metrics
from melanoma_mil.workshare import disk_full

log = logging.getLogger(__name__)
LOCK = ".sweep.lock"  # held shared by every `sweep` process working in a folder (`_join`)
REPORT_LOCK = ".sweep-report.lock"  # held while one of them checks for and writes the report
SESSION = ".sweep-session"  # the invocation the processes sweeping now belong to (`_join`)

# Inputs fit identifies by content (rundir NOT_RESULTS), which a sweep must not change between
# runs: its later runs would see other data than its earlier ones.
_SWEEP_INPUTS = (
    "data.features_dir",
    "data.labels_csv",
    "data.label_column",
    "data.on_missing",
    "cv.splits_file",
)
_PATHS = ("data.features_dir", "data.labels_csv", "cv.splits_file")
# what fit's check_parallel reads (cv.* cannot be swept)
_PARALLEL_KEYS = (
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.accumulate_grad_batches",
)


def run_name(index: int, params: dict[str, Any]) -> str:
    """A readable, filesystem-safe folder name: `003_features_dir-uni_seed-1`."""
    parts = []
    for key, value in params.items():
        if isinstance(value, float):
            text = f"{value:.3g}"
        elif isinstance(value, str) and ("/" in value or "\\" in value):
            text = Path(value).name
        else:
            text = str(value)
        parts.append(f"{key.split('.')[-1]}-{text}")
    name = re.sub(r"[^A-Za-z0-9_.=-]+", "-", "_".join(parts))[:80]
    return f"{index:03d}_{name}"


def fixed_settings(cfg: C.SweepConfig, spec: dict[str, Any]) -> dict[str, Any]:
    """What every run shares and that makes results (fit's `settings`, the data read, paths
    resolved), as JSON values: a sweep resumes only with the same, or it would compare runs
    that differ in more than their parameters."""
    fit = fit_config(cfg, {}, Path(cfg.output_dir))
    node = OmegaConf.structured(fit)
    values = settings(fit) | {key: OmegaConf.select(node, key) for key in _SWEEP_INPUTS}
    for key in _PATHS:
        if values[key]:
            values[key] = str(Path(values[key]).resolve())
    fixed = {k: v for k, v in values.items() if k not in spec["parameters"]}
    return dict(json.loads(json.dumps(fixed, default=str)))  # as read back from sweep.json


def _execute(fit: C.FitConfig, splits_sha256: str | None) -> dict[str, Any]:
    """Run one fit in-process; return its ledger entry (metrics, splits hash checked)."""
    from melanoma_mil.training.cv import run_fit

    code = run_fit(fit)
    if code != 0:
        raise RuntimeError(f"fit exited with code {code}")
    run = load_run(fit.output_dir)
    summary, digest = run.summary, run.splits_sha256
    if splits_sha256 is not None and digest != splits_sha256:
        raise UserError(
            f"{fit.output_dir} used splits {str(digest)[:12]}, "
            f"not the sweep's {splits_sha256[:12]}: runs would not be paired."
        )
    return {"state": "finished", "metrics": summary_metrics(summary), "splits_sha256": digest}


def _check_inputs(cfg: C.SweepConfig, spec: dict[str, Any]) -> None:
    """fit's checks of its inputs, on the settings every run shares: a bad one stops the sweep
    now (exit 2) rather than failing each run. Keys a parameter sets are left to each run
    (feature folders listed are looked at: `_check_feature_folders`)."""
    from melanoma_mil.data.cohort import find_features, map_labels, read_labels
    from melanoma_mil.evaluation.hooks import check_inputs
    from melanoma_mil.training.checks import check_parallel

    swept = set(spec["parameters"])
    fit = fit_config(cfg, {}, Path(cfg.output_dir))
    # each check is skipped only when a key it reads is swept (not any key of its section)
    ddp = fit.trainer.devices * fit.trainer.num_nodes > 1
    if ddp and not swept & {"trainer.devices", "trainer.num_nodes"}:
        raise UserError(
            "sweep runs its fits one after another in this process, which DDP "
            "(trainer.devices x trainer.num_nodes > 1) cannot do: run each sweep run as a "
            "process of its own with `wandb agent` (sweeps/README.md), or keep one device "
            "per fit (cv.run_folds trains folds in parallel)."
        )
    if not swept & set(_PARALLEL_KEYS):
        check_parallel(fit)
    if not swept & {"logger", "wandb.mode"}:
        check_logger(fit)
    if not swept & set(C.CLINICAL_KEYS):
        check_inputs(fit)
    labels = {"data.labels_csv", "data.label_column", "data.label_map", "data.classes"}
    if not swept & labels:
        data = fit.data
        table = read_labels(data.labels_csv, data.label_column)
        table, _ = map_labels(table, data, str(data.labels_csv))
        if not swept & {"data.features_dir", "data.on_missing"}:
            find_features(table, data)
        elif "data.on_missing" not in swept:
            _check_feature_folders(cfg, spec["parameters"]["data.features_dir"], table)


def _check_feature_folders(cfg: C.SweepConfig, param: dict[str, Any], table: pd.DataFrame) -> None:
    """Say now which swept data.features_dir cannot give its run the labelled slides' bags: a
    typo in the last one would otherwise show only after the others have trained. A warning:
    a cache may still be in the making (its run fails and is retried on resume)."""
    from melanoma_mil.data.cohort import find_features

    for value in listed_values(param):
        try:
            find_features(table, fit_config(cfg, {"data.features_dir": value}, Path()).data)
        except UserError as e:
            why = str(e).rstrip(".")  # the sentence goes on
            log.warning("sweep file '%s', data.features_dir: %s; its run will fail unless this "
                        "is fixed before it starts", cfg.sweep_file, why)  # fmt: skip


@dataclass
class Work:
    """A run this process trains now (its lock held), with fit's overwrite for this start."""

    name: str
    params: dict[str, Any]
    paired: dict[str, str | None]
    lock: Lock
    overwrite: bool


def _run(cfg: C.SweepConfig, work: Work) -> tuple[dict[str, Any], OSError | None]:
    """One run as a ledger entry. A failure is recorded and the sweep goes on (as with agents),
    but for a full disk, returned too: every later run would fail on it as well. The run uses
    the sweep's splits (``paired``: the first finished run's, or cv.splits_file)."""
    out = Path(cfg.output_dir)
    name, params, paired = work.name, work.params, work.paired
    log.info("sweep run %s: %s", name, " ".join(overrides(params)))
    entry: dict[str, Any] = {"name": name, "params": params}
    try:
        fit = fit_config(cfg, params, out / name)
        fit.cv.splits_file = paired["file"]
        fit.overwrite = work.overwrite
        entry.update(_execute(fit, paired["sha256"]))
    except UserError as e:
        error = str(e)
        if isinstance(e, OtherRun):  # fit's overwrite=true would, for a sweep, redo every run
            error = e.saying(
                "to redo this run, delete that folder and re-run this sweep (it resumes), or "
                "pass overwrite=true to start the whole sweep over"
            )
        log.error("sweep run %s failed: %s", name, error)
        entry.update(state="failed", error=error)
    except Exception as e:
        entry.update(state="failed", error=f"{type(e).__name__}: {e}")
        if isinstance(e, OSError) and disk_full(e):  # said by the CLI, in one line
            return entry, e
        log.exception("sweep run %s crashed", name)
    return entry, None


def _join(out: Path, overwrite: bool) -> tuple[Lock, str, bool]:
    """Join the processes sweeping into ``out`` (each holds ``LOCK`` shared for its life) and
    their session: the invocation that retries a failed run once and that overwrite=true starts
    anew once. A process finding none of them starts a session, anew for overwrite=true unless
    it is its array job's (SLURM_ARRAY_JOB_ID): a task starting after the others of its job
    have ended resumes their sweep. Returns the lock, the session, whether to start anew."""
    folder = output_folder(out, "sweep")
    lock = try_lock(folder / LOCK)
    if lock is None:
        if overwrite:
            log.warning("sweep: other processes are sweeping into %s: this one joins them "
                        "and leaves overwrite=true (starting anew) to the first of them",
                        out)  # fmt: skip
        lock = shared_lock(folder / LOCK)
        return lock, _session_of(folder), False  # written before the first let others join
    remove_temp_files(folder / SESSION)  # written alone in the folder: its writer is dead
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    session = f"slurm-array-{job}" if job else secrets.token_hex(8)
    again = job is not None and _session_of(folder) == session
    if overwrite and again:
        log.warning("sweep: array job %s already started %s anew: this task resumes it, "
                    "leaving overwrite=true to that job's first task", job, out)  # fmt: skip
    write_text(folder / SESSION, session)
    return lock, session, overwrite and not again


def _session_of(folder: Path) -> str:
    try:
        return (folder / SESSION).read_text()
    except FileNotFoundError:
        return ""


def _folder_state(cfg: C.SweepConfig, spec: dict[str, Any], fixed: dict[str, Any]) -> None:
    """Refuse a folder that is not this sweep's: another sweep's ledger, another command's
    folder, results of an unknown sweep, or a comparison of yours."""
    out = Path(cfg.output_dir)
    read_ledger(out / LEDGER, spec, fixed, cfg.overwrite)
    if read_marker(out) is not None:  # then read-only: another command's folder is named first
        claim_shared(out, "sweep")
    elif (out / RESULTS).exists() and not (out / LEDGER).is_file() and not cfg.overwrite:
        raise UserError(
            f"output_dir '{out}' already holds {RESULTS} from an unknown sweep; pass "
            "overwrite=true to replace it, or choose another output_dir."
        )
    own_comparison(out)


def run_sweep(cfg: C.SweepConfig) -> int:
    """Plan and run the sweep's fits, sharing them with other `sweep` processes into the same
    output_dir; the last to finish writes sweep_results.csv and the comparison."""
    if not cfg.sweep_file:
        raise UserError("sweep needs a sweep file: python -m melanoma_mil sweep SWEEP.yaml")
    spec = load_sweep(cfg.sweep_file)
    check_metric(spec, cfg.sweep_file)
    if spec["method"] != "grid" and cfg.count is None:
        raise UserError(f"method '{spec['method']}' never runs out of runs: pass --count N.")
    out = Path(cfg.output_dir)
    fixed = fixed_settings(cfg, spec)
    _folder_state(cfg, spec, fixed)  # its refusals first, before the inputs are read
    _check_inputs(cfg, spec)
    ledger = Ledger(out / LEDGER, spec, fixed, cfg.sweep_file)
    lock, session, anew = _join(out, cfg.overwrite)
    try:
        with ledger.held(anew=anew) as entries:
            claim_shared(out, "sweep")
            recheck_finished(out, entries)
        lock.share()  # started anew, if at all: others may join now
        return _sweep(cfg, ledger, session)
    finally:
        lock.release()


def _take(cfg: C.SweepConfig, ledger: Ledger, session: str) -> Work | None:
    """The next run for this process, locked and recorded as running: a recorded one no live
    process holds (`take_unfinished`), else the engine's next (within --count); None when
    there is none. Under the ledger's lock, so no two processes take or draw the same run.
    overwrite=true replaces what a run's folder holds at the run's first start only: a run
    taken over resumes what its killed process trained (`takeover_overwrites`)."""
    out = Path(cfg.output_dir)
    lock: Lock | None = None
    try:
        with ledger.held() as entries:
            taken = take_unfinished(out, entries, session)
            if taken is None:
                if cfg.count is not None and len(entries) >= cfg.count:
                    return None
                suggestion = suggest(ledger.spec, entries, cfg.seed)
                if suggestion is None:  # grid exhausted
                    return None
                params = {k: plain(v["value"]) for k, v in suggestion.config.items()}
                name = run_name(len(entries), params)
                lock = try_lock(run_lock(out, name))
                if lock is None:  # a process of the sweep this one started anew still trains it
                    return None
                entries.append({"name": name, "params": params})
                if cfg.overwrite:
                    note_replaced(out, entries[-1])
                overwrite = cfg.overwrite
                taken = len(entries) - 1, lock
            else:
                overwrite = takeover_overwrites(out, entries[taken[0]], cfg.overwrite)
            i, lock = taken
            entry = entries[i] = {**entries[i], "state": "running"}
            for key in ("error", "metrics", "splits_sha256", "session"):
                entry.pop(key, None)
            paired = paired_splits(out, cfg.cv.splits_file, entries)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return Work(entry["name"], entry["params"], paired, lock, overwrite)


def _record(
    ledger: Ledger, session: str, entry: dict[str, Any], full: OSError | None
) -> dict[str, Any]:
    """Write a run's entry into the ledger, merged with the other processes' entries, and return
    it as written; a full disk ends the sweep, with the run recorded as failed (a re-run
    retries it) where the ledger still fits. The session marks a failure as retried by none of
    the processes sweeping now."""
    try:
        with ledger.held() as entries:
            if why := unpaired(entry, entries):
                log.error("sweep run %s failed: %s", entry["name"], why)
                entry = {"name": entry["name"], "params": entry["params"], "state": "failed",
                         "error": why}  # fmt: skip
            entry = entry | {"session": session}
            at = [i for i, e in enumerate(entries) if e["name"] == entry["name"]]
            if at:
                entries[at[0]] = entry
            else:  # removed from the ledger by hand meanwhile
                entries.append(entry)
            run_lock(ledger.path.parent, entry["name"]).unlink(missing_ok=True)
    except OSError:
        if full is None:
            raise
    if full is not None:
        raise full
    return entry


def _sweep(cfg: C.SweepConfig, ledger: Ledger, session: str) -> int:
    """Train runs while there are any to take, then write the report if no other process is
    still training one (else the last of them does): 1 if a run of this process failed. A run
    whose process died after this one last looked for work is taken over, not waited for."""
    code = 0
    out = Path(cfg.output_dir)
    while True:
        while (work := _take(cfg, ledger, session)) is not None:
            try:
                entry = _record(ledger, session, *_run(cfg, work))
            finally:
                work.lock.release()
            code = code or int(entry["state"] != "finished")
        # two processes ending together report one by one (a killed one's temp file goes)
        with locked_writes(out / REPORT_LOCK, out / RESULTS):
            with ledger.held() as entries:
                running = [e["name"] for e in entries if e.get("state") == "running"]
                dead = orphaned(out, entries)
            if dead:  # no one else would report: train it here
                continue
            if running:
                names = ", ".join(running[:8])
                log.info("sweep: %d run(s) still training in other processes (%s); the last "
                         "of them to finish writes the report", len(running), names)  # fmt: skip
                return code
            return report(cfg, ledger.spec, entries, out, own_comparison(out))
