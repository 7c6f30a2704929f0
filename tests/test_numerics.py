"""Numbers shown to the user agree with what is drawn and with scikit-learn / textbook versions:
fit's roc.png, compare's comparison.png, multi-class macro metrics and their bootstrap, and
DeLong's test when its variance is zero."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from sklearn.metrics import (
    auc,
    balanced_accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from melanoma_mil import stats
from melanoma_mil.evaluation import compare
from melanoma_mil.evaluation.classification import METRICS, _scores, classification_metrics
from melanoma_mil.inference.analyse import ensemble_columns
from melanoma_mil.metrics import bag_metrics
from melanoma_mil.viz.roc import auc_label, plot_roc


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Figure]]:
    """Figures the code under test closes, kept open to read back what it drew."""
    kept: list[Figure] = []
    close = plt.close
    monkeypatch.setattr(plt, "close", kept.append)
    yield kept
    for fig in kept:
        close(fig)


def _repeated_predictions(classes: list[str], repeats: int, seed: int) -> pd.DataFrame:
    """Out-of-fold predictions of ``repeats`` CV repeats on the same 80 slides (fit's rows)."""
    rng = np.random.default_rng(seed)
    n, k = 80, len(classes)
    y = np.arange(n) % k
    rows = []
    for r in range(repeats):
        logits = rng.normal(0, 1.2, (n, k)) + 0.8 * np.eye(k)[y]
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        frame = pd.DataFrame(
            {"slide_id": [f"s{i:02d}" for i in range(n)], "patient_id": [f"p{i}" for i in range(n)]}
        )
        frame = frame.assign(y=y, repeat=r, fold=rng.permutation(n) % 5)
        for c, name in enumerate(classes):
            frame[f"prob_{name}"] = p[:, c]
        rows.append(frame)
    return pd.concat(rows, ignore_index=True)


# --------------------------------------------------------------------------- fit: roc.png
def test_fit_roc_pooled_curve_is_the_legend_auc(tmp_path: Path, figures: list[Figure]) -> None:
    preds = _repeated_predictions(["low", "high"], repeats=3, seed=9)
    means = preds.groupby("slide_id")[["y", "prob_high"]].mean()  # fit's pooled AUC rows
    legend = roc_auc_score(means["y"], means["prob_high"])
    assert legend != pytest.approx(roc_auc_score(preds["y"], preds["prob_high"]), abs=0.02)
    label = f"pooled AUC {legend:.3f}"
    plot_roc(preds, ["low", "high"], tmp_path / "roc.png", "t", label)
    (bold,) = [line for line in figures[0].axes[0].lines if line.get_label() == label]
    assert auc(bold.get_xdata(), bold.get_ydata()) == pytest.approx(legend, rel=1e-12)
    assert (tmp_path / "roc.png").stat().st_size > 0


def test_fit_roc_multiclass_curves_are_their_legend_aucs(
    tmp_path: Path, figures: list[Figure]
) -> None:
    classes = ["a", "b", "c"]
    preds = _repeated_predictions(classes, repeats=2, seed=3)
    cols = [f"prob_{c}" for c in classes]
    means = preds.groupby("slide_id")[["y", *cols]].mean()
    macro = roc_auc_score(means["y"].astype(int), means[cols], multi_class="ovr")
    plot_roc(preds, classes, tmp_path / "roc.png", "t", f"pooled AUC {macro:.3f}")
    ax = figures[0].axes[0]
    areas = []
    for line in ax.lines[:-1]:  # the last is the chance diagonal
        shown = float(re.search(r"AUC ([0-9.]+)", str(line.get_label())).group(1))
        areas.append(auc(line.get_xdata(), line.get_ydata()))
        assert shown == pytest.approx(areas[-1], abs=5.1e-4)
    assert len(areas) == 3 and np.mean(areas) == pytest.approx(macro, rel=1e-12)
    assert f"{macro:.3f}" in ax.get_legend().get_title().get_text()


# --------------------------------------------------------------------------- compare plot
def _run(name: str, y: np.ndarray, probs: np.ndarray, classes: list[str]) -> compare.RunResult:
    bags = pd.DataFrame({"slide_id": [f"s{i}" for i in range(len(y))], "y": y})
    bags["patient_id"] = bags["slide_id"]
    cols = [f"prob_{classes[-1]}"] if len(classes) == 2 else [f"prob_{c}" for c in classes]
    for c, col in enumerate(cols):
        bags[col] = probs[:, -1] if len(classes) == 2 else probs[:, c]
    return compare.RunResult(
        path=Path(name),
        name=name,
        encoder="enc",
        cache_key="key",
        summary={},
        classes=classes,
        splits_key="splits",
        run_id=name,
        bag_level="slide",
        bags=bags,
        prob_columns=cols,
        setting={},
        seed=0,
    )


@pytest.mark.parametrize("n_classes", [2, 3])
def test_compare_plot_curves_are_their_legend_aucs(
    tmp_path: Path, figures: list[Figure], n_classes: int
) -> None:
    rng = np.random.default_rng(6)
    classes = ["a", "b", "c"][:n_classes]
    y = np.r_[np.zeros(60, int), np.ones(30, int), np.full(10, n_classes - 1)]
    runs = []
    for name, signal in (("one", 2.0), ("two", 0.7)):
        logits = rng.normal(size=(100, n_classes)) + signal * np.eye(n_classes)[y]
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        runs.append(_run(name, y, probs, classes))
    folds = pd.DataFrame({"run": ["one", "two"], "fold": [0, 0], "auc": [0.8, 0.7]})
    compare.plot(runs, folds)
    lines = figures[0].axes[1].lines[:-1]  # the last is the chance diagonal
    assert len(lines) == 2
    for run, line in zip(runs, lines, strict=True):
        shown = float(re.search(r"AUC ([0-9.]+)\)", str(line.get_label())).group(1))
        area = auc(line.get_xdata(), line.get_ydata())
        assert shown == pytest.approx(area, abs=5.1e-4), line.get_label()
        if n_classes == 2:
            assert area == pytest.approx(roc_auc_score(y, run.probs()))
        else:  # named micro, and it is scikit-learn's micro AUC
            assert "micro AUC" in str(line.get_label())
            onehot = np.eye(3)[y]
            assert area == pytest.approx(roc_auc_score(onehot, run.probs(), average="micro"))


# --------------------------------------------------------------------------- macro metrics
def _macro_reference(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """scikit-learn's macro (zero_division=0) over the classes with cases or predictions
    (sensitivity: with cases); NPV and specificity as the precision / recall of 'not c'."""
    classes, labels = np.unique(y), np.union1d(y, pred)

    def ovr(score: object, c: int, negative: bool) -> float:
        return score((y != c) if negative else (y == c), (pred != c) if negative else (pred == c),
                     zero_division=0)  # fmt: skip

    return {
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "sensitivity": recall_score(y, pred, labels=classes, average="macro", zero_division=0),
        "specificity": float(np.mean([ovr(recall_score, c, True) for c in labels])),
        "ppv": precision_score(y, pred, labels=labels, average="macro", zero_division=0),
        "npv": float(np.mean([ovr(precision_score, c, True) for c in labels])),
        "f1": f1_score(y, pred, labels=labels, average="macro", zero_division=0),
    }


def test_multiclass_macro_metrics_count_a_never_predicted_class_as_zero() -> None:
    y = np.array([0] * 4 + [1] * 4 + [2] * 2)
    probs = np.array(
        [[0.7, 0.2, 0.1]] * 3 + [[0.2, 0.7, 0.1]] * 4 + [[0.6, 0.3, 0.1]] + [[0.3, 0.6, 0.1]] * 2
    )
    pred = probs.argmax(1)
    assert 2 not in pred
    got = _scores(np.ones((1, len(y))), y, probs, pred)
    want = _macro_reference(y, pred)
    assert want["ppv"] == pytest.approx(5 / 12)  # class 2 counts as 0, not left out
    for name, value in want.items():
        assert got[name][0] == pytest.approx(value, rel=1e-12), name


def test_multiclass_macro_metrics_count_a_class_only_predicted() -> None:
    """Cases of classes 0 and 1 only, two of them predicted as class 2: those wrong calls cost
    PPV and F1 (scikit-learn's macro over true and predicted labels), not nothing."""
    y = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.1, 0.2, 0.7]] +
                     [[0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])  # fmt: skip
    pred = probs.argmax(1)
    got = _scores(np.ones((1, len(y))), y, probs, pred)
    want = _macro_reference(y, pred)
    assert want["ppv"] == pytest.approx(2 / 3) and want["f1"] == pytest.approx(8 / 15)
    for name, value in want.items():
        assert got[name][0] == pytest.approx(value, rel=1e-12), name


