"""Fixed config choices and config files: refused at parse time, in one line, before any work."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.strategies import StrategyRegistry

from melanoma_mil import config as C
from melanoma_mil.cli import main
from melanoma_mil.errors import UserError


def one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the CLI, expect exit 2 and a single `error:` line; return that line."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_strategy_and_accelerator_names_are_lightnings() -> None:
    assert set(C.STRATEGIES) == {"auto", *StrategyRegistry.available_strategies()}
    assert set(C.ACCELERATORS) == {"auto", "gpu", *AcceleratorRegistry.available_accelerators()}


@pytest.mark.parametrize(
    ("override", "meant"),
    [
        ("trainer.strategy=dpp", "ddp"),
        ("trainer.accelerator=cdua", "cuda"),
        ("wandb.mode=offlne", "offline"),
        ("model.name=ABMIL", "abmil"),
        ("data.balance=samplr", "sampler"),
    ],
)
def test_a_misspelt_choice_is_refused_before_the_run_folder_exists(
    override: str, meant: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    err = one_line_error(capsys, "fit", f"output_dir={out}", override)
    key, value = override.split("=")
    assert f"{key}='{value}' is not one of" in err and f"did you mean '{meant}'?" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "override",
    [
        "tiling.tissue.saturation_threshold=2",
        "tiling.tissue.min_saturation=-0.1",
        "tiling.tissue.close_size=-3",
        "tiling.tissue.blur=-1",
        "tiling.tissue.min_area_um2=-5",
    ],
)
def test_tissue_settings_out_of_range_are_refused_before_tiling(
    override: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tiles"
    err = one_line_error(capsys, "tile", f"slides_dir={tmp_path}", f"output_dir={out}", override)
    assert override.split("=")[0] in err
    assert not out.exists()


@pytest.mark.parametrize("override", ["seed=-1", "cv.seed=4294967296"])
def test_seeds_numpy_and_lightning_refuse_are_refused_before_the_run_folder(
    override: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    err = one_line_error(capsys, "fit", f"output_dir={out}", override)
    assert f"{override} must be in [0, 4000000000]" in err
    assert not out.exists()


@pytest.mark.parametrize("mode", ["online", "offline", "disabled", "null"])
def test_every_wandb_mode_and_null_parse(mode: str) -> None:
    cfg = C.load_config(C.FitConfig, dotlist=[f"wandb.mode={mode}", "trainer.strategy=ddp"])
    assert cfg.wandb.mode == (None if mode == "null" else mode)
    assert cfg.trainer.strategy == "ddp"


def test_a_config_file_that_is_a_list_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    listed = tmp_path / "list.yaml"
    listed.write_text("- seed: 1\n- model.name: abmil\n")
    err = one_line_error(capsys, "fit", "--config", str(listed), "--print-config")
    assert str(listed) in err and "not a mapping" in err and "key: value" in err


def test_the_readmes_config_path_run_from_a_cohort_folder_names_the_repositorys_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's `--config configs/godson2022.yaml` is relative to the clone; run from a
    cohort's folder the error gives the full path of the clone's file."""
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, "fit", "--config", "configs/godson2022.yaml", "--print-config")
    clone = Path(__file__).resolve().parents[1] / "configs" / "godson2022.yaml"
    assert f"not found in {tmp_path}: the repository's is --config {clone}" in err, err
    err = one_line_error(capsys, "fit", "--config", "configs/nothing.yaml", "--print-config")
    assert "'configs/nothing.yaml' not found: check the --config path" in err, err


def test_a_folder_given_for_a_file_is_named_a_folder_not_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "labels"
    folder.mkdir()
    err = one_line_error(capsys, "fit", "--config", str(folder), "--print-config")
    assert f"'{folder}' is a folder, not a YAML file" in err, err
    err = one_line_error(capsys, "fit", "--config", os.devnull, "--print-config")
    assert f"'{os.devnull}' is not a regular file" in err, err
    a_file = tmp_path / "results.txt"
    a_file.write_text("x")
    err = one_line_error(capsys, "compare", f"run_dirs=[{a_file},{a_file}]",
                         f"output_dir={tmp_path / 'cmp'}")  # fmt: skip
    assert f"run_dir '{a_file}' is a file: pass the output_dir" in err, err
    keys = [f"data.labels_csv={folder}", f"data.features_dir={tmp_path}", "logger=none"]
    err = one_line_error(capsys, "fit", *keys, f"output_dir={tmp_path / 'run'}")
    assert f"'{folder}' is a folder, not a CSV file: check data.labels_csv" in err, err
    assert not (tmp_path / "run").exists()


