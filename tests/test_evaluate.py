"""`evaluate`: survival numbers against lifelines' API and a published textbook analysis, metric
CIs, calibration, bad input, and the self-contained report."""

from __future__ import annotations

import base64
import json
import platform
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.datasets import load_rossi, load_waltons
from lifelines.statistics import logrank_test, multivariate_logrank_test, proportional_hazard_test
from lifelines.utils import concordance_index
from sklearn.metrics import (
    balanced_accuracy_score,
    brier_score_loss,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from melanoma_mil.cli import main
from melanoma_mil.config import EvaluateConfig, load_config
from melanoma_mil.errors import UserError
from melanoma_mil.evaluation.calibration import calibration
from melanoma_mil.evaluation.classification import (
    classification_metrics,
    resample_tprs,
    roc_band,
)
from melanoma_mil.evaluation.evaluate import summary_line
from melanoma_mil.stats import _cluster_weights

FIGURES = {"roc", "pr", "calibration", "km"}
ROC_GRID = np.linspace(0, 1, 101)  # the FPRs roc_band reads
# x86-64 numpy (a baseline without FMA) computes np.interp without fused multiply-add, so
# roc_band's TPRs equal it bit for bit; where GCC fuses (aarch64) the last bit may differ
EXACT_INTERP = platform.machine() in ("x86_64", "AMD64")


def predictions_csv(path: Path, ids: list[str], prob: np.ndarray, classes: list[str]) -> Path:
    """A `predict`-style predictions.csv (one row per slide, status ok) for binary classes."""
    table = pd.DataFrame({"slide_id": ids, "prob": prob, f"prob_{classes[0]}": 1 - prob})
    table[f"prob_{classes[1]}"] = prob
    table["pred"] = np.where(prob >= 0.5, classes[1], classes[0])
    table = table.assign(n_tiles=10, status="ok", reason="")
    table.to_csv(path, index=False)
    return path


def evaluate_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    rc = main(["evaluate", *args])
    return rc, capsys.readouterr().err


# --------------------------------------------------------------------------- textbook numbers
# Fox, J. & Weisberg, S. (2011). "Cox Proportional-Hazards Regression for Survival Data in R",
# an appendix to An R Companion to Applied Regression, 2nd ed. (Sage), section 3: model
# `mod.allison`, coxph(Surv(week, arrest) ~ fin + age + race + wexp + mar + paro + prio) on the
# Rossi et al. (1980) recidivism data (432 released prisoners), which lifelines ships as
# load_rossi(). Published exp(coef), 95% limits and Pr(>|z|). R codes the factors as finyes,
# raceother, wexpyes, marnot married, paroyes; lifelines' copy codes race = 1 for black and
# mar = 1 for married, so those two hazard ratios (and limits) are the reciprocals here.
FOX_WEISBERG = {
    "age": (0.94418, 0.9043, 0.9858, 0.00903),
    "race": (1 / 0.73059, 1 / 1.3361, 1 / 0.3995, 0.30812),
    "wexp": (0.86088, 0.5679, 1.3049, 0.48029),
    "mar": (1 / 1.54296, 1 / 3.2614, 1 / 0.7300, 0.25606),
    "paro": (0.91863, 0.6259, 1.3482, 0.66461),
    "prio": (1.09581, 1.0360, 1.1591, 0.00140),
}
FIN = (0.68426, 0.4702, 0.9957, 0.04742)  # finyes: financial aid on release


@pytest.fixture(scope="module")
def rossi(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, dict, Path]:
    """Rossi through the whole command: 'predicted' aid vs no aid, the other terms covariates."""
    root = tmp_path_factory.mktemp("rossi")
    data = load_rossi()
    ids = [f"p{i:03d}" for i in range(len(data))]
    data.assign(patient_id=ids).to_csv(root / "clinical.csv", index=False)
    prob = np.where(data["fin"] == 1, 0.9, 0.1)
    preds = predictions_csv(root / "predictions.csv", ids, prob, ["no_aid", "aid"])
    rc = main(
        [
            "evaluate",
            f"predictions={preds}",
            f"clinical_csv={root / 'clinical.csv'}",
            "time_column=week",
            "event_column=arrest",
            "covariates=[age,race,wexp,mar,paro,prio]",
            "bootstrap=200",
            f"output_dir={root / 'out'}",
        ]
    )
    assert rc == 0
    return data, json.loads((root / "out" / "evaluation.json").read_text()), root


def test_adjusted_cox_reproduces_fox_weisberg_rossi(rossi: tuple) -> None:
    _, ev, _ = rossi
    cox = ev["survival"]["cox"]
    assert ev["survival"]["patients_used"] == 432 and cox["adjusted_n"] == 432
    terms = {"group: aid vs no_aid": FIN, **FOX_WEISBERG}
    assert set(cox["adjusted"]) == set(terms)
    for term, (hr, low, high, p) in terms.items():
        got = cox["adjusted"][term]
        assert got["hr"] == pytest.approx(hr, rel=1e-3), term
        assert got["ci_low"] == pytest.approx(low, rel=2e-3), term
        assert got["ci_high"] == pytest.approx(high, rel=2e-3), term
        assert got["p"] == pytest.approx(p, abs=5e-4), term


def test_survival_numbers_match_lifelines_api(rossi: tuple) -> None:
    data, ev, root = rossi
    surv = ev["survival"]
    aid, none = data[data["fin"] == 1], data[data["fin"] == 0]
    lr = logrank_test(aid["week"], none["week"], aid["arrest"], none["arrest"])
    assert surv["logrank"]["statistic"] == pytest.approx(lr.test_statistic, rel=1e-9)
    assert surv["logrank"]["p"] == pytest.approx(lr.p_value, rel=1e-9)
    assert surv["logrank"]["df"] == 1
    uni = CoxPHFitter().fit(data[["week", "arrest", "fin"]], "week", "arrest").summary
    got = surv["cox"]["univariable"]
    assert got["term"] == "group: aid vs no_aid"
    assert got["hr"] == pytest.approx(uni.loc["fin", "exp(coef)"], rel=1e-6)
    assert got["ci_low"] == pytest.approx(uni.loc["fin", "exp(coef) lower 95%"], rel=1e-6)
    assert got["p"] == pytest.approx(uni.loc["fin", "p"], rel=1e-6)
    assert surv["groups"]["aid"] == {
        "n": 216,
        "events": int(aid["arrest"].sum()),
        "median": None,  # fewer than half were arrested within the year: not reached
        "median_ci_low": None,
        "median_ci_high": None,
    }
    # the probability (0.9 aid, 0.1 none) as a score: Harrell's C as lifelines computes it
    c = concordance_index(data["week"], np.where(data["fin"] == 1, 0.9, 0.1), data["arrest"])
    assert surv["c_index"]["value"] == pytest.approx(c, rel=1e-9)
    assert surv["c_index"]["ci_low"] < c < surv["c_index"]["ci_high"]
    # proportional hazards: lifelines' Schoenfeld test flags age and wexp in the full model
    full = CoxPHFitter().fit(data, "week", "arrest")
    ph = proportional_hazard_test(full, data, time_transform="rank").summary["p"]
    assert surv["cox"]["ph_check"]["adjusted"]["p"]["age"] == pytest.approx(ph["age"], rel=1e-6)
    assert surv["cox"]["ph_check"]["adjusted"]["violated"] == ["age", "wexp"]
    assert surv["cox"]["ph_check"]["ok"] is False
    assert any("proportional-hazards assumption fails" in n for n in surv["notes"])
    assert ev["classification"] is None and "no labels" in ev["warnings"][0]
    assert {p.stem for p in (root / "out").glob("*.png")} == {"km"}


def test_kaplan_meier_medians_and_quantile_groups_match_lifelines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = load_waltons()
    ids = [f"m{i:03d}" for i in range(len(data))]
    data.assign(patient_id=ids).to_csv(tmp_path / "clinical.csv", index=False)
    prob = np.where(data["group"] == "miR-137", 0.8, 0.3)
    preds = predictions_csv(tmp_path / "p.csv", ids, prob, ["control", "mir137"])
    common = [f"{preds}", f"clinical_csv={tmp_path / 'clinical.csv'}", "time_column=T"]
    rc, _ = evaluate_cli(
        capsys, *common, "event_column=E", f"output_dir={tmp_path / 'a'}", "bootstrap=100"
    )
    assert rc == 0
    groups = json.loads((tmp_path / "a" / "evaluation.json").read_text())["survival"]["groups"]
    for name, raw in (("mir137", "miR-137"), ("control", "control")):
        d = data[data["group"] == raw]
        kmf = KaplanMeierFitter().fit(d["T"], d["E"])
        assert groups[name]["median"] == pytest.approx(kmf.median_survival_time_)
        assert groups[name]["n"] == len(d) and groups[name]["events"] == d["E"].sum()
    # three quantile groups of a continuous score: log-rank across all three (df = 2)
    rng = np.random.default_rng(0)
    score = np.clip(prob + rng.normal(0, 0.1, len(data)), 0.01, 0.99)
    preds = predictions_csv(tmp_path / "q.csv", ids, score, ["control", "mir137"])
    rc, _ = evaluate_cli(
        capsys,
        f"predictions={preds}",
        *common[1:],
        "event_column=E",
        "groups=quantiles:3",
        f"output_dir={tmp_path / 'q'}",
        "bootstrap=100",
    )
    assert rc == 0
    surv = json.loads((tmp_path / "q" / "evaluation.json").read_text())["survival"]
    groups = pd.qcut(score, 3, labels=["Q1", "Q2", "Q3"]).astype(str)
    lr = multivariate_logrank_test(data["T"], groups, data["E"])
    assert surv["logrank"]["df"] == 2
    assert surv["logrank"]["statistic"] == pytest.approx(lr.test_statistic, rel=1e-9)
    assert surv["cox"]["univariable"]["term"] == "group: Q3 vs Q1"
    assert set(surv["cox"]["univariable_all"]) == {"group: Q2 vs Q1", "group: Q3 vs Q1"}
    assert [surv["groups"][g]["n"] for g in ("Q1", "Q2", "Q3")] == [
        int((groups == g).sum()) for g in ("Q1", "Q2", "Q3")
    ]


# --------------------------------------------------------------------------- classification
def _binary_cohort(n_patients: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n_patients)
    p = np.clip(0.5 + (y - 0.5) * 0.4 + rng.normal(0, 0.25, n_patients), 0.01, 0.99)
    return y, np.stack([1 - p, p], 1), np.array([f"p{i}" for i in range(n_patients)])


def test_metrics_match_sklearn_and_cis_resample_patients() -> None:
    y, probs, patients = _binary_cohort(120, 0)
    got = classification_metrics(y, probs, patients, threshold=0.6, n_boot=400, seed=0)
    pred = (probs[:, 1] >= 0.6).astype(int)
    expected = {
        "auc": roc_auc_score(y, probs[:, 1]),
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "sensitivity": recall_score(y, pred),
        "specificity": recall_score(y, pred, pos_label=0),
        "ppv": precision_score(y, pred),
        "npv": precision_score(y, pred, pos_label=0),
        "f1": f1_score(y, pred),
    }
    for name, value in expected.items():
        m = got[name]
        assert m["value"] == pytest.approx(value, rel=1e-9), name
        assert m["ci_low"] < m["value"] < m["ci_high"], name
        assert 0.02 < m["ci_high"] - m["ci_low"] < 0.4, name  # 120 patients: a few points
    # two identical slides per patient carry no extra information: resampling patients gives
    # the very same CIs; resampling slides as if independent would narrow them
    twice = classification_metrics(
        np.repeat(y, 2), np.repeat(probs, 2, 0), np.repeat(patients, 2), 0.6, 400, 0
    )
    assert twice["auc"] == pytest.approx(got["auc"], rel=1e-9)
    slides = classification_metrics(
        np.repeat(y, 2), np.repeat(probs, 2, 0), np.arange(240), 0.6, 400, 0
    )
    assert (
        slides["auc"]["ci_high"] - slides["auc"]["ci_low"]
        < got["auc"]["ci_high"] - (got["auc"]["ci_low"])
    )
    # more patients, narrower intervals
    y4, p4, pt4 = _binary_cohort(1200, 1)
    big = classification_metrics(y4, p4, pt4, 0.6, 400, 0)
    assert big["auc"]["ci_high"] - big["auc"]["ci_low"] < 0.5 * (
        got["auc"]["ci_high"] - got["auc"]["ci_low"]
    )


def test_multiclass_metrics_are_macro_one_vs_rest() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 150)
    logits = rng.normal(0, 1, (150, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    got = classification_metrics(y, probs, np.arange(150), 0.5, 200, 0)
    pred = probs.argmax(1)
    assert got["auc"]["value"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    assert got["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert got["f1"]["value"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert got["ppv"]["value"] == pytest.approx(precision_score(y, pred, average="macro"))


def _roc_curve_tprs(y: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The textbook (and roc_band's former loop): roc_curve of each resample's drawn cases,
    read by np.interp at 101 FPRs; a resample lacking a class is left out."""
    tprs = []
    for counts in w:
        keep = counts > 0
        if len(np.unique(y[keep])) < 2:
            continue
        fpr, tpr, _ = roc_curve(y[keep], score[keep], sample_weight=counts[keep])
        tprs.append(np.interp(ROC_GRID, fpr, tpr))
    return np.array(tprs).reshape(-1, len(ROC_GRID))


def _same_tprs(got: np.ndarray, expected: np.ndarray) -> bool:
    if got.shape != expected.shape:
        return False
    if EXACT_INTERP:
        return np.array_equal(got, expected)
    return np.allclose(got, expected, rtol=0, atol=1e-12)


def test_roc_band_equals_roc_curve_on_every_resample() -> None:
    """Every resample's TPRs equal roc_curve + np.interp bit for bit (ties within and across
    classes, resamples drawing one class, 1 to 400 patients, repeated slides), and so does the
    band; a cohort or resample of one class gives no curve, as before."""
    rng = np.random.default_rng(0)
    rows = 0
    for case in range(400):
        n = int(rng.choice([1, 2, 3, 4, 5, 12, 60, 400]))
        y = rng.integers(0, 2, n)
        score = [
            rng.random(n),
            rng.integers(0, 3, n) / 2,  # three scores: long tied runs, collinear points
            np.round(rng.random(n) * 0.5 + 0.4 * y, 2),
            rng.integers(0, 5, n) / 7,
        ][case % 4]
        patients = rng.integers(0, n // 2 + 1, n) if case % 3 == 0 else np.arange(n)
        w = _cluster_weights(patients, 20, rng)
        expected = _roc_curve_tprs(y, score, w)
        got = resample_tprs(y, score, w, ROC_GRID)
        assert _same_tprs(got, expected), (case, n)
        rows += len(expected)
    assert rows > 4000  # most resamples drew both classes
    y, probs, patients = _binary_cohort(300, 5)
    grid, low, high = roc_band(y, probs[:, 1], patients, 2000, 3)
    w = _cluster_weights(patients, 1000, np.random.default_rng(4))  # roc_band's draws: seed + 1
    expected = np.quantile(_roc_curve_tprs(y, probs[:, 1], w), [0.025, 0.975], axis=0)
    assert np.array_equal(grid, ROC_GRID) and _same_tprs(np.stack([low, high]), expected)
    for one_class in (np.zeros(5, int), np.ones(5, int)):
        band = roc_band(one_class, rng.random(5), np.arange(5), 100, 0)
        assert np.isnan(band[1]).all() and np.isnan(band[2]).all()


def test_calibration_brier_and_ece_against_textbook_loop() -> None:
    rng = np.random.default_rng(3)
    p = rng.uniform(0, 1, 5000)
    y = (rng.uniform(0, 1, 5000) < p).astype(int)  # calibrated by construction
    probs = np.stack([1 - p, p], 1)
    cal = calibration(y, probs, 10)
    assert cal["brier"] == pytest.approx(brier_score_loss(y, p))
    assert cal["ece"] < 0.03
    skewed = calibration(y, np.stack([1 - p**3, p**3], 1), 10)  # overconfident low
    gap = 0.0
    for b in range(10):  # ECE the slow way: every bin's weighted gap
        inside = (p**3 >= b / 10) & ((p**3 < (b + 1) / 10) | (b == 9))
        if inside.any():
            gap += inside.mean() * abs(y[inside].mean() - (p**3)[inside].mean())
    assert skewed["ece"] == pytest.approx(gap, rel=1e-9) and skewed["ece"] > 0.1
    assert sum(b["n"] for b in skewed["reliability"]) == 5000


# --------------------------------------------------------------------------- bad input
@pytest.fixture()
def small(tmp_path: Path) -> Path:
    """40 patients, binary predictions with labels carried by a labels CSV, survival data."""
    write_small(tmp_path)
    return tmp_path


def write_small(tmp_path: Path) -> np.random.Generator:
    """`small`'s files in ``tmp_path``; returns the generator, for columns drawn after them."""
    rng = np.random.default_rng(4)
    ids = [f"s{i:02d}" for i in range(40)]
    y = np.arange(40) % 2
    prob = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.1, 40), 0.01, 0.99)
    predictions_csv(tmp_path / "predictions.csv", ids, prob, ["low", "high"])
    labels = pd.DataFrame({"slide_id": ids, "label": np.where(y, "high", "low")})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    time = np.round(rng.exponential(np.where(y, 60, 20)), 1)
    clinical = pd.DataFrame({"patient_id": ids, "time": time, "event": rng.integers(0, 2, 40)})
    clinical["event"] = clinical["event"].where(np.arange(40) >= 4, 1)  # events in both groups
    clinical.to_csv(tmp_path / "clinical.csv", index=False)
    return rng


def _args(root: Path, *extra: str) -> list[str]:
    return [
        f"predictions={root / 'predictions.csv'}",
        f"labels_csv={root / 'labels.csv'}",
        f"clinical_csv={root / 'clinical.csv'}",
        f"output_dir={root / 'out'}",
        "bootstrap=100",
        *extra,
    ]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.drop(columns="event"), r"lacks column\(s\) \['event'\]"),
        (lambda c: c.assign(time=c["time"].astype(str).where(c.index != 3, "ten")), "not a number"),
        (lambda c: c.assign(time=c["time"].where(c.index != 5, -1.0)), "negative"),
        (lambda c: c.assign(event=c["event"].where(c.index != 2, 2)), "not 0 or 1"),
        (lambda c: pd.concat([c, c.iloc[:1]]), "twice"),
    ],
)
def test_bad_clinical_csv_is_one_line_exit_2_and_writes_nothing(
    small: Path, capsys: pytest.CaptureFixture[str], edit, message: str
) -> None:
    edit(pd.read_csv(small / "clinical.csv")).to_csv(small / "clinical.csv", index=False)
    rc, err = evaluate_cli(capsys, *_args(small))
    assert rc == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err) and "clinical.csv" in err
    assert not (small / "out").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["groups=quantiles:1"], "is not of the form predicted|median|quantiles:K"),
        (["groups=tertiles"], "is not of the form"),
        (["level=bag"], "is not one of patient|slide"),
    ],
)
def test_bad_groups_fail_clearly(
    small: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    rc, err = evaluate_cli(capsys, *_args(small, *extra))
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (small / "out").exists()


def test_patients_without_clinical_data_are_listed_not_fatal(
    small: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clinical = pd.read_csv(small / "clinical.csv")
    clinical = clinical[~clinical["patient_id"].isin(["s06", "s07", "s08"])]
    clinical.loc[clinical["patient_id"] == "s09", "time"] = np.nan  # no follow-up recorded
    clinical.to_csv(small / "clinical.csv", index=False)
    rc, _ = evaluate_cli(capsys, *_args(small))
    assert rc == 0
    ev = json.loads((small / "out" / "evaluation.json").read_text())
    assert ev["survival"]["patients_used"] == 36 and ev["survival"]["patients_excluded"] == 4
    reasons = {x["id"]: x["reason"] for x in ev["excluded"] if x["analysis"] == "survival"}
    assert reasons == {
        "s06": "not in clinical_csv",
        "s07": "not in clinical_csv",
        "s08": "not in clinical_csv",
        "s09": "empty time or event in clinical_csv",
    }
    assert ev["classification"]["sensitivity"]["value"] > 0.8  # all 40 still classified
    assert ev["counts"]["patients_scored"] == 40
    # a second run refuses to replace the first without overwrite=true
    rc, err = evaluate_cli(capsys, *_args(small))
    assert rc == 2 and "overwrite=true" in err


def test_multiclass_predicted_groups_one_curve_per_class(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(5)
    classes = ["a", "b", "c"]
    y = np.arange(60) % 3
    logits = rng.normal(0, 1, (60, 3)) + 2.0 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ids = [f"s{i:02d}" for i in range(60)]
    table = pd.DataFrame(
        {
            "slide_id": ids,
            "patient_id": ids,
            "fold": 0,
            "repeat": 0,
            "label": [classes[i] for i in y],
            "y": y,
        }
    )
    for i, c in enumerate(classes):
        table[f"prob_{c}"] = probs[:, i]
    table.to_csv(tmp_path / "predictions.csv", index=False)
    time = rng.exponential(np.array([10.0, 30.0, 90.0])[y])
    pd.DataFrame({"patient_id": ids, "time": time, "event": 1}).to_csv(
        tmp_path / "clinical.csv", index=False
    )
    rc, _ = evaluate_cli(
        capsys,
        str(tmp_path / "predictions.csv"),
        "bootstrap=100",
        f"clinical_csv={tmp_path / 'clinical.csv'}",
        f"output_dir={tmp_path / 'o'}",
    )
    assert rc == 0
    ev = json.loads((tmp_path / "o" / "evaluation.json").read_text())
    surv = ev["survival"]
    assert list(surv["groups"]) == classes and surv["logrank"]["df"] == 2
    pred = np.array(classes)[probs.argmax(1)]
    lr = multivariate_logrank_test(time, pred, np.ones(60))
    assert surv["logrank"]["statistic"] == pytest.approx(lr.test_statistic, rel=1e-9)
    assert surv["cox"]["univariable"]["term"] == "group: c vs a"
    assert ev["classification"]["auc"]["value"] == pytest.approx(
        roc_auc_score(y, probs, multi_class="ovr")
    )


def test_groups_form_is_checked_at_parse_time() -> None:
    assert load_config(EvaluateConfig, [], ["groups=quantiles:4"]).groups == "quantiles:4"
    with pytest.raises(UserError, match="quantiles:K"):
        load_config(EvaluateConfig, [], ["groups=quantiles:x"])


# --------------------------------------------------------------------------- report
class _Images(HTMLParser):
    """Every <img> (its figure name and source) and every other src/href of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, str] = {}
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images[a.get("data-figure") or "?"] = a.get("src") or ""
        else:
            self.links += [v for k, v in attrs if k in ("src", "href") and v]


def embedded_figures(report: Path) -> dict[str, bytes]:
    """The report's images decoded; fails if any image or resource is not inside the file."""
    page = _Images()
    page.feed(report.read_text())
    assert page.links == []  # no script, stylesheet or link to another file
    out = {}
    for name, src in page.images.items():
        head, _, data = src.partition(",")
        assert head in ("data:image/png;base64", "data:image/jpeg;base64"), name
        out[name] = base64.b64decode(data, validate=True)
        assert out[name][:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0"), name
    return out


def test_report_embeds_every_figure(small: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _ = evaluate_cli(capsys, *_args(small, "covariates=[]"))
    assert rc == 0
    ev = json.loads((small / "out" / "evaluation.json").read_text())
    assert "C-index 0." in summary_line(ev) and "higher = longer survival" in summary_line(ev)
    figures = embedded_figures(small / "out" / "report.html")
    assert set(figures) == FIGURES
    for name in FIGURES:  # the very images saved next to it
        assert figures[name] == (small / "out" / f"{name}.png").read_bytes()
    text = (small / "out" / "report.html").read_text()
    needles = ("balanced_accuracy", "Brier", "Log-rank", "Harrell", "evaluate config")
    for needle in (*needles, "higher = longer survival"):
        assert needle in text


def test_patients_average_their_slides_unless_level_slide(
    small: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = pd.read_csv(small / "labels.csv")
    labels["patient_id"] = [f"s{i - i % 4 + i % 2:02d}" for i in range(40)]  # 2 slides, 1 label
    labels.to_csv(small / "labels.csv", index=False)
    rc, _ = evaluate_cli(capsys, *_args(small, "groups=median"))
    assert rc == 0
    ev = json.loads((small / "out" / "evaluation.json").read_text())
    assert ev["classification"]["n"] == 20 and ev["survival"]["patients_used"] == 20
    assert "averaged" in ev["level_note"]
    preds = pd.read_csv(small / "predictions.csv").merge(labels, on="slide_id")
    mean = preds.groupby("patient_id")["prob_high"].mean()
    y = (preds.groupby("patient_id")["label"].first() == "high").astype(int)
    assert ev["classification"]["auc"]["value"] == pytest.approx(roc_auc_score(y, mean))
    rc, _ = evaluate_cli(capsys, *_args(small, "level=slide", "overwrite=true"))
    ev = json.loads((small / "out" / "evaluation.json").read_text())
    assert rc == 0 and ev["classification"]["n"] == 40 and ev["classification"]["patients"] == 20
    assert ev["survival"]["patients_used"] == 20  # survival is always per patient
