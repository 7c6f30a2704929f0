"""Sweep files validated by W&B's engine, agent command lines parsed by our CLI, a local grid."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from melanoma_mil.cli import main, parse
from melanoma_mil.config import ModelConfig, SweepConfig
from melanoma_mil.data.synthetic import make_bag_cohort
from melanoma_mil.errors import UserError
from melanoma_mil.evaluation.sweep_ledger import LEDGER_LOCK, Ledger
from melanoma_mil.evaluation.sweep_plan import (
    _engine,
    _sweep_run,
    fit_config,
    load_sweep,
    overrides,
)
from melanoma_mil.tracking.loggers import SWEEP_METRIC

REPO = Path(__file__).resolve().parents[1]
SWEEP_FILES = sorted((REPO / "sweeps").glob("*.yaml"))


def agent_argv(spec: dict, params: dict) -> list[str]:
    """The argv `wandb agent` builds from the file's command, minus `env python -m melanoma_mil`."""
    args = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    argv: list[str] = []
    for token in spec["command"]:
        if token in ("${env}", "${interpreter}"):
            continue
        argv += args["args_no_hyphens"] if token == "${args_no_hyphens}" else [str(token)]
    assert argv[:2] == ["-m", "melanoma_mil"]
    return argv[2:]


def get(cfg: object, dotted: str) -> object:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_sweep_files_validate_and_their_agent_commands_parse(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_sweep(path)  # W&B's schema + every parameter is a fit key
    base = REPO / "configs" / "godson2022.yaml"
    assert base.is_file(), f"{base} (the paper's setting, issue 2) is missing"
    assert spec["metric"] == {"name": SWEEP_METRIC, "goal": "maximize"}
    sweeps = _engine()
    monkeypatch.chdir(REPO)  # the agent runs from the repository (configs/ paths are relative)
    monkeypatch.setenv("WANDB_RUN_ID", "run123")
    runs: list = []
    grid = math.prod(len(v.get("values", [0])) for v in spec["parameters"].values())
    for _ in range(grid if spec["method"] == "grid" else 3):
        suggestion = sweeps.next_run(spec, runs, validate=True)
        assert suggestion is not None
        params = {k: v["value"] for k, v in suggestion.config.items()}
        command, cfg, _ = parse(agent_argv(spec, params))
        assert command == "fit" and cfg.logger == "wandb"
        assert cfg.data.features_dir and cfg.data.labels_csv  # what every fit reads first
        assert list(cfg.data.classes) == ["immune_low", "immune_high"]  # topk ranks by the last
        assert cfg.output_dir.endswith("/run123")
        assert not any(k.startswith("cv.") for k in params)  # every run on the same folds
        for key, value in params.items():
            expected = pytest.approx(value) if isinstance(value, float) else value
            assert get(cfg, key) == expected, key
        metrics = {SWEEP_METRIC: 0.6 + 0.01 * len(runs)}
        entry = {"name": f"r{len(runs)}", "state": "finished", "params": params}
        runs.append(_sweep_run(entry | {"metrics": metrics}))
    if spec["method"] == "grid":  # every combination exactly once
        assert sweeps.next_run(spec, runs, validate=True) is None
        assert len({tuple(r.config[k]["value"] for k in spec["parameters"]) for r in runs}) == grid
    else:  # the metric reaches the bayes engine
        nxt = sweeps.next_run(spec, runs, validate=True)
        assert "no valid samples" not in nxt.search_info["warnings"]


def local_argv(path: Path) -> list[str]:
    """The file's `local:` example (a comment, continued by trailing backslashes) as argv."""
    lines = [line.lstrip("#").strip() for line in path.read_text().splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("local:"))
    text = lines[start].removeprefix("local:")
    for line in lines[start + 1 :]:
        if not text.endswith("\\"):
            break
        text = text[:-1] + " " + line
    argv = shlex.split(text)  # as a shell reads it: quotes removed
    assert argv[:3] == ["python", "-m", "melanoma_mil"], text
    return argv[3:]


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_every_sweeps_local_example_gives_fits_with_features_and_labels(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    command, cfg, _ = parse(local_argv(path))
    assert command == "sweep" and Path(cfg.sweep_file) == Path("sweeps") / path.name
    spec = load_sweep(path)
    first = _engine().next_run(spec, [], validate=True)
    params = {k: v["value"] for k, v in first.config.items()}
    fit = fit_config(cfg, params, Path("runs/x"))
    assert fit.data.features_dir and fit.data.labels_csv
    assert list(fit.data.classes) == ["immune_low", "immune_high"]  # topk ranks by the last


def test_the_readmes_sweep_path_run_from_a_cohort_folder_names_the_repositorys_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sweep sweeps/models.yaml` is relative to the clone (as sweeps/README's commands are);
    run from a cohort's folder the error gives the full path of the clone's file."""
    monkeypatch.chdir(tmp_path)
    clone = Path(__file__).resolve().parents[1] / "sweeps" / "models.yaml"
    with pytest.raises(UserError, match=f"not found in {tmp_path}: the repository's is {clone}"):
        load_sweep("sweeps/models.yaml")


def test_a_sweep_folder_or_device_given_for_the_file_is_named_so_not_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`sweep sweeps/` (a tab-completed folder) said 'not found' beside the folder; it is named
    a folder, with its sweep files, and /dev/null is not a regular file, as for --config."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(UserError, match=r"'sweeps' is a folder, not a YAML file: .*models\.yaml"):
        load_sweep("sweeps/")
    with pytest.raises(UserError, match=f"'{os.devnull}' is not a regular file"):
        load_sweep(os.devnull)


def test_bad_sweep_files_are_user_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"method": "grid", "parameters": {"optim.lrr": {"values": [1]}}}))
    with pytest.raises(UserError, match="Did you mean 'optim.lr'"):
        load_sweep(bad)
    bad.write_text(yaml.safe_dump({"method": "annealing", "parameters": {"seed": {"values": [1]}}}))
    with pytest.raises(UserError, match="is invalid"):
        load_sweep(bad)
    with pytest.raises(UserError, match="not found"):
        load_sweep(tmp_path / "missing.yaml")
    bad.write_text("method: grid\nparameters: [seed]\n")  # the engine's schema accepts it
    with pytest.raises(UserError, match="parameters is not a mapping"):
        load_sweep(bad)
    bad.write_text("method: grid\nparameters:\n  1: {values: [2]}\n")
    with pytest.raises(UserError, match="parameter '1' is not a fit key"):
        load_sweep(bad)
    nested = {"optim": {"parameters": {"lr": {"values": [1]}}}}
    bad.write_text(yaml.safe_dump({"method": "grid", "parameters": nested}))
    with pytest.raises(UserError, match="'optim' nests parameters.* e.g. 'optim.lr:'"):
        load_sweep(bad)  # W&B's nested form: was "not a fit key. Did you mean 'optim.lr'?"
    bad.write_text("method: grid\nparameters:\n  seed: {values: [1]}\n  seed: {values: [2]}\n")
    with pytest.raises(UserError, match="not valid YAML: found duplicate key 'seed' at line 4"):
        load_sweep(bad)  # yaml.safe_load kept the last 'seed' silently


@pytest.mark.parametrize(
    ("key", "values", "why"),
    [
        ("cv.folds", [2, 3], "one set of splits"),
        ("cv.seed", [0, 1], "one set of splits"),
        ("cv.repeats", [1, 2], "one set of splits"),
        ("cv.val_fraction", [0.1, 0.3], "one set of splits"),
        ("cv.splits_file", ["a/splits.json"], "one set of splits"),
        ("output_dir", ["elsewhere"], "<output_dir>/<NNN>_<parameters>"),
        ("experiment", ["mine"], "named after its folder"),
        ("overwrite", [True], "on the command line"),
        ("data.bag_level", ["slide", "patient"], "same bags and labels"),
        ("data.label_map", [{"0": "low"}], "same bags and labels"),
        ("data.label_column", ["a", "b"], "same bags and labels"),
    ],
)
def test_parameters_the_sweep_sets_itself_are_refused_before_any_work(
    tmp_path: Path, key: str, values: list, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every run uses the first run's splits and its own folder: such a parameter would be
    accepted and then silently ignored."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"method": "grid", "parameters": {key: {"values": values}}}))
    out = tmp_path / "out"
    assert main(["sweep", str(bad), f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"parameter '{key}' cannot be swept" in err and why in err and "\n" not in err, err
    assert not out.exists()


def test_a_method_the_engine_cannot_plan_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """W&B's schema accepts `method: custom`; the engine raised ValueError at the first run,
    the output folder already claimed."""
    custom = tmp_path / "custom.yaml"
    custom.write_text(yaml.safe_dump({"method": "custom", "parameters": {"seed": {"values": [1]}}}))
    out = tmp_path / "out"
    assert main(["sweep", str(custom), "--count", "1", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"'{custom}': method 'custom'" in err and "grid, random, bayes" in err, err
    assert "\n" not in err and not out.exists()


@pytest.mark.parametrize(
    "spec, problem",
    [
        ({"method": "grid", "parameters": {"optim.lr": {"min": 0.1, "max": 0.2}}}, "grid search"),
        ({"method": "bayes", "parameters": {"optim.lr": {"min": 0.1, "max": 0.2}}}, "metric"),
    ],
    ids=["grid-of-a-distribution", "bayes-without-metric"],
)
def test_a_sweep_the_engine_cannot_plan_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: dict, problem: str
) -> None:
    """Valid for W&B's schema, but the engine raised ValueError at the first run, the output
    folder already claimed."""
    features, labels = make_bag_cohort(tmp_path / "c", n_patients=8, dim=4)
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    argv = ["sweep", str(sweep_file), "--count", "1", f"output_dir={out}",
            f"data.features_dir={features}", f"data.labels_csv={labels}"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"sweep file '{sweep_file}' cannot be planned" in err and problem in err, err
    assert "\n" not in err and not out.exists()


def test_count_without_a_number_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"method": "grid", "parameters": {"seed": {"values": [1]}}}))
    out = tmp_path / "out"
    for rest in ([], ["--config", "x.yaml"], [f"output_dir={out}"]):
        assert main(["sweep", str(grid), "--count", *rest]) == 2
        err = capsys.readouterr().err.strip()
        assert err == "error: --count needs a number of runs: sweep SWEEP.yaml --count N.", err
    assert parse(["sweep", str(grid), "--count", "3"])[1].count == 3
    assert not out.exists()


def test_every_sweep_value_is_checked_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    out = tmp_path / "out"
    for param, fix in (
        ({"model.name": {"values": ["abmil", "abmi"]}}, "model.name='abmi' is not one of"),
        ({"model.dropout": {"min": 0.0, "max": 1.5}}, "model.dropout=1.5 must be in [0, 1)"),
        ({"seed": {"values": [0, None]}}, "'seed'"),
    ):
        bad.write_text(yaml.safe_dump({"method": "grid", "parameters": param}))
        assert main(["sweep", str(bad), f"output_dir={out}"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"sweep file '{bad}', parameter" in err and fix in err and "\n" not in err, err
        assert not out.exists()


@pytest.mark.parametrize(("value", "became"), [("007", "'7'"), ("yes", "'True'"), ("a #b", "'a'")])
def test_a_text_value_the_agent_would_change_is_refused_before_any_work(
    tmp_path: Path, value: str, became: str
) -> None:
    """The agent passes `key=value` unquoted, read as YAML: '007' trained as wandb.project='7'
    (here and under the agent) while the file, ledger and results table said '007'."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"method": "grid", "parameters": {"wandb.project": {"values": [value]}}})
    )
    with pytest.raises(UserError, match=f"value '{value}' reaches fit as {became}"):
        load_sweep(bad)
    quoted = f"'{value}'"  # the fix the error names: the same value here and under the agent
    bad.write_text(
        yaml.safe_dump({"method": "grid", "parameters": {"wandb.project": {"values": [quoted]}}})
    )
    load_sweep(bad)
    params = {"wandb.project": quoted}
    assert fit_config(SweepConfig(), params, Path("runs/x")).wandb.project == value
    assert parse(["fit", *overrides(params)])[1].wandb.project == value


@pytest.mark.parametrize(
    ("key", "value"),
    [("data.features_dir", "~/features/uni"), ("data.store_dir", "~/store"),
     ("optim.lr", "5e-4"), ("data.features_dir", "features/uni-1 2")],
)  # fmt: skip
def test_a_text_value_fit_reads_as_written_is_accepted(
    tmp_path: Path, key: str, value: str
) -> None:
    """'~/x' reaches fit as the home folder's x, as it does from the command line or a config
    file: fit's own reading, not the agent's YAML, so not a changed value."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"method": "grid", "parameters": {key: {"values": [value]}}}))
    load_sweep(sweep)


def test_a_null_sweep_value_unsets_an_optional_key_here_and_under_the_agent() -> None:
    params = {"model.hidden_dim": None, "data.max_instances": 64}
    fit = fit_config(SweepConfig(model=ModelConfig(hidden_dim=32)), params, Path("runs/x"))
    assert fit.model.hidden_dim is None and fit.data.max_instances == 64
    _, cfg, _ = parse(["fit", "model.hidden_dim=32", *overrides(params)])  # `key=None`
    assert cfg.model.hidden_dim is None and cfg.data.max_instances == 64


def test_a_run_whose_sampled_value_is_invalid_is_recorded_and_the_sweep_goes_on(
    tmp_path: Path,
) -> None:
    """Distributions are sampled at run time: a value out of range fails that run only."""
    spec = {
        "method": "random",
        "parameters": {"optim.lr": {"distribution": "normal", "mu": -1.0, "sigma": 1e-6}},
    }
    sweep_file = tmp_path / "neg.yaml"
    sweep_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    features, labels = make_bag_cohort(tmp_path / "coh", n_patients=12, dim=16)
    inputs = [f"data.features_dir={features}", f"data.labels_csv={labels}"]
    assert main(["sweep", str(sweep_file), "--count", "2", f"output_dir={out}", *inputs]) == 1
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["state"] for r in runs] == ["failed", "failed"]
    assert all("optim.lr=" in r["error"] and "must be > 0" in r["error"] for r in runs)


@pytest.mark.parametrize("ledger", ["{not json", "[1, 2]", '{"sweep": {}, "runs": 3}'])
def test_a_damaged_sweep_ledger_is_refused_before_any_fit(
    tmp_path: Path, ledger: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sweep.json that is not a ledger (a crash mid-write elsewhere, a foreign file) stops the
    sweep with a one-line error, and is kept as it is."""
    sweep_file = tmp_path / "grid.yaml"
    sweep_file.write_text(
        yaml.safe_dump({"method": "grid", "parameters": {"seed": {"values": [1, 2]}}})
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.json").write_text(ledger)
    assert main(["sweep", str(sweep_file), f"output_dir={out}"]) == 2
    assert "is not a sweep ledger" in capsys.readouterr().err
    assert (out / "sweep.json").read_text() == ledger
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json"]


def test_a_metric_without_goal_is_refused(tmp_path: Path, capsys) -> None:
    """The sweeps engine (as wandb) minimizes a metric without goal; the table would rank it
    the other way: both must agree, so the goal is asked for."""
    spec = {
        "method": "grid",
        "metric": {"name": "cv/auc_mean"},
        "parameters": {"seed": {"values": [1]}},
    }
    sweep_file = tmp_path / "grid.yaml"
    sweep_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    assert main(["sweep", str(sweep_file), f"output_dir={out}"]) == 2
    assert "needs goal: maximize or goal: minimize" in capsys.readouterr().err
    assert not out.exists()


def test_a_folder_of_yours_is_not_taken_over(tmp_path: Path, capsys) -> None:
    """A folder without a sweep's marker holding a sweep_results.csv, or a comparison/ that is
    not the sweep's: refused before any fit, and nothing written into it."""
    features, labels = make_bag_cohort(tmp_path / "c", n_patients=8, dim=4)
    sweep_file = tmp_path / "grid.yaml"
    sweep_file.write_text(
        yaml.safe_dump({"method": "grid", "parameters": {"seed": {"values": [1, 2]}}})
    )
    out = tmp_path / "out"
    (out / "comparison").mkdir(parents=True)
    (out / "comparison" / "comparison.csv").write_text("mine")
    argv = ["sweep", str(sweep_file), f"output_dir={out}", f"data.features_dir={features}",
            f"data.labels_csv={labels}"]  # fmt: skip
    assert main(argv) == 2
    assert "not this sweep's comparison" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["comparison"]  # no marker written
    (out / "sweep_results.csv").write_text("mine")
    shutil.rmtree(out / "comparison")
    assert main(argv) == 2
    assert "sweep_results.csv from an unknown sweep" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["sweep_results.csv"]
    assert (out / "sweep_results.csv").read_text() == "mine"


def test_local_grid_of_two_encoders_gives_two_paired_fits_and_a_comparison(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two "encoders": the same slides encoded at different widths, with a planted signal.
    caches = []
    for name, dim in (("enc_a", 16), ("enc_b", 24)):
        features, labels = make_bag_cohort(
            tmp_path / name, n_patients=12, dim=dim, n_instances=(4, 10), encoder=name
        )
        caches.append(str(features))
    caches.append(str(tmp_path / "no_such_cache"))  # a broken run is recorded, the rest go on
    spec = {
        "method": "grid",
        "metric": {"name": SWEEP_METRIC, "goal": "maximize"},
        "parameters": {"data.features_dir": {"values": caches}, "seed": {"values": [0]}},
    }
    sweep_file = tmp_path / "enc.yaml"
    sweep_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "sweep"
    argv = [
        "sweep",
        str(sweep_file),
        f"data.labels_csv={labels}",
        f"output_dir={out}",
        "cv.folds=2",
        "trainer.max_epochs=2",
        "trainer.min_epochs=1",
        "logger=none",
    ]
    assert main(argv) == 1  # non-zero: one run failed
    ledger = json.loads((out / "sweep.json").read_text())
    assert [r["state"] for r in ledger["runs"]] == ["finished", "finished", "failed"]
    assert "not found" in ledger["runs"][2]["error"]
    dirs = [out / r["name"] for r in ledger["runs"][:2]]
    assert dirs[0].name == "000_features_dir-features_seed-0"
    summaries = [json.loads((d / "cv_summary.json").read_text()) for d in dirs]
    assert summaries[0]["splits_sha256"] == summaries[1]["splits_sha256"]  # shared splits
    assert [s["encoder"] for s in summaries] == ["enc_a", "enc_b"]
    results = pd.read_csv(out / "sweep_results.csv")
    assert sorted(results[SWEEP_METRIC].dropna()) == sorted(s["auc"]["mean"] for s in summaries)
    table = pd.read_csv(out / "comparison" / "comparison.csv")
    assert list(table.encoder) == ["enc_a", "enc_b"] and table.is_reference.tolist() == [
        True,
        False,
    ]
    assert (out / "comparison" / "comparison.png").is_file()
    assert "| enc_b |" in capsys.readouterr().out.replace(dirs[1].name, "")
    # Running it again resumes: the grid is done, nothing is refitted.
    stamp = (dirs[0] / "cv_summary.json").stat().st_mtime_ns
    assert main(argv) == 1
    assert len(json.loads((out / "sweep.json").read_text())["runs"]) == 3
    assert (dirs[0] / "cv_summary.json").stat().st_mtime_ns == stamp
    # and rewrites the comparison it made, never a folder of yours
    made = (out / "comparison" / "comparison.csv").read_text()
    (out / "comparison" / "comparison.csv").write_text("stale")
    assert main(argv) == 1
    assert (out / "comparison" / "comparison.csv").read_text() == made
    # Your own `compare` into that folder must ask, and is then never taken for the sweep's.
    mine = ["compare", *map(str, dirs), f"output_dir={out / 'comparison'}", "bootstrap=100"]
    assert main(mine) == 2
    assert "overwrite=true" in capsys.readouterr().err
    assert main([*mine, "overwrite=true"]) == 0
    yours = (out / "comparison" / "comparison.md").read_text()
    assert main(argv) == 2
    assert "not this sweep's comparison" in capsys.readouterr().err
    assert (out / "comparison" / "comparison.md").read_text() == yours
    (out / "comparison" / ".melanoma-mil.json").unlink()  # as if made before markers existed
    (out / "comparison" / "comparison.csv").write_text("yours")
    results = (out / "sweep_results.csv").read_bytes()
    (out / "sweep_results.csv").write_bytes(b"untouched")
    assert main(argv) == 2  # refused before any work: not even the results table is rewritten
    assert "comparison.csv" in capsys.readouterr().err
    assert (out / "comparison" / "comparison.csv").read_text() == "yours"
    assert (out / "sweep_results.csv").read_bytes() == b"untouched" != results


def test_a_ledger_writer_killed_before_its_rename_leaves_no_temp_file_after_the_next(
    tmp_path: Path,
) -> None:
    """A sweep process SIGKILLed between writing sweep.json's temp file and renaming it left
    `.sweep.json.<random>.tmp` in the sweep folder for good (one per kill); the ledger is
    written only under its lock, so the next process to hold it removes a dead writer's."""
    ledger = tmp_path / "sweep.json"
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from melanoma_mil.evaluation.sweep_ledger import Ledger\n"
        "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        "with Ledger(Path(sys.argv[1]), {}, {}, 'sweep.yaml').held(anew=True) as runs:\n"
        "    runs.append({'name': 'r0'})\n"
    )
    killed = subprocess.run([sys.executable, "-c", code, str(ledger)], timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in tmp_path.glob(".sweep.json.*.tmp")] != []  # the kill came mid-write
    with Ledger(ledger, {}, {}, "sweep.yaml").held(anew=True) as runs:
        runs.append({"name": "r0"})
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != LEDGER_LOCK) == ["sweep.json"]