def test_multiclass_replicates_lacking_a_class_are_dropped_for_every_metric() -> None:
    rng = np.random.default_rng(7)
    y = np.r_[np.zeros(14, int), np.ones(14, int), [2, 2]]
    probs = rng.dirichlet([1, 1, 1], len(y)) + 0.6 * np.eye(3)[y]
    probs /= probs.sum(1, keepdims=True)
    patients = np.arange(len(y))
    n_boot = 300
    out = classification_metrics(y, probs, patients, 0.5, n_boot, seed=0)
    # the same replicates, scored one by one from the expanded resample with scikit-learn
    weights = stats._cluster_weights(patients, n_boot, np.random.default_rng(0))
    pred = probs.argmax(1)
    kept: dict[str, list[float]] = {m: [] for m in METRICS}
    for w in weights.astype(int):
        idx = np.repeat(np.arange(len(y)), w)
        if len(np.unique(y[idx])) < 3:
            continue
        ref = _macro_reference(y[idx], pred[idx])
        ref["auc"] = roc_auc_score(y[idx], probs[idx], multi_class="ovr")
        for m in METRICS:
            kept[m].append(ref[m])
    lacking = n_boot - len(kept["auc"])
    assert 0.05 * n_boot < lacking < 0.25 * n_boot  # no class-2 case: (28/30)^30 = 13%
    assert out["bootstrap_dropped"] == {m: lacking for m in METRICS}
    for m in METRICS:
        low, high = np.quantile(kept[m], [0.025, 0.975])
        assert out[m]["ci_low"] == pytest.approx(low, rel=1e-9), m
        assert out[m]["ci_high"] == pytest.approx(high, rel=1e-9), m


