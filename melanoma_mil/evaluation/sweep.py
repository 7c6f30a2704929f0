"""`sweep SWEEP.yaml`: run a W&B sweep file locally, each run a `fit` in its own subfolder.

W&B's own sweep engine (the `sweeps` package) plans grid, random and bayes runs without a
server, so a sweep file behaves the same here and under `wandb agent`. Locally only `method`,
`metric` and `parameters` are used; fixed settings come from this command line (`--config`,
key=value), as for `fit` — the file's `command` is what `wandb agent` runs.

All runs share one set of splits (the first run's, or cv.splits_file), so the final comparison
is paired. A ledger (`sweep.json`) makes an interrupted sweep resume where it stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import logging
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from omegaconf import OmegaConf

from melanoma_mil import config as C
from melanoma_mil.errors import UserError
from melanoma_mil.evaluation.compare import OUTPUTS as COMPARE_OUTPUTS
from melanoma_mil.evaluation.compare import compare_runs
from melanoma_mil.io import atomic_path, write_json
from melanoma_mil.outdir import claim_shared, made_by, read_marker
from melanoma_mil.rundir import SPLITS, load_run
from melanoma_mil.tracking.loggers import SUMMARY_KEYS, summary_metrics

log = logging.getLogger(__name__)

FIT_KEYS = [key for key, _, _ in C.describe(C.FitConfig)]


def _plain(value: Any) -> Any:
    """numpy scalars from the engine -> Python values (YAML, JSON and OmegaConf need these)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read and validate a sweep file with the W&B engine; parameter names must be fit keys."""
    import jsonschema

    file = Path(path)
    if not file.is_file():
        raise UserError(f"sweep file '{file}' not found.")
    try:
        spec = yaml.safe_load(file.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"sweep file '{file}' is not valid YAML: {e}") from None
    sweeps = _engine()
    try:
        sweeps.SweepConfig(spec)
    except (jsonschema.ValidationError, ValueError) as e:
        msg = str(e).splitlines()[0]
        raise UserError(f"sweep file '{file}' is invalid: {msg}. See sweeps/README.md.") from None
    for name in spec["parameters"]:
        if name not in FIT_KEYS:
            close = difflib.get_close_matches(name, FIT_KEYS, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UserError(f"sweep file '{file}': parameter '{name}' is not a fit key.{hint}")
    _check_values(spec, file)
    return spec


# distributions whose min/max are exponents, not values of the key
_EXPONENT_BOUNDS = ("log_uniform", "q_log_uniform")


def _check_values(spec: dict[str, Any], file: Path) -> None:
    """Every listed value and value-space bound as a fit setting, so a bad choice fails now
    rather than hours into the grid (each alone: fit's checks are per key)."""
    for name, param in spec["parameters"].items():
        values = list(param.get("values", []))
        values += [param["value"]] if "value" in param else []
        if param.get("distribution") not in _EXPONENT_BOUNDS:
            values += [param[b] for b in ("min", "max") if b in param]
        for value in values:
            try:
                fit_config(C.SweepConfig(), {name: value}, Path("runs/check"))
            except UserError as e:
                raise UserError(f"sweep file '{file}', parameter '{name}': {e}") from None


def _engine() -> Any:
    with warnings.catch_warnings():  # pydantic v1-style config warnings on import
        warnings.simplefilter("ignore")
        import sweeps
    return sweeps


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


def overrides(params: dict[str, Any]) -> list[str]:
    """The dotlist `wandb agent` would pass via ${args_no_hyphens}: `key=value` with str(value)."""
    return [f"{key}={value}" for key, value in params.items()]


def fit_config(cfg: C.SweepConfig, params: dict[str, Any], output_dir: Path) -> C.FitConfig:
    """The sweep's fit settings + one run's parameters (parsed as the agent's dotlist would be)."""
    fit_fields = {f.name for f in dataclasses.fields(C.FitConfig)}
    base = C.FitConfig(**{k: copy.deepcopy(v) for k, v in vars(cfg).items() if k in fit_fields})
    node = C.merge_overrides(OmegaConf.structured(base), overrides(params), what="sweep parameter")
    fit: C.FitConfig = C.to_checked(node)
    fit.output_dir = str(output_dir)
    fit.experiment = f"{cfg.experiment or Path(cfg.output_dir).name}-{output_dir.name}"
    return fit


def _ledger(path: Path, spec: dict[str, Any], overwrite: bool) -> list[dict[str, Any]]:
    """Runs of an earlier, interrupted sweep into the same folder (same file required)."""
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
    if data.get("sweep") != spec:
        raise UserError(
            f"{path} belongs to a different sweep: use another output_dir or overwrite=true."
        )
    return list(data.get("runs", []))


def _sweep_run(entry: dict[str, Any]) -> Any:
    sweeps = _engine()
    state = sweeps.RunState.finished if entry["state"] == "finished" else sweeps.RunState.failed
    return sweeps.SweepRun(
        name=entry["name"],
        state=state,
        config={k: {"value": v} for k, v in entry["params"].items()},
        summary_metrics=entry.get("metrics", {}),
        history=[entry.get("metrics", {})],
    )


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


def _check_metric(spec: dict[str, Any], file: str) -> None:
    name = (spec.get("metric") or {}).get("name")
    if name is not None and name not in SUMMARY_KEYS:
        raise UserError(
            f"sweep file '{file}': metric '{name}' is not logged by fit; use one of {SUMMARY_KEYS}."
        )


def run_sweep(cfg: C.SweepConfig) -> int:
    """Plan and run the sweep's fits; write sweep.json, sweep_results.csv and the comparison."""
    if not cfg.sweep_file:
        raise UserError("sweep needs a sweep file: python -m melanoma_mil sweep SWEEP.yaml")
    spec = load_sweep(cfg.sweep_file)
    _check_metric(spec, cfg.sweep_file)
    if spec["method"] != "grid" and cfg.count is None:
        raise UserError(f"method '{spec['method']}' never runs out of runs: pass --count N.")
    sweeps = _engine()
    out = Path(cfg.output_dir)
    ledger_path = out / "sweep.json"
    entries = _ledger(ledger_path, spec, cfg.overwrite)
    claim_shared(out, "sweep")
    replace_comparison = _own_comparison(out)
    random.seed(cfg.seed)  # the engine draws random and bayes suggestions from these
    np.random.seed(cfg.seed)
    done = [e for e in entries if e["state"] == "finished"]
    splits_file = cfg.cv.splits_file or (str(out / done[0]["name"] / SPLITS) if done else None)
    splits_sha256 = done[0]["splits_sha256"] if done else None
    while cfg.count is None or len(entries) < cfg.count:
        with warnings.catch_warnings():  # the bayes GP's convergence chatter
            warnings.simplefilter("ignore")
            suggestion = sweeps.next_run(spec, [_sweep_run(e) for e in entries], validate=True)
        if suggestion is None:  # grid exhausted
            break
        params = {k: _plain(v["value"]) for k, v in suggestion.config.items()}
        name = run_name(len(entries), params)
        log.info("sweep run %d: %s", len(entries) + 1, " ".join(overrides(params)))
        entry: dict[str, Any] = {"name": name, "params": params}
        try:
            fit = fit_config(cfg, params, out / name)
            fit.cv.splits_file = splits_file
            entry.update(_execute(fit, splits_sha256))
            splits_file = splits_file or str(out / name / SPLITS)
            splits_sha256 = splits_sha256 or entry["splits_sha256"]
        except UserError as e:
            log.error("sweep run %s failed: %s", name, e)
            entry.update(state="failed", error=str(e))
        except Exception as e:  # one failed run is recorded; the sweep goes on (as with agents)
            log.exception("sweep run %s crashed", name)
            entry.update(state="failed", error=f"{type(e).__name__}: {e}")
        entries.append(entry)
        write_json(ledger_path, {"sweep": spec, "sweep_file": cfg.sweep_file, "runs": entries})
    return _report(cfg, spec, entries, out, replace_comparison)


def _comparison_marker(out: Path) -> dict[str, Any]:
    """The marker of the sweep's own comparison: a `compare` of yours has no ``run_id``."""
    return {"command": "compare", "run_id": "sweep", "run_dir": str(out)}


def _own_comparison(out: Path) -> bool:
    """Whether an earlier comparison of this sweep made ``out/comparison`` (then it is
    replaced); anything else there (a `compare` of yours) is refused here, before any fit."""
    folder = out / "comparison"
    marker = read_marker(folder)
    if (
        marker is not None
        and marker.get("command") == "compare"
        and marker.get("run_id") == "sweep"
    ):
        return True
    if folder.exists() and not folder.is_dir():
        held = "a file"
    elif marker is not None:
        held = f"output of {made_by(marker)}"
    else:
        found = sorted({p.name for pattern in COMPARE_OUTPUTS for p in folder.glob(pattern)})
        held = f"{found} from an unknown run" if found else ""
    if held:
        raise UserError(
            f"'{folder}' holds {held}, not this sweep's comparison; move it away: the sweep "
            "writes its comparison there."
        )
    return False


def _report(
    cfg: C.SweepConfig,
    spec: dict[str, Any],
    entries: list[dict[str, Any]],
    out: Path,
    replace_comparison: bool,
) -> int:
    rows = [
        {"run": e["name"], "state": e["state"], **e["params"], **e.get("metrics", {})}
        for e in entries
    ]
    table = pd.DataFrame(rows)
    metric = (spec.get("metric") or {}).get("name")
    if metric in table.columns:
        ascending = spec["metric"].get("goal") == "minimize"
        table = table.sort_values(metric, ascending=ascending, na_position="last")
    with atomic_path(out / "sweep_results.csv") as tmp:
        table.to_csv(tmp, index=False)
    shown = ["run", "state", *spec["parameters"], metric, "cv/pooled_auc"]
    print(table[[c for c in dict.fromkeys(shown) if c in table.columns]].to_string(index=False))
    finished = [str(out / e["name"]) for e in entries if e["state"] == "finished"]
    if len(finished) >= 2:
        compare_runs(
            C.CompareConfig(
                run_dirs=finished,
                output_dir=str(out / "comparison"),
                seed=cfg.seed,
                overwrite=replace_comparison,
            ),
            marker=_comparison_marker(out),
        )
    failed = [e["name"] for e in entries if e["state"] != "finished"]
    if failed:
        log.error("%d sweep run(s) failed: %s (see %s)", len(failed), failed, out / "sweep.json")
        return 1
    return 0
