"""The benchmark table (benchmarks/mil_report.py) reads the run files as they are written."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from melanoma_mil.io import write_json

_SPEC = importlib.util.spec_from_file_location(
    "mil_report", Path(__file__).parents[1] / "benchmarks" / "mil_report.py"
)
assert _SPEC is not None and _SPEC.loader is not None
mil_report = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(mil_report)


@pytest.mark.parametrize("kind", ["fit", "reference"])
def test_an_undefined_fold_auc_is_left_out_of_the_mean(tmp_path: Path, kind: str) -> None:
    """A test fold with one class has no AUC: NaN, which the files (strict JSON) hold as null;
    the table's mean AUC is over the other folds, as it was when the files held NaN."""
    per_fold = {"accuracy": [0.75, 0.5, 1.0], "auc": [0.8, math.nan, 0.6]}
    if kind == "fit":
        write_json(tmp_path / "cv_summary.json", {m: {"per_fold": v} for m, v in per_fold.items()})
    else:
        write_json(tmp_path / "reference_summary.json", per_fold)
    got = mil_report.scores(tmp_path)
    assert got is not None
    assert got["auc"] == pytest.approx(0.7) and got["accuracy"] == pytest.approx(0.75)
    assert math.isnan(got["folds"]["auc"][1])
