"""`sweep SWEEP.yaml`: run a W&B sweep file locally, each run a `fit` in its own subfolder.

W&B's own sweep engine (the `sweeps` package) plans grid, random and bayes runs without a
server, so a sweep file behaves the same here and under `wandb agent`. Locally only `method`,
`metric` and `parameters` are used; fixed settings come from this command line (`--config`,
key=value), as for `fit` — the file's `command` is what `wandb agent` runs.

All runs share one set of splits (the first run's, or cv.splits_file), so the final comparison
is paired. A ledger (`sweep.json`) makes an interrupted sweep resume where it stopped: with the
same fixed settings only, retrying failed runs, and drawing what one invocation would have.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from melanoma_mil import config as C
from melanoma_mil.errors import OtherRun, UserError
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
from melanoma_mil.fsutil import Lock, try_lock
from melanoma_mil.io import json_text, write_json
from melanoma_mil.outdir import claim_shared, output_folder, read_marker
from melanoma_mil.rundir import SPLITS, load_run, settings
from melanoma_mil.tracking.loggers import check_logger, summary_metrics
from melanoma_mil.workshare import disk_full

log = logging.getLogger(__name__)
LOCK = ".sweep.lock"  # held by the one `sweep` process that plans and records a folder's runs

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


# Keys that shape no local run and no ranking (`program`/`command` are for `wandb agent`).
_LABELS_ONLY = ("name", "description", "project", "entity", "program", "command")


def _runs_shaping(spec: Any) -> Any:
    """The sweep file as it decides runs and ranking: a reworded name or description still
    resumes the same sweep."""
    if not isinstance(spec, dict):
        return spec
    return {k: v for k, v in spec.items() if k not in _LABELS_ONLY}


def _ledger(
    path: Path, spec: dict[str, Any], fixed: dict[str, Any], overwrite: bool
) -> list[dict[str, Any]]:
    """Runs of an earlier, interrupted sweep into the same folder. The file's runs and metric
    must be the same (its name, description or agent command may change), and the fixed
    settings too once a run has finished (while none has, changing them may fix them)."""
    if not path.is_file() or overwrite:
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("runs", []), list):
        raise UserError(
            f"{path} is not a sweep ledger (unreadable or damaged): use another output_dir, or "
            "overwrite=true to start the sweep anew."
        )
    if _runs_shaping(data.get("sweep")) != _runs_shaping(spec):
        raise UserError(
            f"{path} belongs to a different sweep: use another output_dir or overwrite=true."
        )
    runs = list(data.get("runs", []))
    recorded = data.get("fixed")
    finished = any(e.get("state") == "finished" for e in runs)
    if finished and recorded is None:  # a ledger from before fixed settings were recorded
        log.warning("%s does not record its fixed settings: resuming with these.", path)
    elif finished and recorded != fixed:
        keys = sorted(k for k in recorded.keys() | fixed.keys() if recorded.get(k) != fixed.get(k))
        diff = ", ".join(f"{k}={recorded.get(k)!r} (now {fixed.get(k)!r})" for k in keys[:5])
        raise UserError(
            f"{path} was run with other fixed settings: {diff}{' ...' if len(keys) > 5 else ''}; "
            "pass those to resume it, or use another output_dir, or overwrite=true to start anew."
        )
    return runs


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
    from melanoma_mil.training.orchestrate import check_parallel

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


def _run(
    cfg: C.SweepConfig, name: str, params: dict[str, Any], paired: dict[str, str | None]
) -> tuple[dict[str, Any], OSError | None]:
    """One run as a ledger entry. A failure is recorded and the sweep goes on (as with agents),
    but for a full disk, returned too: every later run would fail on it as well. The first
    finished run's splits become those of every later run (``paired``)."""
    out = Path(cfg.output_dir)
    log.info("sweep run %s: %s", name, " ".join(overrides(params)))
    entry: dict[str, Any] = {"name": name, "params": params}
    try:
        fit = fit_config(cfg, params, out / name)
        fit.cv.splits_file = paired["file"]
        entry.update(_execute(fit, paired["sha256"]))
        paired["file"] = paired["file"] or str(out / name / SPLITS)
        paired["sha256"] = paired["sha256"] or entry["splits_sha256"]
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


def _same_metrics(now: dict[str, float], recorded: dict[str, float]) -> bool:
    """The run's metrics are those recorded: as strict JSON, as sweep.json holds them (a NaN
    metric is null there), on the keys recorded (a ledger of an older version may lack some)."""
    now_text = json_text({k: now.get(k) for k in recorded}, sort_keys=True)
    return now_text == json_text(recorded, sort_keys=True)