def test_an_unresolvable_interpolation_names_its_key_and_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MELANOMA_MIL_UNSET", raising=False)
    file = tmp_path / "interp.yaml"
    file.write_text("output_dir: ${oc.env:MELANOMA_MIL_UNSET}/runs\n")
    err = one_line_error(capsys, "fit", "--config", str(file), "--print-config")
    assert f"'output_dir' in config file '{file}'" in err and "MELANOMA_MIL_UNSET" in err
    override = "data.features_dir=${no_such_key}"
    err = one_line_error(capsys, "fit", override, "--print-config")
    assert f"'data.features_dir' in override '{override}'" in err
    monkeypatch.setenv("MELANOMA_MIL_UNSET", str(tmp_path))
    cfg = C.load_config(C.FitConfig, files=[str(file)])
    assert cfg.output_dir == f"{tmp_path}/runs"


def test_paths_holding_an_equals_sign_are_positional_not_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run folders named by their setting (runs/lr=1) are common; no config key has a '/'."""
    from melanoma_mil.cli import parse

    _, cfg, _ = parse(["compare", "runs/lr=1", "runs/lr=2", "output_dir=cmp"])
    assert cfg.run_dirs == ["runs/lr=1", "runs/lr=2"] and cfg.output_dir == "cmp"
    (tmp_path / "lr=3").mkdir()  # an existing folder named like an override
    monkeypatch.chdir(tmp_path)
    assert parse(["compare", "lr=3", "runs/lr=2"])[1].run_dirs == ["lr=3", "runs/lr=2"]
    _, cfg, _ = parse(["evaluate", "runs/lr=1/predictions.csv", "bootstrap=200"])
    assert cfg.predictions == "runs/lr=1/predictions.csv" and cfg.bootstrap == 200


def test_a_section_given_one_value_names_it_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = one_line_error(capsys, "fit", "wandb=offline")
    assert "'wandb' is a group of keys, not a value" in err and "wandb.KEY=value" in err
    config = tmp_path / "run.yaml"
    config.write_text("trainer:\n  max_epochs: 3\ncv: 5\n")
    err = one_line_error(capsys, "fit", "--config", str(config))
    assert str(config) in err and "'cv' is a group of keys" in err


def test_a_home_folder_in_a_path_is_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shell expands ~ only at the start of a word: not in a.b=~/x, nor in a YAML file."""
    from melanoma_mil.config import CompareConfig, FitConfig, load_config

    monkeypatch.setenv("HOME", str(tmp_path))
    config = tmp_path / "run.yaml"
    config.write_text("output_dir: ~/runs/a\n")
    cfg = load_config(FitConfig, [str(config)], ["data.features_dir=~/features"])
    assert (
        cfg.output_dir == f"{tmp_path}/runs/a" and cfg.data.features_dir == f"{tmp_path}/features"
    )
    assert load_config(CompareConfig, [], ["run_dirs=[~/a,b]"]).run_dirs == [f"{tmp_path}/a", "b"]


def test_a_yaml_syntax_error_is_one_line_with_its_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("trainer:\n  max_epochs: [3\n")
    err = one_line_error(capsys, "fit", "--config", str(config))
    assert f"config file '{config}' is not valid YAML:" in err and "at line 3, column 1" in err


def test_an_override_of_a_key_with_a_hyphen_stays_an_override(tmp_path: Path) -> None:
    """Only a '/' (or '\\') before the '=' makes an argument a path: label names may hold '-'."""
    from melanoma_mil.cli import parse

    sweep = tmp_path / "s.yaml"
    _, cfg, _ = parse(["sweep", str(sweep), "data.label_map.in-situ=melanoma"])
    assert cfg.sweep_file == str(sweep) and cfg.data.label_map == {"in-situ": "melanoma"}


@pytest.mark.parametrize(
    ("command", "given", "key"),
    [
        ("fit", "cv.run_folds={a: 1}", "cv.run_folds"),
        ("fit", "data.label_map=[a, b]", "data.label_map"),
        ("tile", "extensions:\n  svs: 1\n", "extensions"),  # in a config file
    ],
)
def test_a_list_given_for_a_mapping_or_the_reverse_is_one_line_naming_the_key(
    command: str, given: str, key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """OmegaConf's merge raised a bare TypeError (a traceback, exit 1) naming no key."""
    out = tmp_path / "out"
    args = [given]
    if "\n" in given:
        (tmp_path / "c.yaml").write_text(given)
        args = ["--config", str(tmp_path / "c.yaml")]
    err = one_line_error(capsys, command, f"output_dir={out}", *args)
    assert f"'{key}'" in err and "is expected" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("command", "override"),
    [
        ("fit", "optim.lr=inf"),
        ("fit", "optim.weight_decay=inf"),
        ("fit", "data.memory_gb=inf"),
        ("tile", "tiling.tissue.thumbnail_mpp=inf"),
        ("demo", "mpp=inf"),
    ],
)
def test_a_number_that_is_not_finite_is_refused_where_a_range_is_declared(
    command: str, override: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """inf passed every range without an upper end (lr=inf trained on NaN losses)."""
    out = tmp_path / "out"
    err = one_line_error(capsys, command, f"output_dir={out}", override)
    assert f"{override} must be a finite number" in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["compare", "evaluate", "demo"])
