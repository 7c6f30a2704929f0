"""`compare` by setting: runs that differ only in `seed` summarised together, and the paired
bootstrap of seed-averaged AUCs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from test_compare import slow_holm, write_run

from melanoma_mil import stats
from melanoma_mil.cli import main
from melanoma_mil.config import CompareConfig
from melanoma_mil.data.synthetic import make_bag_cohort
from melanoma_mil.evaluation.compare import compare_runs, comparison_tables, load_result, markdown


def slow_seeds_test(
    y: np.ndarray,
    runs_a: list[np.ndarray],
    runs_b: list[np.ndarray],
    groups: np.ndarray,
    n_boot: int,
    seed: int,
) -> tuple[float, float, float, float]:
    """(diff, CI low, CI high, p) by the textbook: each replicate draws patients with
    replacement (the same multinomial counts `stats` draws, from the same rng), stacks their
    bags, and scores every run on that resample with scikit-learn."""
    patients = np.unique(groups)
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        counts = rng.multinomial(len(patients), np.full(len(patients), 1 / len(patients)))
        drawn = np.repeat(patients, counts)  # each patient as often as drawn
        rows = np.concatenate([np.flatnonzero(groups == p) for p in drawn])
        if len(set(y[rows])) < 2:
            continue
        mean_a = np.mean([roc_auc_score(y[rows], s[rows]) for s in runs_a])
        reps.append(mean_a - np.mean([roc_auc_score(y[rows], s[rows]) for s in runs_b]))
    d = np.asarray(reps)
    obs = np.mean([roc_auc_score(y, s) for s in runs_a]) - np.mean(
        [roc_auc_score(y, s) for s in runs_b]
    )
    low, high = np.quantile(d, [0.025, 0.975])
    p = (1 + (np.abs(d - obs) >= abs(obs) - 1e-12).sum()) / (1 + len(d))
    return float(obs), float(low), float(high), float(p)


def test_the_seeds_bootstrap_matches_the_textbook_and_one_seed_the_paired_test() -> None:
    rng = np.random.default_rng(20)
    y = np.repeat(np.tile([0, 1], 20), 2)  # 40 patients x 2 bags, ties from rounding
    groups = np.repeat(np.arange(40), 2)
    runs_a = [np.round(0.6 * y + rng.random(80), 1) for _ in range(3)]  # 3 seeds vs 2
    runs_b = [np.round(0.3 * y + rng.random(80), 1) for _ in range(2)]
    fast = stats.paired_bootstrap_seeds_test(y, runs_a, runs_b, groups, n_boot=300, seed=4)
    slow = slow_seeds_test(y, runs_a, runs_b, groups, n_boot=300, seed=4)
    # same draws, same replicates: only float rounding of the AUCs differs
    assert (fast.diff, fast.ci_low, fast.ci_high, fast.p_value) == pytest.approx(slow, abs=1e-12)
    assert fast.auc_a == pytest.approx(np.mean([roc_auc_score(y, s) for s in runs_a]))
    assert 0 < fast.ci_low < fast.diff < fast.ci_high and fast.p_value < 0.05
    for a, b in ((runs_a[0], runs_b[0]), (rng.dirichlet([1, 1, 1], 80), rng.random((80, 3)))):
        labels = y if a.ndim == 1 else np.arange(80) // 2 % 3
        one = stats.paired_bootstrap_seeds_test(labels, [a], [b], groups, n_boot=300, seed=4)
        assert one == stats.paired_bootstrap_test(labels, a, b, groups, n_boot=300, seed=4)


@pytest.fixture()
def cohort() -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.tile([0, 1], 30), 2)  # 60 patients x 2 slides, same label per patient
    folds = np.repeat(np.arange(60) // 2 % 4, 2)
    return labels, folds


def _scores(labels: np.ndarray, signal: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(signal * labels + 0.5 - signal / 2 + rng.normal(0, 0.2, len(labels)), 0, 1)


def _pooled_auc(run: Path) -> float:
    """A run's pooled AUC from its predictions.csv, independently of compare."""
    pred = pd.read_csv(run / "predictions.csv")
    return float(roc_auc_score(pred["y"], pred["prob_high"]))