def _recheck_finished(out: Path, entries: list[dict[str, Any]]) -> None:
    """A run the ledger calls finished whose folder is gone, no longer complete (deleted to be
    redone) or holds other results (a `fit overwrite=true` of yours into it) is run again, as a
    failed one is: else its stale metrics would be ranked beside the comparison of what the
    folder holds, or the comparison would fail after every other fit."""
    for entry in entries:
        if entry["state"] != "finished":
            continue
        try:
            run = load_run(out / entry["name"])
            problem = None
            if run.splits_sha256 != entry.get("splits_sha256"):
                problem = "refitted on other splits"
            elif not _same_metrics(summary_metrics(run.summary), entry.get("metrics") or {}):
                problem = "refitted: its results are not those recorded in the ledger"
        except UserError as e:
            problem = str(e).rstrip(".")
        if problem:
            log.warning(
                "sweep run %s is no longer finished (%s): it runs again", entry["name"], problem
            )
            entry.update(state="failed", error=problem)
            entry.pop("metrics", None)


def _hold(out: Path) -> Lock:
    """The folder's sweep lock, or a refusal: two sweeps in one folder would both plan the same
    next run (one of them fails it, its folds being locked) and each write its own ledger and
    comparison over the other's."""
    lock = try_lock(output_folder(out, "sweep") / LOCK)
    if lock is None:
        raise UserError(
            f"output_dir '{out}' is in use by another `sweep` (it holds {out / LOCK}); wait for "
            "it to end, then re-run this command to resume, or sweep into another output_dir "
            "(parallel runs of one sweep: `wandb agent`, sweeps/README.md)."
        )
    return lock


def _folder_state(
    cfg: C.SweepConfig, spec: dict[str, Any], fixed: dict[str, Any], out: Path
) -> tuple[list[dict[str, Any]], bool]:
    """The earlier runs recorded in ``out`` and whether its comparison is this sweep's own, or a
    refusal of a folder that is not this sweep's."""
    ledger_path = out / "sweep.json"
    entries = _ledger(ledger_path, spec, fixed, cfg.overwrite)
    if read_marker(out) is not None:  # then read-only: another command's folder is named first
        claim_shared(out, "sweep")
    elif (out / RESULTS).exists() and not ledger_path.is_file() and not cfg.overwrite:
        raise UserError(
            f"output_dir '{out}' already holds {RESULTS} from an unknown sweep; pass "
            "overwrite=true to replace it, or choose another output_dir."
        )
    return entries, own_comparison(out)


def run_sweep(cfg: C.SweepConfig) -> int:
    """Plan and run the sweep's fits; write sweep.json, sweep_results.csv and the comparison."""
    if not cfg.sweep_file:
        raise UserError("sweep needs a sweep file: python -m melanoma_mil sweep SWEEP.yaml")
    spec = load_sweep(cfg.sweep_file)
    check_metric(spec, cfg.sweep_file)
    if spec["method"] != "grid" and cfg.count is None:
        raise UserError(f"method '{spec['method']}' never runs out of runs: pass --count N.")
    out = Path(cfg.output_dir)
    fixed = fixed_settings(cfg, spec)
    _folder_state(cfg, spec, fixed, out)  # its refusals first, before the inputs are read
    _check_inputs(cfg, spec)
    lock = _hold(out)
    try:  # read again under the lock: a sweep that ended meanwhile may have added runs
        entries, replace_comparison = _folder_state(cfg, spec, fixed, out)
        claim_shared(out, "sweep")
        return _sweep(cfg, spec, fixed, entries, replace_comparison)
    finally:
        lock.release()


def _sweep(
    cfg: C.SweepConfig,
    spec: dict[str, Any],
    fixed: dict[str, Any],
    entries: list[dict[str, Any]],
    replace_comparison: bool,
) -> int:
    """The runs not yet finished, then the report; with the folder's sweep lock held."""
    out = Path(cfg.output_dir)
    ledger_path = out / "sweep.json"
    _recheck_finished(out, entries)
    done = [e for e in entries if e["state"] == "finished"]
    paired = {
        "file": cfg.cv.splits_file or (str(out / done[0]["name"] / SPLITS) if done else None),
        "sha256": done[0]["splits_sha256"] if done else None,
    }

    def record(i: int, name: str, params: dict[str, Any]) -> None:
        """Run entry ``i`` (or the next), write the ledger; a full disk ends the sweep, with
        the run recorded as failed (a re-run retries it) where the ledger still fits."""
        entry, full = _run(cfg, name, params, paired)
        entries[i : i + 1] = [entry]
        ledger = {"sweep": spec, "sweep_file": cfg.sweep_file, "fixed": fixed, "runs": entries}
        try:
            write_json(ledger_path, ledger)
        except OSError:
            if full is None:
                raise
        if full is not None:
            raise full

    for i, entry in enumerate(entries):  # failed runs of an earlier invocation: once more
        if entry["state"] != "finished":
            record(i, entry["name"], entry["params"])
    while cfg.count is None or len(entries) < cfg.count:
        suggestion = suggest(spec, entries, cfg.seed)
        if suggestion is None:  # grid exhausted
            break
        params = {k: plain(v["value"]) for k, v in suggestion.config.items()}
        record(len(entries), run_name(len(entries), params), params)
    return report(cfg, spec, entries, out, replace_comparison)