def test_a_negative_seed_is_refused_at_parse_time(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """compare and evaluate crashed with numpy's 'expected non-negative integer' traceback
    after reading the runs; demo refused it only after importing its whole pipeline."""
    from melanoma_mil.cli import parse

    with pytest.raises(UserError, match=r"seed=-1 must be"):
        parse([command, f"output_dir={tmp_path / 'out'}", "seed=-1"])
    assert parse([command, "seed=7"])[1].seed == 7


def test_the_demo_help_names_every_stage_it_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The demo ends with `evaluate` (report.html); both helps said it ended with heatmaps."""
    for argv in (["--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        line = next(x for x in out.splitlines() if "synthetic cohort" in x)
        assert "fit -> heatmaps -> evaluate" in line, line


@pytest.mark.parametrize(
    ("command", "override"),
    [("fit", "overwrite=2"), ("fit", "data.standardize=5"), ("fit", "overwrite=-1"),
     ("tile", "tiling.tissue.fill_holes=2"), ("fit", "trainer.deterministic='3'")],
)  # fmt: skip
def test_a_boolean_given_another_number_is_refused(
    command: str, override: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """OmegaConf takes any non-zero integer as true: 2 is more likely a slip than a yes."""
    out = tmp_path / "out"
    err = one_line_error(capsys, command, f"output_dir={out}", override)
    assert f"'{override.split('=')[0]}'" in err and "true or false" in err
    assert not out.exists()


def test_a_boolean_in_a_config_file_given_another_number_is_refused(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("data:\n  standardize: 2\n")
    with pytest.raises(UserError, match="'data.standardize' in config file .*true or false"):
        C.load_config(C.FitConfig, [str(tmp_path / "c.yaml")])


@pytest.mark.parametrize(
    ("override", "value"),
    [("overwrite=true", True), ("overwrite=False", False), ("overwrite=1", True),
     ("overwrite=0", False), ("overwrite=yes", True), ("data.standardize=off", False)],
)  # fmt: skip
def test_a_boolean_takes_true_false_and_0_1_as_before(override: str, value: bool) -> None:
    cfg = C.load_config(C.FitConfig, [], [override])
    key = override.split("=")[0]
    assert (cfg.overwrite if key == "overwrite" else cfg.data.standardize) is value


def test_a_tile_size_no_encoder_could_take_is_refused_saying_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tiles"
    err = one_line_error(capsys, "tile", f"output_dir={out}", "tiling.tile_size=100000")
    assert "tiling.tile_size=100000 must be in [8, 4096]" in err and "tiling.mpp" in err
    assert C.load_config(C.TileConfig, [], ["tiling.tile_size=4096"]).tiling.tile_size == 4096
    assert not out.exists()


@pytest.mark.parametrize(
    "override", ["output_dir=None", "output_dir=null", "data.label_column=None", "logger=None"]
)
def test_a_text_key_that_cannot_be_unset_refuses_none(
    override: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """None was taken as the text 'None' (output_dir=None wrote the run into ./None)."""
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, "fit", override)
    assert f"'{override.split('=')[0]}'" in err and "cannot be unset" in err
    assert list(tmp_path.iterdir()) == []


def test_none_unsets_an_optional_text_key_and_a_config_file_none_is_refused(tmp_path: Path):
    cfg = C.load_config(C.FitConfig, [], ["experiment=x", "experiment=None", "wandb.mode=None"])
    assert cfg.experiment is None and cfg.wandb.mode is None
    (tmp_path / "c.yaml").write_text("data:\n  label_column: None\n")
    with pytest.raises(UserError, match="'data.label_column' in config file .*cannot be unset"):
        C.load_config(C.FitConfig, [str(tmp_path / "c.yaml")])


def test_a_value_out_of_range_names_the_override_or_file_it_came_from(tmp_path: Path) -> None:
    """The error said "fix the override or config file" whichever had set the value."""
    from melanoma_mil.config import FitConfig, load_config

    file = tmp_path / "fit.yaml"
    file.write_text("cv:\n  seed: 4294967296\n")
    with pytest.raises(
        UserError, match=rf"cv.seed=4294967296 must be .*; fix it in config file '{file}'\.$"
    ):
        load_config(FitConfig, [str(file)], [])
    with pytest.raises(UserError, match=r"seed=-1 must be .*; fix the override 'seed=-1'\.$"):
        load_config(FitConfig, [str(file)], ["seed=-1", "cv.seed=1"])
    with pytest.raises(UserError, match=r"; fix the override 'cv=\{seed: -2\}'\.$"):
        load_config(FitConfig, [str(file)], ["cv={seed: -2}"])  # a whole section