def test_runs_differing_only_in_seed_are_one_setting(tmp_path: Path, cohort) -> None:
    labels, folds = cohort
    rng = np.random.default_rng(21)
    made = {  # (model, seed, cache): runs of two settings x 2 seeds, and three others
        ("gated_attention", 0, "ck"): 0.2,
        ("abmil", 0, "ck"): 0.5,
        ("gated_attention", 1, "ck"): 0.2,
        ("abmil", 1, "ck"): 0.5,
        ("mean", 2, "ck"): 0.3,  # seed and model differ: a setting of its own
        ("gated_attention", 2, "ck2"): 0.3,  # other features: another setting
    }
    runs = [
        write_run(
            tmp_path / f"{m}_{s}_{c}", _scores(labels, sig, rng), labels, folds, c, seed=s,
            model=m, cache_key=c,
        )
        for (m, s, c), sig in made.items()
    ]  # fmt: skip
    out = tmp_path / "o"
    compare_runs(CompareConfig(run_dirs=[str(r) for r in runs], output_dir=str(out)))
    table = pd.read_csv(out / "comparison_settings.csv")
    assert list(table.setting) == [
        "features=ck, model.name=gated_attention",
        "features=ck, model.name=abmil",
        "features=ck, model.name=mean",
        "features=ck2, model.name=gated_attention",
    ]
    assert list(table.n_seeds) == [2, 2, 1, 1]
    assert list(table.seeds) == ["0;1", "0;1", "2", "2"]
    assert table.runs[1] == "abmil_0_ck;abmil_1_ck"
    assert list(table.is_reference) == [True, False, False, False]
    pooled = [_pooled_auc(r) for r in runs]
    ref, abmil = np.mean(pooled[0:3:2]), np.mean(pooled[1:4:2])
    assert table.pooled_auc_mean[1] == pytest.approx(abmil)
    assert table.pooled_auc_std[1] == pytest.approx(np.std(pooled[1:4:2], ddof=1))
    assert table.pooled_auc_diff[1] == pytest.approx(abmil - ref)
    assert table.pooled_auc_diff[2] == pytest.approx(pooled[4] - ref)
    assert table.pooled_auc_diff_ci_low[1] > 0 and table.p_bootstrap[1] < 0.01
    assert table.pooled_auc_diff[0] == 0 and table.p_bootstrap[0] == 1
    assert np.isnan(table.pooled_auc_std[2])  # one seed: no spread
    # Holm over the three settings against the reference's, apart from the per-run family
    assert table.columns[-1] == "p_bootstrap_holm" and np.isnan(table.p_bootstrap_holm[0])
    np.testing.assert_allclose(table.p_bootstrap_holm[1:], slow_holm(list(table.p_bootstrap[1:])))
    assert (table.p_bootstrap_holm[1:] > table.p_bootstrap[1:]).any()
    md = (out / "comparison.md").read_text()
    p, holm = table.p_bootstrap[1], table.p_bootstrap_holm[1]
    assert f"| {p:.3g} (Holm {holm:.3g}) |" in md.split("## By setting")[1]
    assert "this comparison's 3 settings tested against its reference" in md
    assert "this comparison's 5 runs tested against its reference" in md
    assert "| abmil_0_ck | ck |" in md  # the per-run table stays
    assert "## By setting, over seeds" in md
    assert "| features=ck, model.name=abmil | abmil_0_ck, abmil_1_ck | 0, 1 |" in md


def test_runs_without_seed_groups_write_what_compare_always_wrote(tmp_path: Path, cohort) -> None:
    """No two runs differ only in seed: no settings table, the outputs exactly the per-run
    ones; one left by an earlier comparison (overwrite=true) goes."""
    labels, folds = cohort
    rng = np.random.default_rng(22)
    paths = [
        write_run(tmp_path / n, _scores(labels, 0.4, rng), labels, folds, "e", seed=s, model=m)
        for n, s, m in (("a", 0, "abmil"), ("b", 1, "mean"), ("c", 0, "mean"), ("d", 1, "max"))
    ]
    grouped, plain = [str(p) for p in paths[:3]], [str(p) for p in paths[2:]]
    out, fresh = tmp_path / "o", tmp_path / "fresh"
    compare_runs(CompareConfig(run_dirs=grouped, output_dir=str(out)))
    assert (out / "comparison_settings.csv").is_file()  # b and c: mean with seeds 1 and 0
    table = compare_runs(CompareConfig(run_dirs=plain, output_dir=str(out), overwrite=True))
    compare_runs(CompareConfig(run_dirs=plain, output_dir=str(fresh)))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in fresh.iterdir())
    assert not (fresh / "comparison_settings.csv").exists()
    for name in ("comparison.csv", "comparison_folds.csv", "comparison.md", "comparison.png"):
        assert (out / name).read_bytes() == (fresh / name).read_bytes()
    results = [load_result(p) for p in plain]
    expected, _ = comparison_tables(results, 0, 2000, 0)
    assert (fresh / "comparison.csv").read_text() == expected.to_csv(index=False)
    assert (fresh / "comparison.md").read_text() == markdown(table, 2000)


