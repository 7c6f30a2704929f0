"""Per-fold loggers for the CV driver: CSV, or Weights & Biases runs grouped by experiment.

With ``logger=wandb`` every fold is its own W&B run (group = experiment, job_type = fold name) and
a final run with job_type ``summary`` carries the cross-validation metrics (``cv/auc_mean`` etc.,
the key W&B sweeps optimise). Inside a ``wandb agent`` the agent hands the process one run id
and reads the sweep metric from that run, so there all folds log into that single run with
keys prefixed by the fold name, and the summary metrics land on it too.

Files go to ``<run_dir>/wandb`` (never the working directory). Without an API key runs are
written offline, and the command says once how to upload them later. A fold's run id is fixed by
the run and fold, so a fold retried after a crash resumes its W&B run (online) or replaces its
offline files: one W&B run per fold, however often it was started.
"""

from __future__ import annotations

import configparser
import hashlib
import logging
import math
import netrc
import os
import shutil
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from melanoma_mil import rundir
from melanoma_mil.config import FitConfig
from melanoma_mil.errors import UserError

log = logging.getLogger(__name__)

MODES = ("online", "offline", "disabled")
CV_METRICS = ("auc", "accuracy", "balanced_accuracy", "f1")
SWEEP_METRIC = "cv/auc_mean"  # what sweeps/*.yaml optimise; written by log_summary
SUMMARY_KEYS = [f"cv/{m}_{s}" for m in CV_METRICS for s in ("mean", "std")] + [
    "cv/pooled_auc",
    "cv/pooled_auc_ci_low",
    "cv/pooled_auc_ci_high",
    "cv/n_bags",
]
DEFAULT_PROJECT = "melanoma-mil"

_offline_notice_shown = False


def experiment_name(cfg: FitConfig, run_dir: Path) -> str:
    """The W&B group: ``experiment``, else the run dir's folder name."""
    return cfg.experiment or rundir.display_name(run_dir)


def summary_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Flat ``cv/...`` metrics from a cv_summary.json dict (the sweep metric is among them)."""
    out: dict[str, float] = {}
    for key in CV_METRICS:
        if isinstance(summary.get(key), dict):
            out[f"cv/{key}_mean"] = float(summary[key]["mean"])
            out[f"cv/{key}_std"] = float(summary[key]["std"])
    pooled = summary.get("pooled_auc") or {}
    names = {"value": "pooled_auc", "ci_low": "pooled_auc_ci_low", "ci_high": "pooled_auc_ci_high"}
    out.update({f"cv/{dst}": float(pooled[src]) for src, dst in names.items() if src in pooled})
    if "n_bags" in summary:
        out["cv/n_bags"] = float(summary["n_bags"])
    return out


# --------------------------------------------------------------------------- W&B settings
# hosts `wandb login` writes to netrc when no base_url is set: api.wandb.ai, and
# api.forge.coreweave.com, wandb >= 0.31's default base_url
_DEFAULT_HOSTS = ("api.wandb.ai", "api.forge.coreweave.com")


def _wandb_hosts() -> list[str]:
    """The W&B host(s) the key would be for: WANDB_BASE_URL, else the base_url that
    `wandb login --host` keeps in W&B's settings file, else the default hosts."""
    url = os.environ.get("WANDB_BASE_URL")
    if not url:
        folder = os.environ.get("WANDB_CONFIG_DIR") or str(Path.home() / ".config" / "wandb")
        settings = configparser.ConfigParser()
        try:
            settings.read(Path(folder) / "settings")
            url = settings.get("default", "base_url", fallback=None)
        except (configparser.Error, OSError, UnicodeDecodeError):
            url = None
    host = urlparse(url).hostname if url else None
    return [host] if host else list(_DEFAULT_HOSTS)


