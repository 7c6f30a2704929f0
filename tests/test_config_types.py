"""A value of the wrong type, on the command line, in a config file or a sweep file: one line
with the key, the value given, the type the key takes and a value it would take, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from melanoma_mil.cli import main


def one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize(
    ("command", "override", "expected"),
    [
        ("fit", "seed=a", "seed=a: expected an integer; pass e.g. seed=0."),
        ("fit", "trainer.max_epochs=1.5", "trainer.max_epochs=1.5: expected an integer (or null); "
         "pass e.g. trainer.max_epochs=1."),
        ("fit", "data.standardize=maybe", "data.standardize=maybe: expected true or false; pass "
         "e.g. data.standardize=true."),
        ("fit", "optim.lr=fast", "optim.lr=fast: expected a number; pass e.g. optim.lr=0.0005."),
        ("fit", "cv.run_folds=[a]", "cv.run_folds=[a]: expected a list of integers; pass e.g. "
         "'cv.run_folds=[0,1]'."),
        ("fit", "data.classes=a", "data.classes=a: expected a list; pass e.g. "
         "'data.classes=[a,b]'."),
        ("tile", "tiling.tissue.saturation_threshold=x", "tiling.tissue.saturation_threshold=x: "
         "expected a number (or null); pass e.g. tiling.tissue.saturation_threshold=0.5."),
        ("extract", "overwrite=maybe", "overwrite=maybe: expected true or false; pass e.g. "
         "overwrite=false."),
        ("evaluate", "bootstrap=many", "bootstrap=many: expected an integer; pass e.g. "
         "bootstrap=2000."),
    ],
)  # fmt: skip
def test_a_wrong_type_override_names_key_value_type_and_fix(
    command: str, override: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """OmegaConf's "Value 'a' of type 'str' could not be converted to Integer" said no fix."""
    out = tmp_path / "out"
    assert one_line_error(capsys, command, f"output_dir={out}", override) == f"error: {expected}"
    assert not out.exists()


def test_a_wrong_type_in_a_config_file_names_the_file_and_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  standardize: maybe\n")
    err = one_line_error(capsys, "fit", "--config", str(config))
    assert err == (
        f"error: data.standardize=maybe in config file '{config}': expected true or false; "
        "set it to e.g. true."
    )


def test_a_wrong_type_in_a_sweep_file_names_the_file_and_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "s.yaml"
    sweep.write_text("method: grid\nparameters:\n  seed:\n    values: [0, a]\n")
    out = tmp_path / "sweep"
    err = one_line_error(capsys, "sweep", str(sweep), f"output_dir={out}")
    assert err == (
        f"error: sweep file '{sweep}', parameter 'seed': seed=a: expected an integer; use e.g. "
        "0 instead."
    )
    assert not out.exists()


@pytest.mark.parametrize("value", ["@x", "[a", "`x"])
def test_a_value_yaml_reads_as_syntax_is_one_line_with_the_quoted_form(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A path starting with @, ` or [ crashed the parse with a yaml ScannerError traceback."""
    out = tmp_path / "out"
    err = one_line_error(capsys, "fit", f"output_dir={out}", f"data.labels_csv={value}")
    assert f"cannot parse override 'data.labels_csv={value}'" in err
    assert f"""pass 'data.labels_csv="{value}"'.""" in err
    assert not out.exists()


@pytest.mark.parametrize("given", ["[1]", "{b: c}"])
def test_a_list_or_mapping_as_a_label_maps_value_is_refused_at_parse_time(
    given: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """OmegaConf let it into dict[str, str]: fit read the cohort, then crashed with a
    ValidationError traceback ("Cannot convert 'list' to string") while planning the run."""
    out = tmp_path / "out"
    err = one_line_error(capsys, "fit", f"output_dir={out}", f"data.label_map.low={given}")
    assert err.startswith("error: data.label_map.low=")
    assert err.endswith(": expected text, one value per key; give e.g. data.label_map.low=low.")
    assert not out.exists()