def test_a_rerun_of_a_setting_and_seed_counts_as_one_seed(tmp_path: Path, cohort) -> None:
    """Two sweeps holding one model x cache x seed (study2024 and models.yaml at one cache)
    gave that setting 'seeds 0;0;1', its seed 0 counted twice; a repeat is now left out of the
    table by setting, and named there (the per-run table keeps every run)."""
    labels, folds = cohort
    rng = np.random.default_rng(23)
    made = [("a0", "abmil", 0), ("m0", "mean", 0), ("a1", "abmil", 1), ("a0_again", "abmil", 0)]
    runs = [
        write_run(tmp_path / n, _scores(labels, 0.4, rng), labels, folds, "ck", seed=s, model=m)
        for n, m, s in made
    ]
    out = tmp_path / "o"
    compare_runs(CompareConfig(run_dirs=[str(r) for r in runs], output_dir=str(out)))
    table = pd.read_csv(out / "comparison_settings.csv", keep_default_na=False)
    assert list(table.seeds) == ["0;1", "0"]
    assert list(table.n_seeds) == [2, 1]
    assert list(table.repeats_left_out) == ["a0_again", ""]
    pooled = [_pooled_auc(r) for r in runs[:3:2]]
    assert float(table.pooled_auc_mean[0]) == pytest.approx(np.mean(pooled))
    assert "repeats of a seed their setting already has" in (out / "comparison.md").read_text()
    assert len(pd.read_csv(out / "comparison.csv")) == 4


def test_a_repeat_is_not_said_left_out_of_a_table_by_setting_that_is_not_written(
    tmp_path: Path, cohort, caplog: pytest.LogCaptureFixture
) -> None:
    """With the repeat left out no setting has two runs, so no table by setting is written:
    no warning may say the repeat was left out of it."""
    labels, folds = cohort
    rng = np.random.default_rng(24)
    made = [("a0", "abmil", 0), ("m0", "mean", 0), ("a0_again", "abmil", 0)]
    runs = [
        write_run(tmp_path / n, _scores(labels, 0.4, rng), labels, folds, "ck", seed=s, model=m)
        for n, m, s in made
    ]
    out = tmp_path / "o"
    compare_runs(CompareConfig(run_dirs=[str(r) for r in runs], output_dir=str(out)))
    assert not (out / "comparison_settings.csv").exists()
    assert "left out of the table by setting" not in caplog.text


def test_real_fits_get_holm_over_their_runs_and_over_their_settings(
    tmp_path: Path, one_thread: None
) -> None:
    """`fit` twice per model (seeds 0, 1) for two models and once for a third, then `compare`:
    each table's Holm family is its own rows against the reference (4 runs, 2 settings)."""
    features, labels = make_bag_cohort(
        tmp_path / "coh", n_patients=12, dim=16, n_instances=(4, 10), slides_per_patient=2
    )
    runs = []
    for model, seed in (("mean", 0), ("mean", 1), ("max", 0), ("max", 1), ("abmil", 0)):
        runs.append(str(tmp_path / f"{model}_{seed}"))
        args = [f"data.features_dir={features}", f"data.labels_csv={labels}", "cv.folds=2"]
        args += ["trainer.max_epochs=2", "logger=none", f"model.name={model}", f"seed={seed}"]
        assert main(["fit", *args, f"output_dir={runs[-1]}"]) == 0
    out = tmp_path / "cmp"
    assert main(["compare", *runs, f"output_dir={out}", "bootstrap=200"]) == 0
    table = pd.read_csv(out / "comparison.csv")
    for col in ("p_bootstrap", "p_delong"):
        assert np.isnan(table[f"{col}_holm"][0])
        np.testing.assert_allclose(table[f"{col}_holm"][1:], slow_holm(list(table[col][1:])))
    by_setting = pd.read_csv(out / "comparison_settings.csv")
    assert list(by_setting.n_seeds) == [2, 2, 1] and np.isnan(by_setting.p_bootstrap_holm[0])
    expected = slow_holm(list(by_setting.p_bootstrap[1:]))
    np.testing.assert_allclose(by_setting.p_bootstrap_holm[1:], expected)
    md = (out / "comparison.md").read_text()
    assert "comparison's 4 runs tested" in md and "comparison's 2 settings tested" in md
    assert len(re.findall(r"\(Holm [0-9.e+-]+\)", md)) == 4 * 2 + 2  # every p beside its Holm