def has_api_key() -> bool:
    """A key in WANDB_API_KEY (or an identity token file) or a netrc entry for the W&B host
    (what `wandb login` writes: ~/.netrc, or ~/_netrc, which wandb also reads)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    if os.environ.get("NETRC"):
        paths = [os.path.expanduser(os.environ["NETRC"])]
    else:
        paths = [str(Path.home() / ".netrc"), str(Path.home() / "_netrc")]
    for path in paths:
        try:
            entries = netrc.netrc(path)
        except (OSError, netrc.NetrcParseError):
            continue
        if any(entries.authenticators(host) is not None for host in _wandb_hosts()):
            return True
    return False


def _mode(cfg: FitConfig) -> tuple[str, str]:
    """(mode, why): cfg.wandb.mode, else WANDB_MODE, else online with an API key and offline
    without."""
    requested = cfg.wandb.mode or os.environ.get("WANDB_MODE")
    aliases = {"dryrun": "offline", "run": "online"}
    if not requested:
        if has_api_key():
            return "online", "an API key was found"
        return "offline", "no W&B API key found (WANDB_API_KEY or `wandb login`)"
    mode = aliases.get(requested, requested)
    if mode not in MODES:
        source = "wandb.mode" if cfg.wandb.mode else "the WANDB_MODE environment variable"
        raise UserError(
            f"W&B mode {requested!r} from {source} is not one of {', '.join(MODES)}; "
            "fix it (or unset it: online with an API key, else offline)."
        )
    if mode == "online" and not has_api_key() and not in_agent():
        # wandb.init would fail at the first fold (a traceback, the run folder already made)
        source = "wandb.mode" if cfg.wandb.mode else "the WANDB_MODE environment variable"
        raise UserError(
            f"W&B mode 'online' from {source} needs an API key and none was found "
            "(WANDB_API_KEY or `wandb login`): run `wandb login`, or log offline with "
            "wandb.mode=offline and upload later with `wandb sync`."
        )
    return mode, "as requested"


def check_logger(cfg: FitConfig) -> None:
    """A bad W&B mode fails before any work, not at the first fold after the run files exist."""
    if cfg.logger == "wandb":
        _mode(cfg)


def _final(run_dir: Path) -> Path:
    """The run folder a replacement built in ``.<name>.fit-new`` becomes once swapped in."""
    name = rundir.display_name(run_dir)
    return Path(run_dir) if name == Path(run_dir).name else Path(run_dir).parent / name


def resolve_mode(cfg: FitConfig, run_dir: Path) -> str:
    """The W&B mode (see `_mode`); the first offline run says how to upload its runs."""
    global _offline_notice_shown
    mode, reason = _mode(cfg)
    if mode == "offline" and not _offline_notice_shown:
        _offline_notice_shown = True
        log.warning(
            "W&B: logging offline, %s; runs go to each fit's <output_dir>/wandb, "
            "upload later with e.g. `wandb sync %s/offline-run-*`",
            reason,
            _final(run_dir) / "wandb",
        )
    return mode


def in_agent() -> bool:
    """True inside `wandb agent`, which assigns this process one run of a sweep."""
    return bool(os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"))


def _provenance(run_dir: Path) -> dict[str, Any]:
    """The run's provenance for W&B configs; none yet (or damaged) logs without it."""
    try:
        return rundir.read_provenance(run_dir)
    except UserError:
        return {}


def _init_kwargs(
    cfg: FitConfig, run_dir: Path, job_type: str, name: str, files_dir: Path | None = None
) -> dict[str, Any]:
    """wandb.init arguments of every W&B run this package makes (folds, summary, heatmap,
    predict): project, entity and mode resolved once, grouping, config and provenance. Files go
    to ``files_dir`` (default: the run dir)."""
    import wandb

    prov = _provenance(run_dir)
    tracked = {k: prov.get(k) for k in ("encoder", "cache_key", "splits_sha256", "feature_dim")}
    config = OmegaConf.to_container(OmegaConf.structured(cfg))
    assert isinstance(config, dict)
    config["provenance"] = tracked
    tags = [*cfg.wandb.tags, *([str(prov["encoder"])[:64]] if prov.get("encoder") else [])]
    group = experiment_name(cfg, run_dir)
    files = Path(files_dir or run_dir)
    files.mkdir(parents=True, exist_ok=True)
    return {
        "project": cfg.wandb.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
        "entity": cfg.wandb.entity or os.environ.get("WANDB_ENTITY"),
        "group": group,
        "job_type": job_type,
        "name": f"{group}/{name}",
        "config": config,
        "tags": tags,
        "dir": str(files),
        "mode": resolve_mode(cfg, files),
        "settings": wandb.Settings(console="off", quiet=True),
    }


class _AgentWandbLogger(WandbLogger):
    """Logs one fold into the agent's single run, with keys like ``fold_0/val_auc``."""

    LOGGER_JOIN_CHAR = "/"

    def __init__(self, fold: str, **kwargs: Any) -> None:
        super().__init__(prefix=fold, **kwargs)
        self.fold = fold


def _finish_open_run(next_run: str | None = None) -> None:
    """Finish the run open in this process, as failed: WandbLogger would log the next fold into
    it, under its name, group and config. ``next_run``: say so (a run nobody closed: a crash
    outside `abort_fold`, a caller's own)."""
    import wandb

    if wandb.run is not None:
        if next_run is not None:
            log.warning(
                "W&B: finishing run %s, left open in this process, as failed; %s gets its own run",
                wandb.run.name or wandb.run.id,
                next_run,
            )
        wandb.run.finish(exit_code=1)


def _fold_run_id(run_dir: Path, name: str) -> str | None:
    """The fold's W&B run id, fixed by the run (its run_id) and fold; None outside a run."""
    record = rundir.run_record(Path(run_dir))
    if record is None or not record.get("run_id"):
        return None
    return hashlib.sha256(f"{record['run_id']}/{name}".encode()).hexdigest()[:16]


