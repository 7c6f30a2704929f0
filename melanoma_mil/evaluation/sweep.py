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
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from melanoma_mil import config as C
from melanoma_mil.configtools import expand_home, yaml_problem
from melanoma_mil.errors import UserError
from melanoma_mil.evaluation.sweep_report import RESULTS, own_comparison, report
from melanoma_mil.io import write_json
from melanoma_mil.outdir import claim_shared, read_marker
from melanoma_mil.rundir import SPLITS, load_run, settings
from melanoma_mil.tracking.loggers import SUMMARY_KEYS, check_logger, summary_metrics

log = logging.getLogger(__name__)

FIT_KEYS = [key for key, _, _ in C.describe(C.FitConfig)]
LOCAL_METHODS = ("grid", "random", "bayes")  # what the sweeps engine plans

# Fit keys the sweep sets for every run itself: as parameters they would be silently replaced.
_SET_BY_SWEEP = {
    "output_dir": "each run's folder is <output_dir>/<NNN>_<parameters>",
    "experiment": "each run's experiment is named after its folder",
    "overwrite": "pass overwrite=true on the command line to start the whole sweep anew",
}
_SPLITS_WHY = (
    "every run uses one set of splits (the first run's, or cv.splits_file) so that runs are "
    "compared paired; run one sweep per split setting, each into its own output_dir"
)
# what a bag is and which label it has: runs are compared paired, bag by bag, on one labelling
_LABEL_KEYS = ("data.labels_csv", "data.label_column", "data.label_map", "data.classes",
               "data.bag_level")  # fmt: skip
_LABELS_WHY = (
    "runs are compared paired on the same bags and labels (and the first run's splits); run "
    "one sweep per labelling, each into its own output_dir"
)
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
        raise UserError(f"sweep file '{file}' is not valid YAML: {yaml_problem(e)}.") from None
    if isinstance(spec, dict) and not isinstance(spec.get("parameters", {}), dict):
        raise UserError(  # the engine's own check fails on it with an AttributeError
            f"sweep file '{file}': parameters is not a mapping: write one `KEY:` per parameter, "
            "each with values, value or a distribution. See sweeps/README.md."
        )
    sweeps = _engine()
    try:
        sweeps.SweepConfig(spec)
    except (jsonschema.ValidationError, ValueError) as e:
        msg = str(e).splitlines()[0]
        raise UserError(f"sweep file '{file}' is invalid: {msg}. See sweeps/README.md.") from None
    if spec["method"] not in LOCAL_METHODS:  # W&B's schema also takes `custom`
        raise UserError(
            f"sweep file '{file}': method '{spec['method']}' needs a controller of your own; "
            f"the local sweep runs method: {', '.join(LOCAL_METHODS)}."
        )
    for name in spec["parameters"]:
        if not isinstance(name, str) or name not in FIT_KEYS:
            close = difflib.get_close_matches(str(name), FIT_KEYS, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UserError(f"sweep file '{file}': parameter '{name}' is not a fit key.{hint}")
        why = (
            _SET_BY_SWEEP.get(name)
            or (_SPLITS_WHY if name.startswith("cv.") else None)
            or (_LABELS_WHY if name in _LABEL_KEYS else None)
        )
        if why:
            raise UserError(f"sweep file '{file}': parameter '{name}' cannot be swept: {why}.")
    _check_values(spec, file)
    # what only planning finds (a grid of a distribution, bayes without a metric) fails here,
    # not at the first run with the folder claimed; after the names, which the engine asserts on
    try:
        _suggest(spec, [], 0)
    except ValueError as e:
        msg = str(e).splitlines()[0].rstrip(".")
        raise UserError(
            f"sweep file '{file}' cannot be planned: {msg}. See sweeps/README.md."
        ) from None
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
                fit = fit_config(C.SweepConfig(), {name: value}, Path("runs/check"))
            except UserError as e:
                raise UserError(f"sweep file '{file}', parameter '{name}': {e}") from None
            _check_text(file, name, value, fit)


def _check_text(file: Path, name: str, value: Any, fit: C.FitConfig) -> None:
    """A text value that the agent's `key=value` (read as YAML) turns into another ('007' -> 7,
    'yes' -> True, 'a #b' -> 'a') would train with a value the file does not say."""
    if not isinstance(value, str) or value == "None":  # None: the agent's null, on purpose
        return
    if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":  # quoted on purpose
        return
    node = OmegaConf.structured(C.FitConfig())
    try:
        OmegaConf.update(node, name, value, merge=True)
    except OmegaConfBaseException:  # not a text key: fit_config has checked the value
        return
    typed = OmegaConf.to_object(node)
    expand_home(typed)  # as fit does to any text setting: '~/x' means the home folder's x
    meant = OmegaConf.select(OmegaConf.structured(typed), name)
    got = OmegaConf.select(OmegaConf.structured(fit), name)
    if got != meant:
        raise UserError(
            f"sweep file '{file}', parameter '{name}': value {value!r} reaches fit as {got!r} "
            f"(wandb agent passes {name}={value}, which is read as YAML); quote it inside the "
            f"text to keep it: \"'{value}'\"."
        )


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


def _ledger(
    path: Path, spec: dict[str, Any], fixed: dict[str, Any], overwrite: bool
) -> list[dict[str, Any]]:
    """Runs of an earlier, interrupted sweep into the same folder. Same file required, and the
    same fixed settings once a run has finished (while none has, changing them may fix them)."""
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
    metric = spec.get("metric") or {}
    name = metric.get("name")
    if name is not None and name not in SUMMARY_KEYS:
        raise UserError(
            f"sweep file '{file}': metric '{name}' is not logged by fit; use one of {SUMMARY_KEYS}."
        )
    if name is not None and metric.get("goal") not in ("maximize", "minimize"):
        raise UserError(  # the sweeps engine (and wandb) would minimize it, the table maximize
            f"sweep file '{file}': metric '{name}' needs goal: maximize or goal: minimize."
        )


def _check_inputs(cfg: C.SweepConfig, swept: set[str]) -> None:
    """fit's checks of its inputs, on the settings every run shares: a bad one stops the sweep
    now (exit 2) rather than failing each run. Keys a parameter sets are left to each run."""
    from melanoma_mil.data.cohort import find_features, map_labels, read_labels
    from melanoma_mil.evaluation.hooks import check_inputs
    from melanoma_mil.training.orchestrate import check_parallel

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


def _suggest(spec: dict[str, Any], entries: list[dict[str, Any]], seed: int) -> Any:
    """The engine's next run. Random and bayes draw from `random` and `np.random`, seeded here
    from (seed, run index): a resumed sweep draws what one uninterrupted invocation would, and
    the fits in between (which seed those generators themselves) change nothing."""
    saved = random.getstate(), np.random.get_state()
    a, b = np.random.SeedSequence([seed % 2**64, len(entries)]).generate_state(2)
    random.seed(int(a))
    np.random.seed(int(b))
    try:
        with warnings.catch_warnings():  # the bayes GP's convergence chatter
            warnings.simplefilter("ignore")
            return _engine().next_run(spec, [_sweep_run(e) for e in entries], validate=True)
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])


