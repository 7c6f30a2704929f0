"""A resumed run is refused on other features, also for bags without a cache key (CLAM .pt)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_store import _fit_cli

from melanoma_mil import rundir
from melanoma_mil.cli import main
from melanoma_mil.config import FitConfig, load_config
from melanoma_mil.rundir import load_run


def _pt_cache(root: Path, name: str, dim: int, seed: int) -> Path:
    """CLAM pt_files/<id>.pt bags of 12 patients (no cache key anywhere)."""
    folder = root / name / "pt_files"
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    for p in range(12):
        x = torch.randn(10, dim, generator=gen)
        x[:3] += 3.0 * (p % 2)
        torch.save(x, folder / f"P{p:02d}.pt")
    return folder


@pytest.fixture
def caches(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """(labels.csv, a D=8 cache, another D=8 cache, a D=16 cache)."""
    labels = tmp_path / "labels.csv"
    rows = [{"slide_id": f"P{p:02d}", "label": "pos" if p % 2 else "neg"} for p in range(12)]
    pd.DataFrame(rows).to_csv(labels, index=False)
    dims = {"a": (8, 0), "a2": (8, 1), "b": (16, 2)}
    a, a2, b = (_pt_cache(tmp_path, n, d, s) for n, (d, s) in dims.items())
    return labels, a, a2, b


def _fit(labels: Path, features: Path, out: Path, *extra: str) -> int:
    small_heads = ("model.hidden_dim=16", "model.attention_dim=8")
    return main(_fit_cli(features, labels, out, *small_heads, *extra))


def _done(run: Path, fold: str) -> str:
    return (run / "folds" / fold / "done.json").read_text()


@pytest.mark.parametrize(("other", "named"), [(3, "feature_dim: 8 in the run, 16 now"),
                                              (2, "features_sha256: ")])  # fmt: skip
def test_a_run_without_cache_key_is_not_resumed_on_other_features(
    caches: tuple[Path, Path, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    other: int,
    named: str,
) -> None:
    """The reviewer's repro: fold 0 on one cache, then the rest on another (other D, or the same
    D from other files) must be refused, not finish a run that mixes the two."""
    labels, a = caches[0], caches[1]
    run = tmp_path / "run"
    assert _fit(labels, a, run, "cv.run_folds=[0]") == 0
    before = _done(run, "fold_0")
    capsys.readouterr()
    assert _fit(labels, caches[other], run) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "made with other settings" in err and named in err
    assert "overwrite=true" in err
    assert _done(run, "fold_0") == before and not (run / "folds" / "fold_1").exists()


def test_a_run_without_cache_key_resumes_on_the_same_files(
    caches: tuple[Path, Path, Path, Path], tmp_path: Path
) -> None:
    labels, a = caches[0], caches[1]
    run = tmp_path / "run"
    assert _fit(labels, a, run, "cv.run_folds=[0]") == 0
    before = _done(run, "fold_0")
    assert _fit(labels, a, run) == 0  # resumes: fold 0 kept, fold 1 trained, results written
    assert _done(run, "fold_0") == before
    assert load_run(run).folds == ["fold_0", "fold_1"]
    record = json.loads((run / ".melanoma-mil.json").read_text())
    assert record["feature_dim"] == 8 and record["cache_key"] is None


def test_a_fold_subset_counts_only_finished_folds_as_resumed(
    caches: tuple[Path, Path, Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Folds left to other processes (outside cv.run_folds) are not 'already finished'."""
    labels, a = caches[0], caches[1]
    run = tmp_path / "run"
    assert _fit(labels, a, run, "cv.folds=3", "cv.run_folds=[0]") == 0
    caplog.set_level(logging.INFO, logger="melanoma_mil")
    assert _fit(labels, a, run, "cv.folds=3", "cv.run_folds=[1]") == 0
    assert "(1 fold(s) already finished)" in caplog.text  # fold 0; fold 2 is not done


def test_runs_with_a_cache_key_keep_their_recorded_fingerprint() -> None:
    """The digest of a cache-keyed run is what earlier versions recorded (no new fields), so
    their runs still resume."""
    settings = {"seed": 0, "model.name": "gated_attention"}
    fp = rundir.Fingerprint(settings, "splits", "cohort", "uni-1024")
    old = {"settings": settings, "splits_sha256": "splits", "cohort_sha256": "cohort",
           "cache_key": "uni-1024"}  # fmt: skip
    assert fp.digest == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()
    d8 = rundir.Fingerprint(settings, "splits", "cohort", None, 8, "f" * 64)
    d16 = rundir.Fingerprint(settings, "splits", "cohort", None, 16, "f" * 64)
    assert d8.digest != d16.digest
    assert sorted(d8.as_dict()) == sorted([*old, "feature_dim", "features_sha256"])


@pytest.mark.parametrize(
    ("name", "extra", "kept"),
    [
        ("gated_attention", [], False),
        ("gated_attention", ["model.topk_warmup=0.3"], False),
        ("topk", ["model.topk_warmup=0"], False),
        ("topk", [], True),
    ],
)
def test_topk_warmup_is_in_a_runs_settings_only_where_it_changes_training(
    name: str, extra: list[str], kept: bool
) -> None:
    """model.topk_warmup came after runs were recorded without it: only topk reads it, and 0
    trains as before, so those runs keep their fingerprint and still resume."""
    cfg = load_config(FitConfig, [], [f"model.name={name}", *extra])
    assert ("model.topk_warmup" in rundir.settings(cfg)) == kept
