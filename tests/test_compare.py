"""Comparison statistics on constructed predictions with known answers, and `compare` itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from melanoma_mil import rundir, stats
from melanoma_mil.cli import main
from melanoma_mil.config import CompareConfig, FitConfig, ModelConfig, to_yaml
from melanoma_mil.data.splits import Split
from melanoma_mil.errors import UserError
from melanoma_mil.evaluation.compare import compare_runs
from melanoma_mil.models import build_model
from melanoma_mil.outdir import claim_output


def slow_delong(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. 1988 straight from the definition: O(m n) kernel placement values."""
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    psi = (pos[:, :, None] > neg[:, None, :]) + 0.5 * (pos[:, :, None] == neg[:, None, :])
    v10, v01 = psi.mean(axis=2), psi.mean(axis=1)  # per positive, per negative
    aucs = psi.mean(axis=(1, 2))
    cov = np.cov(v10) / pos.shape[1] + np.cov(v01) / neg.shape[1]
    return aucs, cov


def binormal(n: int, d: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Half positives ~ N(d, 1), half negatives ~ N(0, 1): population AUC = Phi(d / sqrt 2)."""
    y = np.repeat([0, 1], n // 2)
    return y, rng.normal(size=n) + d * y


def test_auc_known_values_and_ties() -> None:
    y = np.array([0, 0, 1, 1])
    assert stats.auc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert stats.auc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert stats.auc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5
    rng = np.random.default_rng(0)
    yy, s = rng.integers(0, 2, 200), np.round(rng.normal(size=200), 1)  # many ties
    assert stats.auc(yy, s) == pytest.approx(roc_auc_score(yy, s))
    p = rng.dirichlet([1, 1, 1], 200)
    yc = rng.integers(0, 3, 200)
    assert stats.macro_auc(yc, p)[0] == pytest.approx(roc_auc_score(yc, p, multi_class="ovr"))


def test_fast_delong_matches_definition() -> None:
    rng = np.random.default_rng(1)
    y, s1 = binormal(120, 1.0, rng)
    s2 = 0.6 * s1 + rng.normal(size=120)  # correlated with the first predictor
    s1 = np.round(s1, 1)  # ties exercise the midranks
    scores = np.vstack([s1, s2])
    fast = stats.delong(y, scores)
    ref_auc, ref_cov = slow_delong(y, scores)
    np.testing.assert_allclose(fast.auc, ref_auc, rtol=1e-12)
    np.testing.assert_allclose(fast.cov, ref_cov, rtol=1e-10)
    ref_z = (ref_auc[0] - ref_auc[1]) / np.sqrt(ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1])
    test = stats.delong_test(y, s1, s2)
    assert test.p_value == pytest.approx(2 * norm.sf(abs(ref_z)), rel=1e-9)
    assert 0 < test.p_value < 1


def test_delong_se_agrees_with_bootstrap_and_null_is_calibrated() -> None:
    rng = np.random.default_rng(2)
    y, s1 = binormal(400, 1.0, rng)
    s2 = 0.5 * s1 + rng.normal(size=400)
    boot = stats.paired_bootstrap_test(y, s1, s2, n_boot=2000, seed=0)
    dl = stats.delong_test(y, s1, s2)
    se_boot, se_dl = (boot.ci_high - boot.ci_low) / 3.92, (dl.ci_high - dl.ci_low) / 3.92
    assert se_dl == pytest.approx(se_boot, rel=0.15)
    # Two equally good but different predictors: p < 0.05 about 5% of the time.
    rejections = 0
    for _ in range(300):
        y, base = binormal(80, 0.0, rng)
        a, b = base + 1.0 * y + rng.normal(size=80), base + 1.0 * y + rng.normal(size=80)
        rejections += stats.delong_test(y, a, b).p_value < 0.05
    assert 0.02 <= rejections / 300 <= 0.09


def test_bootstrap_ci_covers_the_true_auc() -> None:
    rng = np.random.default_rng(3)
    truth = norm.cdf(1.0 / np.sqrt(2))
    covered = 0
    for seed in range(40):
        y, s = binormal(200, 1.0, rng)
        est, low, high = stats.bootstrap_auc_ci(y, s, n_boot=500, seed=seed)
        assert low < est < high
        covered += low <= truth <= high
    assert covered >= 34  # nominal 95% of 40 = 38


def test_patient_bootstrap_is_wider_than_bag_bootstrap() -> None:
    rng = np.random.default_rng(4)
    y, s = binormal(60, 1.0, rng)
    # Five slides per patient with the same score: 300 bags but only 60 independent units.
    y5, s5, g5 = np.repeat(y, 5), np.repeat(s, 5), np.repeat(np.arange(60), 5)
    _, lo_bag, hi_bag = stats.bootstrap_auc_ci(y5, s5, n_boot=1000)
    _, lo_pat, hi_pat = stats.bootstrap_auc_ci(y5, s5, g5, n_boot=1000)
    assert (hi_pat - lo_pat) > 1.8 * (hi_bag - lo_bag)  # ~sqrt(5) = 2.2x


def test_paired_tests_identical_and_perfect_vs_random() -> None:
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], 100)
    random_scores = rng.random(200)
    for test in (stats.delong_test, stats.paired_bootstrap_test):
        same = test(y, random_scores, random_scores)
        assert same.diff == 0 and same.p_value == 1.0
        far = test(y, y + 0.1 * rng.random(200), random_scores)
        assert far.auc_a == pytest.approx(1.0) and far.diff > 0.3 and far.p_value < 1e-3
        assert far.ci_low > 0


def slow_holm(p: list[float | None]) -> list[float]:
    """Holm 1979 by the textbook: drop the missing, sort ascending, p_(i) * (m - i + 1),
    running maximum, clip at 1, back in the original order."""
    present = sorted((v, i) for i, v in enumerate(p) if v is not None and not np.isnan(v))
    out, running = [float("nan")] * len(p), 0.0
    for rank, (v, i) in enumerate(present, start=1):
        running = max(running, v * (len(present) - rank + 1))
        out[i] = min(running, 1.0)
    return out


def test_holm_matches_the_textbook_on_random_vectors_with_ties_and_missing() -> None:
    # Holm's worked example: sorted 0.005, 0.01, 0.03, 0.04 x 4, 3, 2, 1, then the running max
    assert stats.holm([0.01, 0.04, 0.03, 0.005]).tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([]).shape == (0,) and np.isnan(stats.holm([None, np.nan])).all()
    rng = np.random.default_rng(14)
    for _ in range(2000):
        m = int(rng.integers(1, 25))
        p = rng.random(m) ** 3  # many small p-values, where the adjustment matters
        p[rng.random(m) < 0.3] = rng.choice([0.0, 0.01, 0.05, 1.0])  # ties, and the ends
        p = np.round(p, int(rng.integers(1, 5)))  # more ties
        given: list[float | None] = list(p)
        for i in np.flatnonzero(rng.random(m) < 0.2):  # no test: NaN (float) or None (DeLong)
            given[i] = None if rng.random() < 0.5 else float("nan")
        fast = stats.holm(given)
        np.testing.assert_allclose(fast, slow_holm(given), rtol=1e-12, equal_nan=True)
        kept = ~np.isnan(fast)
        family = int(kept.sum())
        assert (np.isnan(np.array(given, dtype=float)) == ~kept).all()
        raw = np.array(given, dtype=float)[kept]  # never below raw, never above Bonferroni
        assert (raw <= fast[kept]).all() and (
            fast[kept] <= np.minimum(1, family * raw) + 1e-15
        ).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.holm([0.2, 1.5])


# --------------------------------------------------------------------------- compare
CLASSES = ["low", "high"]


def write_run(
    run_dir: Path,
    probs: np.ndarray,
    labels: np.ndarray,
    folds: np.ndarray,
    encoder: str,
    seed: int = 0,
    binary_classes: list[str] | None = None,
    patients: list[str] | None = None,
    bag_level: str = "slide",
    model: str = "gated_attention",
    cache_key: str = "ck",
) -> Path:
    """A complete fit run written through `rundir`'s writers (2 slides per patient), with given
    out-of-fold predictions and tiny untrained fold models (``patients``: one per slide);
    ``model`` and ``cache_key`` are recorded settings only (the fold models are all `mean`).

    ``probs`` is [N] (binary: P(high), or of ``binary_classes[1]``) or [N, C] (multi-class,
    classes c0..c{C-1}).
    """
    n = len(labels)
    multi = probs.ndim == 2
    classes = [f"c{i}" for i in range(probs.shape[1])] if multi else binary_classes or CLASSES
    p2 = probs if multi else np.stack([1 - probs, probs], 1)
    slides = [f"s{i:03d}" for i in range(n)]
    patients = patients or [f"p{i // 2:03d}" for i in range(n)]
    pred = pd.DataFrame({"slide_id": slides, "patient_id": patients})
    pred = pred.assign(fold=folds, repeat=0, label=[classes[k] for k in labels], y=labels)
    pred = pred.assign(pred=[classes[k] for k in p2.argmax(1)])
    pred = pred.assign(**{f"prob_{c}": p2[:, i] for i, c in enumerate(classes)})
    if not multi:
        pred["prob"] = probs
    splits = []
    for k in sorted(set(folds)):
        rest = [
            s for s, f in zip(slides, folds, strict=True) if f != k
        ]  # patients' slides adjacent
        test = [s for s, f in zip(slides, folds, strict=True) if f == k]
        splits.append(Split(repeat=0, fold=int(k), train=rest[2:], val=rest[:2], test=test))
    cfg = FitConfig(output_dir=str(run_dir), seed=seed)
    cfg.data.classes, cfg.data.bag_level, cfg.model.name = classes, bag_level, model
    doc = rundir.splits_document(splits, cfg.cv, "cohort", None)
    fp = rundir.Fingerprint(rundir.settings(cfg), doc["sha256"], "cohort", cache_key)
    run_id = rundir.claim_run(run_dir, fp)
    prov = {
        "encoder": encoder,
        "cache_key": cache_key,
        "classes": classes,
        "splits_sha256": doc["sha256"],
    }
    rundir.write_run_files(run_dir, to_yaml(cfg), prov, doc)
    model_cfg = ModelConfig(name="mean", hidden_dim=4)
    for split, name in zip(splits, rundir.fold_names(splits), strict=True):
        partial = rundir.partial_dir(run_dir, name)
        partial.mkdir(parents=True)
        model = build_model(model_cfg, 4, len(classes))
        rundir.save_fold_model(partial / rundir.MODEL, model, model_cfg, 4, classes)
        record = {"run_id": run_id, "fingerprint": fp.digest}
        rundir.commit_fold(run_dir, name, partial, pred[pred["fold"] == split.fold], record)
    summary: dict = {"classes": classes, "n_bags": n, "encoder": encoder}
    per_fold: dict[str, list[float]] = {"auc": [], "balanced_accuracy": [], "f1": []}
    for k in sorted(set(folds)):
        y, p = labels[folds == k], probs[folds == k]
        hard = p.argmax(1) if multi else (p > 0.5).astype(int)
        per_fold["auc"].append(
            roc_auc_score(y, p, multi_class="ovr") if multi else roc_auc_score(y, p)
        )
        per_fold["balanced_accuracy"].append(balanced_accuracy_score(y, hard))
        per_fold["f1"].append(f1_score(y, hard, average="macro" if multi else "binary"))
    for key, vals in per_fold.items():  # as fit summarises: over the folds where defined
        finite = np.asarray(vals)[np.isfinite(vals)]
        summary[key] = {"mean": finite.mean(), "std": finite.std(ddof=1), "per_fold": vals}
    rundir.write_results(run_dir, pred, summary, lambda png: png.write_bytes(b"png"))
    return run_dir


@pytest.fixture()
def cohort() -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.tile([0, 1], 30), 2)  # 60 patients x 2 slides, same label per patient
    folds = np.repeat(np.arange(60) // 2 % 4, 2)  # patient-level, both classes per fold
    return labels, folds


def test_compare_ranks_a_strong_run_above_a_random_one(tmp_path: Path, cohort) -> None:
    labels, folds = cohort
    rng = np.random.default_rng(6)
    good = np.clip(0.5 * labels + 0.25 + rng.normal(0, 0.12, len(labels)), 0, 1)
    a = write_run(tmp_path / "random_run", rng.random(len(labels)), labels, folds, "resnet50")
    b = write_run(tmp_path / "good_run", good, labels, folds, "uni")
    out = tmp_path / "cmp"
    table = compare_runs(CompareConfig(run_dirs=[str(a), str(b)], output_dir=str(out)))
    assert {p.name for p in out.iterdir()} >= {"comparison.csv", "comparison.md", "comparison.png"}
    ref, other = table.iloc[0], table.iloc[1]
    assert bool(ref.is_reference) and ref.pooled_auc_diff == 0 and ref.p_bootstrap == 1.0
    assert other.encoder == "uni" and other.pooled_auc > 0.9
    assert other.pooled_auc_ci_low < other.pooled_auc < other.pooled_auc_ci_high
    assert other.pooled_auc_diff > 0.3 and other.p_delong < 1e-3 and other.p_bootstrap < 1e-2
    assert other.folds_better == 4
    md = (out / "comparison.md").read_text()
    assert "| good_run | uni |" in md and "reference" in md
    folds_csv = pd.read_csv(out / "comparison_folds.csv")
    assert (
        len(folds_csv) == 8 and (folds_csv.query("run == 'random_run'").auc_diff_vs_ref == 0).all()
    )
    with pytest.raises(UserError, match="overwrite=true"):
        compare_runs(CompareConfig(run_dirs=[str(a), str(b)], output_dir=str(out)))


def test_compare_identical_runs_and_reference_choice(tmp_path: Path, cohort) -> None:
    labels, folds = cohort
    probs = np.random.default_rng(7).random(len(labels)) * 0.5 + 0.4 * labels
    a = write_run(tmp_path / "x" / "run", probs, labels, folds, "resnet50")
    b = write_run(tmp_path / "y" / "run", probs, labels, folds, "resnet50", seed=1)
    table = compare_runs(
        CompareConfig(run_dirs=[str(a), str(b)], reference=str(b), output_dir=str(tmp_path / "o"))
    )
    assert list(table.run) == ["x/run", "y/run"]  # duplicate names made unique
    assert list(table.is_reference) == [False, True]
    assert (table.pooled_auc_diff == 0).all() and (table.fold_auc_diff_mean == 0).all()
    assert (table.p_delong == 1.0).all() and (table.p_bootstrap == 1.0).all()


def test_a_chance_win_in_a_grid_is_not_one_after_holm(tmp_path: Path, cohort) -> None:
    """Six runs of one model's noise (equally good by construction): against the first, two
    'differ' at raw p < 0.05, neither after Holm over the five runs against the reference. The
    Holm columns come after every existing one, and follow the reference, not the position."""
    labels, folds = cohort
    rng = np.random.default_rng(17)
    base = 0.3 * labels + rng.normal(0, 0.2, len(labels))  # shared: runs are correlated
    runs = [
        str(write_run(tmp_path / f"r{i}", np.clip(0.35 + base + rng.normal(0, 0.15, len(labels)),
                      0, 1), labels, folds, "uni"))
        for i in range(6)
    ]  # fmt: skip
    out = tmp_path / "o"
    table = compare_runs(CompareConfig(run_dirs=runs, output_dir=str(out), bootstrap=500))
    assert list(table.columns[-3:]) == ["run_dir", "p_bootstrap_holm", "p_delong_holm"]
    assert table.loc[0, ["p_bootstrap_holm", "p_delong_holm"]].isna().all()  # the reference
    for col in ("p_bootstrap", "p_delong"):
        expected = slow_holm(list(table[col][1:]))
        np.testing.assert_allclose(table[f"{col}_holm"][1:], expected, rtol=1e-12)
    chance = table.p_bootstrap < 0.05
    assert chance.sum() == 2 and (table.p_bootstrap_holm[chance] >= 0.05).all()
    saved = pd.read_csv(out / "comparison.csv")
    np.testing.assert_allclose(saved.p_bootstrap_holm, table.p_bootstrap_holm, equal_nan=True)
    md = (out / "comparison.md").read_text()
    for r in table[1:].itertuples():
        row = next(line for line in md.splitlines() if line.startswith(f"| {r.run} |"))
        assert row.endswith(
            f"| {r.p_bootstrap:.3g} (Holm {r.p_bootstrap_holm:.3g}) "
            f"| {r.p_delong:.3g} (Holm {r.p_delong_holm:.3g}) |"
        )
    assert "over the family of this comparison's 5 runs tested against its reference" in md
    other = compare_runs(
        CompareConfig(run_dirs=runs, output_dir=str(out), bootstrap=500, reference=runs[3],
                      overwrite=True)
    )  # fmt: skip
    assert other.p_bootstrap_holm.isna().tolist() == [False, False, False, True, False, False]
    kept = other.drop(index=3)
    np.testing.assert_allclose(kept.p_bootstrap_holm, slow_holm(list(kept.p_bootstrap)))


def test_compare_refuses_different_splits(tmp_path: Path, cohort, capsys) -> None:
    labels, folds = cohort
    probs = np.random.default_rng(8).random(len(labels))
    a = write_run(tmp_path / "a", probs, labels, folds, "resnet50")
    b = write_run(tmp_path / "b", probs, labels, (folds + 1) % 4, "uni")
    with pytest.raises(UserError, match="different splits"):
        compare_runs(CompareConfig(run_dirs=[str(a), str(b)], output_dir=str(tmp_path / "o")))
    assert main(["compare", str(a), str(b), f"output_dir={tmp_path / 'o'}"]) == 2
    assert "different splits" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["compare", str(a), str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
    # patient bags vs slide bags: no cv.splits_file pairs them, so that is not the fix
    c = write_run(tmp_path / "c", probs, labels, (folds + 1) % 4, "uni", bag_level="patient")
    assert main(["compare", str(a), str(c), f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert f"{a} (data.bag_level=slide) and {c} (data.bag_level=patient)" in err
    assert "same data.bag_level" in err and "splits_file" not in err


def test_compare_names_both_class_orders_and_the_fix(tmp_path: Path, cohort, capsys) -> None:
    labels, folds = cohort
    probs = np.random.default_rng(11).random(len(labels))
    a = write_run(tmp_path / "a", probs, labels, folds, "resnet50")
    b = write_run(
        tmp_path / "b", 1 - probs, 1 - labels, folds, "uni", binary_classes=["high", "low"]
    )
    assert main(["compare", str(a), str(b), f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert f"runs {a} and {b} have different classes, [low, high] vs [high, low]" in err
    assert '"data.classes=[low,high]" or "data.classes=[high,low]"' in err  # quoted for zsh
    assert not (tmp_path / "o").exists()


def test_compare_multiclass_uses_macro_auc_and_the_bootstrap(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    labels = np.repeat(np.arange(60) % 3, 2)  # 60 patients x 2 slides, 3 classes
    folds = np.repeat(np.arange(60) // 3 % 4, 2)
    informative = np.eye(3)[labels] * 2 + rng.random((120, 3))
    runs = [
        write_run(tmp_path / "noise", rng.dirichlet([1, 1, 1], 120), labels, folds, "a"),
        write_run(
            tmp_path / "signal", informative / informative.sum(1, keepdims=True), labels, folds, "b"
        ),
    ]
    table = compare_runs(
        CompareConfig(run_dirs=[str(r) for r in runs], output_dir=str(tmp_path / "o"))
    )
    assert table.pooled_auc[1] == pytest.approx(1.0) and table.p_bootstrap[1] < 1e-2
    assert table.p_delong.isna().all()  # DeLong is binary only
    assert table.p_delong_holm.isna().all() and np.isnan(table.p_bootstrap_holm[0])
    assert table.p_bootstrap_holm[1] == table.p_bootstrap[1]  # a family of one
    md = (tmp_path / "o" / "comparison.md").read_text()
    assert "| n/a |" in md and "nan" not in md and "comparison's 1 run tested" in md


def test_a_fold_without_an_auc_leaves_the_fold_comparison_defined(tmp_path: Path) -> None:
    labels = np.repeat(np.tile([0, 1], 30), 2)
    folds = np.repeat(np.arange(60) // 2 % 4, 2)
    folds[(folds == 3) & (labels == 1)] = 2  # fold 3 holds one class: its AUC is undefined
    rng = np.random.default_rng(10)
    noise = rng.random(len(labels))
    good = np.clip(0.5 * labels + 0.25 + rng.normal(0, 0.12, len(labels)), 0, 1)
    with pytest.warns(UserWarning, match="Only one class"):  # sklearn, writing the fake runs
        runs = [
            write_run(tmp_path / n, p, labels, folds, n) for n, p in (("a", noise), ("b", good))
        ]
    out = tmp_path / "o"
    table = compare_runs(CompareConfig(run_dirs=[str(r) for r in runs], output_dir=str(out)))
    other = table.iloc[1]
    per_fold = [np.asarray(rundir.load_run(r).summary["auc"]["per_fold"], float) for r in runs]
    diff = (per_fold[1] - per_fold[0])[:3]
    assert np.isnan(per_fold[0][3]) and other.folds_compared == 3 and other.folds == 4
    assert other.fold_auc_diff_mean == pytest.approx(diff.mean())
    assert other.fold_auc_diff_std == pytest.approx(diff.std(ddof=1))
    assert other.folds_better == 3
    md = (out / "comparison.md").read_text()
    assert "nan" not in md and "(3 of 4 folds)" in md


def test_a_wrong_output_folder_is_refused_before_any_run_is_read(tmp_path: Path) -> None:
    out = tmp_path / "evaluation"
    claim_output(out, {"command": "evaluate"}, False, ())  # another command's folder
    missing = [str(tmp_path / "no_run_a"), str(tmp_path / "no_run_b")]
    with pytest.raises(UserError, match="holds output of") as err:
        compare_runs(CompareConfig(run_dirs=missing, output_dir=str(out)))
    assert "not found" not in str(err.value)


def test_runs_alike_in_their_last_two_folders_get_names_that_tell_them_apart(
    tmp_path: Path, cohort
) -> None:
    """a/x/run and b/x/run were both named 'x/run': the figure's per-fold table could not be
    built (traceback) after comparison.csv and .md were written."""
    labels, folds = cohort
    rng = np.random.default_rng(12)
    runs = [
        write_run(tmp_path / f"{top}/x/run", rng.random(len(labels)), labels, folds, top)
        for top in ("a", "b")
    ]
    out = tmp_path / "o"
    table = compare_runs(CompareConfig(run_dirs=[str(r) for r in runs], output_dir=str(out)))
    assert list(table.run) == ["a/x/run", "b/x/run"]
    assert (out / "comparison.png").is_file()
    assert "| b/x/run | b |" in (out / "comparison.md").read_text()


def test_runs_grouping_the_same_bags_into_other_patients_are_refused(
    tmp_path: Path, cohort, capsys
) -> None:
    """One run with patients, one whose labels_csv had none (a patient per slide) on the same
    pinned splits: the CIs and the bootstrap p resampled whichever run came first's patients,
    so swapping the two changed them."""
    labels, folds = cohort
    rng = np.random.default_rng(13)
    a = write_run(tmp_path / "a", rng.random(len(labels)), labels, folds, "resnet50")
    slides = [f"s{i:03d}" for i in range(len(labels))]
    b = write_run(tmp_path / "b", rng.random(len(labels)), labels, folds, "uni", patients=slides)
    assert main(["compare", str(a), str(b), f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert f"runs {a} and {b} put bags in different patients (120 bags" in err
    assert "s000: patient p000 vs s000" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