def _drop_attempts(files: Path, run_id: str) -> None:
    """Remove the offline files of an earlier, discarded attempt of this fold (a crash, a kill):
    `wandb sync` would upload it beside the retry."""
    for old in (files / "wandb").glob(f"offline-run-*-{run_id}"):
        log.info("W&B: removing %s, the offline run of a discarded attempt", old)
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- hooks
def fold_logger(cfg: FitConfig, run_dir: Path, fold: int, repeat: int) -> Logger | None:
    """The Lightning logger for one fold (one W&B run per fold; CSV under run_dir/logs)."""
    name = rundir.fold_name(fold, repeat, cfg.cv.repeats)
    if cfg.logger == "none":
        return None
    if cfg.logger == "csv":
        return CSVLogger(save_dir=str(run_dir), name="logs", version=name)
    if in_agent():
        import wandb

        run = None  # other DDP ranks log nothing (Lightning gives them a dummy experiment)
        if rank_zero_only.rank == 0:
            run = wandb.run or wandb.init(**_init_kwargs(cfg, run_dir, "fit", "fit"))
        return _AgentWandbLogger(name, experiment=run, save_dir=str(run_dir))
    kwargs = _init_kwargs(cfg, run_dir, name, name)
    run_id = _fold_run_id(run_dir, name)
    if rank_zero_only.rank == 0:
        _finish_open_run(name)
        if run_id is not None:
            _drop_attempts(Path(kwargs["dir"]), run_id)
    return WandbLogger(save_dir=kwargs.pop("dir"), log_model=False, id=run_id, **kwargs)


def abort_fold(cfg: FitConfig) -> None:
    """Finish the W&B run of a fold that raised, as failed: left open, the next fold (or a
    sweep's next fit) would log into it. Inside an agent its one run ends with the process."""
    if cfg.logger != "wandb" or in_agent() or "wandb" not in sys.modules:
        return
    _finish_open_run()


def finish_fold(logger: Logger | None, metrics: dict[str, float], roc_png: Path | None) -> None:
    """Record a fold's test metrics (and ROC image) in its logger, then close it."""
    if logger is None:
        return
    test = {f"test_{k}": v for k, v in metrics.items()}
    if not isinstance(logger, WandbLogger):
        logger.log_metrics(test)
        logger.finalize("success")
        return
    if rank_zero_only.rank != 0:
        return
    import wandb

    run = logger.experiment
    prefix = f"{logger.fold}/" if isinstance(logger, _AgentWandbLogger) else ""
    payload: dict[str, Any] = {f"{prefix}{k}": v for k, v in test.items()}
    if roc_png is not None and Path(roc_png).is_file():
        payload[f"{prefix}test_roc"] = wandb.Image(str(roc_png))
    run.log(payload)
    run.summary.update({k: v for k, v in payload.items() if isinstance(v, float)})
    logger.finalize("success")
    if not isinstance(logger, _AgentWandbLogger):  # the agent's run stays open for the summary
        run.finish()


def log_summary(
    cfg: FitConfig, run_dir: Path, summary: dict[str, Any], predictions: pd.DataFrame
) -> None:
    """Cross-validation summary for the experiment (a W&B summary run when logger=wandb)."""
    if cfg.logger != "wandb" or rank_zero_only.rank != 0:
        return
    import wandb

    metrics = summary_metrics(summary)
    kwargs = _init_kwargs(cfg, run_dir, "fit" if in_agent() else "summary", "summary")
    run = wandb.run if in_agent() and wandb.run is not None else wandb.init(**kwargs)
    per_fold = {k: summary[k]["per_fold"] for k in CV_METRICS if isinstance(summary.get(k), dict)}
    n_folds = len(next(iter(per_fold.values()), []))
    rows = [[i, *(_finite(v[i]) for v in per_fold.values())] for i in range(n_folds)]
    payload: dict[str, Any] = dict(metrics)
    payload["cv/per_fold"] = wandb.Table(columns=["fold", *per_fold], data=rows)
    payload["cv/predictions"] = wandb.Table(dataframe=predictions)
    if (Path(run_dir) / rundir.ROC).is_file():
        payload["cv/roc"] = wandb.Image(str(Path(run_dir) / rundir.ROC))
    run.log(payload)
    run.summary.update(metrics)
    run.finish()


def note_finished(cfg: FitConfig, run_dir: Path) -> None:
    """A fit of a finished run trains and writes nothing, so logger=wandb logs nothing: say so."""
    if cfg.logger == "wandb" and rank_zero_only.rank == 0:
        log.warning(
            "W&B: nothing logged: '%s' was already finished (W&B gets the folds a fit trains and "
            "the results it writes); pass overwrite=true to train and log it again, or choose "
            "another output_dir.",
            run_dir,
        )


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def log_slides(
    cfg: FitConfig, run_dir: Path, table: pd.DataFrame, out: Path, job_type: str
) -> None:
    """When the run logged to W&B, log a heatmap / predict table with its images to one run of
    the run's group (files under ``out``)."""
    if cfg.logger != "wandb":
        return
    import wandb

    with wandb.init(**_init_kwargs(cfg, run_dir, job_type, job_type, files_dir=out)) as wb:
        payload: dict[str, Any] = {f"{job_type}/slides": wandb.Table(dataframe=table.astype(str))}
        for r in table.itertuples():
            for kind in ("heatmap", "montage"):
                path = getattr(r, kind, None)
                if isinstance(path, str) and Path(path).is_file():
                    payload[f"{kind}/{r.slide_id}"] = wandb.Image(path)
        wb.log(payload)