def test_binary_replicates_lacking_a_class_are_dropped_for_every_metric() -> None:
    y = np.array([0, 0, 0, 1, 1])
    probs = np.c_[1 - np.array([0.2, 0.7, 0.4, 0.8, 0.6]), [0.2, 0.7, 0.4, 0.8, 0.6]]
    pred = (probs[:, 1] >= 0.5).astype(int)
    w = np.array([[1.0, 2, 2, 0, 0], [1, 1, 1, 1, 1]])  # no positive case; everything
    got = _scores(w, y, probs, pred)
    for m in METRICS:
        assert np.isnan(got[m][0]), m  # PPV = 0 / 2 would otherwise enter the CI
    assert got["ppv"][1] == pytest.approx(precision_score(y, pred))
    assert got["npv"][1] == pytest.approx(precision_score(1 - y, 1 - pred))


# --------------------------------------------------------------------------- DeLong
def test_zero_variance_with_a_gap_has_no_p_value() -> None:
    """DeLong and the paired bootstrap: a gap every resample repeats says nothing of its noise."""
    y = np.array([0, 0, 1, 1])
    perfect, constant = np.array([0.1, 0.2, 0.8, 0.9]), np.full(4, 0.5)
    test = stats.delong_test(y, perfect, constant)
    assert test.diff == 0.5
    assert np.isnan(test.p_value) and np.isnan(test.ci_low) and np.isnan(test.ci_high)
    same = stats.delong_test(y, perfect, perfect)
    assert (same.p_value, same.ci_low, same.ci_high) == (1.0, 0.0, 0.0)
    assert np.isnan(compare._delong_p(y, perfect, constant))  # compare shows it as n/a
    boot = stats.paired_bootstrap_test(y, perfect, constant, n_boot=200)
    assert boot.diff == 0.5 and np.isnan(boot.p_value) and np.isnan(boot.ci_low)
    assert stats.paired_bootstrap_test(y, perfect, perfect, n_boot=200).p_value == 1.0


def test_an_undefined_auc_is_labelled_not_nan() -> None:
    assert auc_label(0.8123) == "AUC 0.812"
    assert auc_label(float("nan"), "pooled AUC") == "pooled AUC n/a (a class has no cases)"


def test_a_bag_at_exactly_one_half_gets_one_class_in_fit_predict_and_evaluate() -> None:
    """fit's fold metrics and pred column, predict's pred and evaluate share one rule: binary,
    the positive class when its probability is >= 0.5 (argmax picked the negative)."""
    probs = np.array([[0.5, 0.5], [0.7, 0.3], [0.2, 0.8]])
    y = np.array([1, 0, 1])
    assert bag_metrics(y, probs)["accuracy"] == 1.0
    got = classification_metrics(y, probs, np.array(["a", "b", "c"]), 0.5, n_boot=10, seed=0)
    assert got["sensitivity"]["value"] == 1.0
    assert ensemble_columns(probs[:1], ["fold_0"], ["low", "high"])["pred"] == "high"
    three = np.array([[0.2, 0.5, 0.3]])
    assert ensemble_columns(three, ["fold_0"], ["a", "b", "c"])["pred"] == "b"


def test_compare_plot_of_a_sweep_grid_gives_each_run_its_colour_and_a_legend_beside(
    tmp_path: Path, figures: list[Figure]
) -> None:
    """A grid of 12 runs (81 in the 2024 study) drew the 11th run in the 1st run's colour and
    its legend over the ROC curves; each run now has a colour of its own, and the legend sits
    beside the ROC axes."""
    rng = np.random.default_rng(7)
    y = np.r_[np.zeros(40, int), np.ones(40, int)]
    names = [f"{i:03d}_features_dir-uni-10x_name-model{i}" for i in range(12)]
    runs = [_run(n, y, rng.random((80, 2)), ["low", "high"]) for n in names]
    folds = pd.DataFrame({"run": names, "fold": 0, "auc": 0.5})
    compare.plot(runs, folds)
    fig = figures[0]
    roc = fig.axes[1]
    colours = {tuple(np.round(to_rgba(line.get_color()), 3)) for line in roc.lines[:-1]}
    assert len(colours) == len(runs)
    renderer = fig.canvas.get_renderer()
    legend = roc.get_legend().get_window_extent(renderer)
    assert legend.x0 >= roc.get_window_extent(renderer).x1  # not over the curves
