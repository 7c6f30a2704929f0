"""A sweep file: read, checked before any run, and planned run by run with W&B's own sweep
engine (the `sweeps` package), so it behaves here as under `wandb agent`."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from melanoma_mil import config as C
from melanoma_mil.config.files import safe_load_unique, yaml_file_problem, yaml_problem
from melanoma_mil.config.tools import expand_home
from melanoma_mil.errors import UserError
from melanoma_mil.tracking.loggers import SUMMARY_KEYS

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


# the sweeps engine's messages (its schema errors carry no path) -> the fix to say with them
_PARAM_FORMS = "give each parameter values: [a, b], value: x, or a distribution with min and max"
_ENGINE_FIXES = (
    ("is a required property", "add that key (see sweeps/README.md)"),
    ("is not one of", "use one of those"),
    ("is not valid under any of the given schemas", _PARAM_FORMS),
    ("Invalid configuration for hyperparameter", _PARAM_FORMS),
)


def plain(value: Any) -> Any:
    """numpy scalars from the engine -> Python values (YAML, JSON and OmegaConf need these)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read and validate a sweep file with the W&B engine; parameter names must be fit keys."""
    import jsonschema

    file = Path(path)
    if problem := yaml_file_problem(path, "sweep file"):
        raise UserError(problem)
    try:
        spec = safe_load_unique(file.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"sweep file '{file}' is not valid YAML: {yaml_problem(e)}.") from None
    if isinstance(spec, dict) and not isinstance(spec.get("parameters", {}), dict):
        raise UserError(  # the engine's own check fails on it with an AttributeError
            f"sweep file '{file}': parameters is not a mapping: write one `KEY:` per parameter, "
            "each with values, value or a distribution. See sweeps/README.md."
        )
    if not isinstance(spec, dict):  # the engine: "Sweep config must be parsable as a JSON object."
        held = "nothing" if spec is None else f"a {'list' if isinstance(spec, list) else 'value'}"
        raise UserError(
            f"sweep file '{file}' holds {held}, not a mapping of keys: write `method: grid` and "
            "`parameters:` with one fit key each (values: [...]), as sweeps/models.yaml does."
        )
    sweeps = _engine()
    try:
        sweeps.SweepConfig(spec)
    except (jsonschema.ValidationError, ValueError) as e:
        msg = str(e).splitlines()[0].rstrip(".")
        fix = next((f for form, f in _ENGINE_FIXES if form in msg), "see sweeps/README.md")
        raise UserError(f"sweep file '{file}' is invalid: {msg}; {fix}.") from None
    if spec["method"] not in LOCAL_METHODS:  # W&B's schema also takes `custom`
        raise UserError(
            f"sweep file '{file}': method '{spec['method']}' needs a controller of your own; "
            f"the local sweep runs method: {', '.join(LOCAL_METHODS)}."
        )
    _check_names(spec, file)
    _check_values(spec, file)
    # what only planning finds (a grid of a distribution, bayes without a metric) fails here,
    # not at the first run with the folder claimed; after the names, which the engine asserts on
    try:
        suggest(spec, [], 0)
    except ValueError as e:
        msg = str(e).splitlines()[0].rstrip(".")
        raise UserError(
            f"sweep file '{file}' cannot be planned: {msg}. See sweeps/README.md."
        ) from None
    return spec


def _check_names(spec: dict[str, Any], file: Path) -> None:
    """Refuse a parameter that is no fit key (with the closest one), is nested (W&B's form, which
    the agent would pass as one dict), or is a key the sweep sets itself or must keep fixed."""
    for name, param in spec["parameters"].items():
        inner = param.get("parameters") if isinstance(param, dict) else None
        if name not in FIT_KEYS and isinstance(inner, dict) and inner:
            raise UserError(  # W&B's nested form: the agent would pass optim={'lr': ...}
                f"sweep file '{file}': parameter '{name}' nests parameters; write each as a "
                f"dotted fit key instead, e.g. '{name}.{next(iter(inner))}:' with its values."
            )
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


def listed_values(param: dict[str, Any]) -> list[Any]:
    """A sweep parameter's values written out (``values`` or ``value``; not a distribution's)."""
    return list(param.get("values", [])) + ([param["value"]] if "value" in param else [])


# distributions whose min/max are exponents, not values of the key
_EXPONENT_BOUNDS = ("log_uniform", "q_log_uniform")


def _check_values(spec: dict[str, Any], file: Path) -> None:
    """Every listed value and value-space bound as a fit setting, so a bad choice fails now
    rather than hours into the grid (each alone: fit's checks are per key)."""
    for name, param in spec["parameters"].items():
        values = listed_values(param)
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


def _sweep_run(entry: dict[str, Any]) -> Any:
    sweeps = _engine()
    states = {"finished": sweeps.RunState.finished, "running": sweeps.RunState.running}
    state = states.get(entry["state"], sweeps.RunState.failed)  # running: in another process
    return sweeps.SweepRun(
        name=entry["name"],
        state=state,
        config={k: {"value": v} for k, v in entry["params"].items()},
        summary_metrics=entry.get("metrics", {}),
        history=[entry.get("metrics", {})],
    )


def check_metric(spec: dict[str, Any], file: str) -> None:
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


def suggest(spec: dict[str, Any], entries: list[dict[str, Any]], seed: int) -> Any:
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
