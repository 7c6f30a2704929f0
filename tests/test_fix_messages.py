"""Refusals that named a problem but no fix: each is one line naming the file or folder, the
problem and what to do instead, exit 2, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Pipeline

from melanoma_mil.cli import main


def one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_compare_given_a_feature_folder_says_what_to_pass_instead(
    pipe: Pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said only "is not a `fit` run (no .melanoma-mil.json)"."""
    out = tmp_path / "cmp"
    for folder in (pipe.features, pipe.features.parent):  # a cache, extract's output_dir
        err = one_line_error(capsys, "compare", str(folder), str(pipe.run_dir), f"output_dir={out}")
        assert f"run_dir '{folder}'" in err
        assert err.endswith("pass the output_dir of a `fit` run instead (the folder holding "
                            "cv_summary.json).")  # fmt: skip
    assert not out.exists()


def _sweep_error(text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, str]:
    """A sweep file holding ``text``, and the one-line error `sweep` gives for it."""
    sweep = tmp_path / "s.yaml"
    sweep.write_text(text)
    return sweep, one_line_error(capsys, "sweep", str(sweep), f"output_dir={tmp_path / 'out'}")


@pytest.mark.parametrize(("text", "held"), [("- a\n- b\n", "a list"), ("grid\n", "a value"),
                                            ("", "nothing")])  # fmt: skip
def test_a_sweep_file_that_is_no_mapping_says_how_to_write_one(
    text: str, held: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The engine's "Sweep config must be parsable as a JSON object.." (sic), with no fix."""
    sweep, err = _sweep_error(text, tmp_path, capsys)
    assert err == (
        f"error: sweep file '{sweep}' holds {held}, not a mapping of keys: write `method: grid` "
        "and `parameters:` with one fit key each (values: [...]), as sweeps/models.yaml does."
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "fix"),
    [
        ("parameters: {seed: {values: [1]}}\n", "'method' is a required property; add that key"),
        ("method: grd\nparameters: {seed: {values: [1]}}\n", "; use one of those."),
        ("method: grid\nparameters: {seed: {valuez: [1]}}\n", "; give each parameter values: "),
    ],
)
def test_a_sweep_file_the_engine_refuses_says_the_fix_once(
    text: str, fix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep, err = _sweep_error(text, tmp_path, capsys)
    assert err.startswith(f"error: sweep file '{sweep}' is invalid: ") and fix in err
    assert ".." not in err and ". See" not in err


def test_a_missing_sweep_file_names_the_nearest_file_or_what_is_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said only "not found: check the path"."""
    (tmp_path / "models.yaml").write_text("method: grid\n")
    err = one_line_error(capsys, "sweep", str(tmp_path / "model.yaml"))
    assert err == f"error: sweep file '{tmp_path / 'model.yaml'}' not found: did you mean " \
        f"{tmp_path / 'models.yaml'}?"  # fmt: skip
    err = one_line_error(capsys, "sweep", str(tmp_path / "zzzz.yaml"))
    assert err.endswith(f"not found: {tmp_path} holds ['models.yaml']: name one of them.")
    err = one_line_error(capsys, "sweep", str(tmp_path / "none" / "a.yaml"))
    assert err.endswith(f"not found: check the path (there is no folder '{tmp_path / 'none'}').")