def _run(
    cfg: C.SweepConfig, name: str, params: dict[str, Any], paired: dict[str, str | None]
) -> dict[str, Any]:
    """One run as a ledger entry. A failure is recorded and the sweep goes on (as with agents);
    the first finished run's splits become those of every later run (``paired``)."""
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
        log.error("sweep run %s failed: %s", name, e)
        entry.update(state="failed", error=str(e))
    except Exception as e:
        log.exception("sweep run %s crashed", name)
        entry.update(state="failed", error=f"{type(e).__name__}: {e}")
    return entry


def run_sweep(cfg: C.SweepConfig) -> int:
    """Plan and run the sweep's fits; write sweep.json, sweep_results.csv and the comparison."""
    if not cfg.sweep_file:
        raise UserError("sweep needs a sweep file: python -m melanoma_mil sweep SWEEP.yaml")
    spec = load_sweep(cfg.sweep_file)
    _check_metric(spec, cfg.sweep_file)
    if spec["method"] != "grid" and cfg.count is None:
        raise UserError(f"method '{spec['method']}' never runs out of runs: pass --count N.")
    out = Path(cfg.output_dir)
    ledger_path = out / "sweep.json"
    fixed = fixed_settings(cfg, spec)
    entries = _ledger(ledger_path, spec, fixed, cfg.overwrite)
    if read_marker(out) is not None:  # then read-only: another command's folder is named first
        claim_shared(out, "sweep")
    elif (out / RESULTS).exists() and not ledger_path.is_file() and not cfg.overwrite:
        raise UserError(
            f"output_dir '{out}' already holds {RESULTS} from an unknown sweep; pass "
            "overwrite=true to replace it, or choose another output_dir."
        )
    _check_inputs(cfg, set(spec["parameters"]))
    replace_comparison = own_comparison(out)  # refused before the folder is marked
    claim_shared(out, "sweep")
    done = [e for e in entries if e["state"] == "finished"]
    paired = {
        "file": cfg.cv.splits_file or (str(out / done[0]["name"] / SPLITS) if done else None),
        "sha256": done[0]["splits_sha256"] if done else None,
    }

    def record() -> None:
        ledger = {"sweep": spec, "sweep_file": cfg.sweep_file, "fixed": fixed, "runs": entries}
        write_json(ledger_path, ledger)

    for i, entry in enumerate(entries):  # failed runs of an earlier invocation: once more
        if entry["state"] != "finished":
            entries[i] = _run(cfg, entry["name"], entry["params"], paired)
            record()
    while cfg.count is None or len(entries) < cfg.count:
        suggestion = _suggest(spec, entries, cfg.seed)
        if suggestion is None:  # grid exhausted
            break
        params = {k: _plain(v["value"]) for k, v in suggestion.config.items()}
        entries.append(_run(cfg, run_name(len(entries), params), params, paired))
        record()
    return report(cfg, spec, entries, out, replace_comparison)
