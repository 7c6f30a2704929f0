"""`evaluate` on survival data that cannot give every number: a predicted group without events,
no events at all, a Cox model that does not converge, and patients without a covariate. What
the data do give (Kaplan-Meier, log-rank, classification) is still written; what they cannot
give is marked not estimable with the reason; every patient left out of a model is listed."""

from __future__ import annotations

import html as htmllib
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import Pipeline
from lifelines import CoxPHFitter
from lifelines.exceptions import ConvergenceError
from lifelines.statistics import logrank_test
from lifelines.utils import concordance_index
from test_evaluate import FIGURES, _args, embedded_figures, evaluate_cli, write_small
from test_evaluate_runs import fit_cfg

from melanoma_mil.evaluation.cox import _no_estimate
from melanoma_mil.evaluation.evaluate import summary_line
from melanoma_mil.evaluation.hooks import write_report


def _edit_clinical(root: Path, **columns: object) -> pd.DataFrame:
    clinical = pd.read_csv(root / "clinical.csv", dtype={"patient_id": str})
    clinical = clinical.assign(**columns)
    clinical.to_csv(root / "clinical.csv", index=False)
    return clinical


def _high(root: Path) -> np.ndarray:
    """The patients predicted 'high' (prob_high >= 0.5, the default threshold)."""
    return pd.read_csv(root / "predictions.csv")["prob_high"].to_numpy() >= 0.5


def _outputs(root: Path) -> tuple[dict, str]:
    out = root / "out"
    assert {p.stem for p in out.glob("*.png")} == FIGURES  # classification figures too
    assert set(embedded_figures(out / "report.html")) == FIGURES
    return json.loads((out / "evaluation.json").read_text()), (out / "report.html").read_text()


def _text(html: str) -> str:
    """The page's text as a reader sees it: tags dropped, entities decoded, spaces collapsed."""
    return re.sub(r"\s+", " ", htmllib.unescape(re.sub(r"<[^>]+>", " ", html)))


def test_a_group_without_events_keeps_km_logrank_and_classification(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_small(tmp_path)
    high = _high(tmp_path)
    event = np.where(high, 0, 1)  # every event in the predicted 'low' group
    clinical = _edit_clinical(tmp_path, event=event)
    rc, err = evaluate_cli(capsys, *_args(tmp_path))
    assert rc == 0, err
    ev, html = _outputs(tmp_path)
    surv = ev["survival"]
    assert ev["classification"]["auc"]["value"] is not None
    t = clinical["time"].to_numpy()
    lr = logrank_test(t[high], t[~high], event[high], event[~high])
    assert surv["logrank"]["p"] == pytest.approx(lr.p_value, rel=1e-9)
    assert surv["logrank"]["not_estimable"] is None
    assert surv["groups"]["high"] == {
        "n": int(high.sum()),
        "events": 0,
        "median": None,  # never reached: the curve stays at 1
        "median_ci_low": None,
        "median_ci_high": None,
    }
    uni = surv["cox"]["univariable"]
    assert uni["hr"] is None and uni["ci_low"] is None and uni["ci_high"] is None
    why = f"group 'high' has no events among its {int(high.sum())} patients"
    assert uni["not_estimable"].startswith(why)
    assert surv["cox"]["ph_check"]["univariable"] is None and surv["cox"]["ph_check"]["ok"] is None
    assert any(why in n for n in surv["notes"])
    text = _text(html)
    assert "HR high vs low not estimable" in text and why in text
    assert "univariable: group: high vs low 40 not estimable" in text
    line = summary_line(ev)  # what `evaluate` prints
    assert "log-rank p " in line and "HR high vs low not estimable" in line


def test_no_events_at_all_marks_logrank_hr_and_c_index_not_estimable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_small(tmp_path)
    _edit_clinical(tmp_path, event=0)  # nobody died yet
    rc, err = evaluate_cli(capsys, *_args(tmp_path))
    assert rc == 0, err
    ev, html = _outputs(tmp_path)
    surv = ev["survival"]
    assert ev["classification"]["auc"]["value"] is not None
    why = "no events among the 40 patients"
    assert surv["logrank"]["p"] is None and surv["logrank"]["not_estimable"] == why
    assert surv["cox"]["univariable"]["hr"] is None
    assert surv["cox"]["univariable"]["not_estimable"] == why
    assert surv["c_index"]["value"] is None and why in surv["c_index"]["not_estimable"]
    assert all(g["events"] == 0 for g in surv["groups"].values())
    text = _text(html)
    assert f"Log-rank: not estimable ({why})" in text
    assert "Proportional hazards (Schoenfeld residuals, rank(time) (lifelines)): not tested" in text
    line = summary_line(ev)
    assert "log-rank not estimable, HR high vs low not estimable, C-index not estimable" in line


def test_a_cox_model_that_does_not_converge_is_not_estimable_not_fatal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_small(tmp_path)
    clinical = _edit_clinical(tmp_path, site=7.0)  # a constant covariate: lifelines fails
    rc, err = evaluate_cli(capsys, *_args(tmp_path, "covariates=[site]"))
    assert rc == 0, err
    ev, html = _outputs(tmp_path)
    cox = ev["survival"]["cox"]
    assert cox["adjusted"] == {
        term: {"hr": None, "ci_low": None, "ci_high": None, "p": None}
        for term in ("group: high vs low", "site")
    }
    assert "did not converge" in cox["adjusted_not_estimable"]
    assert "drop it from covariates" in cox["adjusted_not_estimable"]
    assert cox["ph_check"]["adjusted"] is None
    # the univariable model is unaffected and matches lifelines
    data = clinical.assign(g=_high(tmp_path).astype(float))[["time", "event", "g"]]
    ref = CoxPHFitter().fit(data, "time", "event").summary.loc["g"]
    assert cox["univariable"]["hr"] == pytest.approx(ref["exp(coef)"], rel=1e-6)
    assert cox["univariable"]["not_estimable"] is None
    assert cox["ph_check"]["ok"] is not None
    text = _text(html)
    assert "adjusted: site 40 not estimable" in text
    assert "the adjusted model not tested: not estimable" in text
    assert any("adjusted Cox: hazard ratios not estimable" in n for n in ev["survival"]["notes"])


def test_a_cox_fit_lifelines_stops_unconverged_reports_no_hazard_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """lifelines does not raise when Newton-Raphson stops short: it warns and returns the last
    step's coefficients (on a 7-patient cohort, HR 1e-4 with a CI of 1e-195 to 1e186). Those
    must read "not estimable", as a fit that raises does."""
    write_small(tmp_path)
    clinical = pd.read_csv(tmp_path / "clinical.csv")
    _edit_clinical(tmp_path, marker=-clinical["time"])  # earlier failure, higher marker
    rc, err = evaluate_cli(capsys, *_args(tmp_path, "covariates=[marker]"))
    assert rc == 0, err
    ev, html = _outputs(tmp_path)
    cox = ev["survival"]["cox"]
    assert cox["adjusted"] == {
        term: {"hr": None, "ci_low": None, "ci_high": None, "p": None}
        for term in ("group: high vs low", "marker")
    }
    assert "did not converge (Newton-Raphson failed" in cox["adjusted_not_estimable"]
    assert "drop it from covariates" in cox["adjusted_not_estimable"]
    assert cox["ph_check"]["adjusted"] is None
    assert cox["univariable"]["not_estimable"] is None and cox["univariable"]["hr"] is not None
    assert "adjusted: marker 40 not estimable" in _text(html)


def test_patients_without_a_covariate_are_listed_and_the_adjusted_n_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = write_small(tmp_path)
    breslow = np.round(rng.gamma(2, 1.5, 40), 1).astype(object)
    breslow[:10] = "NA"
    stage = np.array(["I", "II", "III"], dtype=object)[np.arange(40) % 3]
    stage[5:13] = ""
    clinical = _edit_clinical(tmp_path, breslow=breslow, stage=stage)
    clinical[clinical["patient_id"] != "s39"].to_csv(tmp_path / "clinical.csv", index=False)
    rc, err = evaluate_cli(capsys, *_args(tmp_path, "covariates=[breslow,stage]"))
    assert rc == 0, err
    ev, html = _outputs(tmp_path)
    surv = ev["survival"]
    left = {x["id"]: x["reason"] for x in ev["excluded"] if x["analysis"] == "adjusted Cox"}
    assert left == {
        **{f"s{i:02d}": "missing breslow" for i in range(5)},
        **{f"s{i:02d}": "missing breslow, stage" for i in range(5, 10)},
        **{f"s{i:02d}": "missing stage" for i in range(10, 13)},
    }
    assert all(x["level"] == "patient" for x in ev["excluded"])
    # s39 has no clinical row: listed once, as left out of survival, not again for the model
    assert [x["analysis"] for x in ev["excluded"] if x["id"] == "s39"] == ["survival"]
    cox = surv["cox"]
    assert surv["patients_used"] == 39
    assert cox["adjusted_n"] == 39 - len(left) == 26 and cox["adjusted_left_out"] == len(left)
    # the n is lifelines' complete-case n
    used = pd.read_csv(tmp_path / "clinical.csv").dropna(subset=["breslow", "stage"])
    assert len(used) == cox["adjusted_n"]
    text = _text(html)
    assert (
        "adjusted: group: high vs low 26 " in text and "univariable: group: high vs low 39 " in text
    )
    assert "The adjusted model uses the 26 of 39 patients with every covariate; 13 lack one" in text
    assert text.count(" adjusted Cox missing breslow") == 10


def test_fit_hook_writes_the_report_when_nobody_has_died(
    pipe: Pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """fit/predict's own report: a survival problem no longer costs report.html, and their
    output says why a number is missing, as `evaluate`'s does."""
    clinical = pd.read_csv(pipe.root / "cohort" / "clinical.csv").assign(event=0)
    clinical.to_csv(tmp_path / "clinical.csv", index=False)
    cfg = fit_cfg(pipe, tmp_path / "unused", f"clinical_csv={tmp_path / 'clinical.csv'}")
    rc = write_report(cfg, tmp_path, pipe.run_dir / "predictions.csv", pipe.run_dir)
    assert rc == 0
    ev = json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())
    assert ev["classification"]["auc"]["value"] is not None
    assert ev["survival"]["cox"]["univariable"]["not_estimable"].startswith("no events among")
    assert "HR" in _text((tmp_path / "report.html").read_text())
    assert "  note: log-rank test not estimable: no events among" in capsys.readouterr().out


def test_c_index_without_a_comparable_pair_names_the_right_reason() -> None:
    """The only event ends the longest follow-up: lifelines finds no admissible pair though an
    event happened, so the reason must not say 'no events'."""
    from melanoma_mil.evaluation.clinical import EVENT, TIME
    from melanoma_mil.evaluation.concordance import c_index
    from melanoma_mil.evaluation.survival_groups import SCORE

    data = pd.DataFrame({TIME: [1.0, 2.0, 3.0], EVENT: [0, 0, 1], SCORE: [0.1, 0.2, 0.3]})
    out = c_index(data, n_boot=10, seed=0, score_name="p")
    assert np.isnan(out["value"]) and "no event happens before" in str(out["not_estimable"])
    none = c_index(data.assign(**{EVENT: 0}), n_boot=10, seed=0, score_name="p")
    assert "no events among the 3 patients" in str(none["not_estimable"])


def test_an_empty_predicted_group_leaves_only_the_group_comparison_not_estimable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A small external cohort all predicted one class: no log-rank test or hazard ratio, but
    classification, calibration, the C-index (of the probability) and one curve still stand."""
    rng = write_small(tmp_path)
    clinical = _edit_clinical(tmp_path, age=rng.integers(30, 80, 40))
    rc, err = evaluate_cli(capsys, *_args(tmp_path, "threshold=0.99", "covariates=[age]"))
    assert rc == 0, err
    ev, html = _outputs(tmp_path)
    surv = ev["survival"]
    assert ev["classification"]["auc"]["value"] is not None and ev["calibration"]["brier"] > 0
    why = surv["logrank"]["not_estimable"]
    assert why.startswith("no patient falls in group 'high' (predicted class: high when")
    assert "predicted 40 low; groups=median or groups=quantiles:K" in why
    assert surv["logrank"]["p"] is None and surv["cox"]["univariable"]["hr"] is None
    assert surv["cox"]["univariable"]["not_estimable"] == why
    assert surv["cox"]["adjusted_not_estimable"] == why and surv["cox"]["adjusted_n"] == 40
    assert surv["groups"]["high"] == {
        "n": 0,
        "events": 0,
        "median": None,
        "median_ci_low": None,
        "median_ci_high": None,
    }
    assert surv["groups"]["low"]["n"] == 40
    prob = pd.read_csv(tmp_path / "predictions.csv")["prob_high"]
    c = concordance_index(clinical["time"], prob, clinical["event"])
    assert surv["c_index"]["value"] == pytest.approx(c, rel=1e-9)
    assert surv["notes"] == [
        f"groups not compared (log-rank test and hazard ratios not estimable): {why}. "
        "The C-index uses the probability, not the groups."
    ]
    text = _text(html)
    assert "high 0 0 - - -" in text and f"Log-rank: not estimable ({why})" in text
    assert "HR high vs low not estimable" in summary_line(ev)


@pytest.mark.parametrize(
    ("groups", "why", "curves", "order"),
    [
        ("median", "no patient falls in group 'low' (prob_high >= the cohort's median", {"high"},
         ["low", "high"]),
        ("quantiles:3", "3 quantile groups cannot be cut", {"all patients"}, ["all patients"]),
    ],
)  # fmt: skip
def test_groups_a_tied_cohort_cannot_make_are_not_estimable_and_never_self_suggested(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    groups: str,
    why: str,
    curves: set,
    order: list[str],
) -> None:
    write_small(tmp_path)
    preds = pd.read_csv(tmp_path / "predictions.csv")
    tied = preds.assign(prob=0.6, prob_low=0.4, prob_high=0.6)
    tied.to_csv(tmp_path / "predictions.csv", index=False)
    rc, err = evaluate_cli(capsys, *_args(tmp_path, f"groups={groups}"))
    assert rc == 0, err
    surv = json.loads((tmp_path / "out" / "evaluation.json").read_text())["survival"]
    reason = surv["logrank"]["not_estimable"]
    assert reason.startswith(why) and reason.endswith("all 40 patients share prob_high 0.6")
    assert f"groups={groups.split(':')[0]}" not in reason  # no advice to use what failed
    assert surv["cox"]["univariable"]["not_estimable"] == reason
    assert {g for g, v in surv["groups"].items() if v["n"]} == curves
    assert surv["group_order"] == order  # the groups used, not those asked for
    assert surv["c_index"]["value"] == pytest.approx(0.5)  # every pair tied on the score
    assert (tmp_path / "out" / "km.png").is_file()


def test_fit_hook_writes_the_report_when_a_predicted_group_is_empty(
    pipe: Pipeline, tmp_path: Path
) -> None:
    """After training an empty group is no input error: the report is written, exit 0."""
    clinical = pd.read_csv(pipe.root / "cohort" / "clinical.csv")
    clinical.to_csv(tmp_path / "clinical.csv", index=False)
    clinical_csv = f"clinical_csv={tmp_path / 'clinical.csv'}"
    cfg = fit_cfg(pipe, tmp_path / "unused", clinical_csv, "threshold=0.9999")  # all negative
    rc = write_report(cfg, tmp_path, pipe.run_dir / "predictions.csv", pipe.run_dir)
    assert rc == 0
    ev = json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())
    assert ev["classification"]["auc"]["value"] is not None
    assert "no patient falls in group" in ev["survival"]["logrank"]["not_estimable"]
    assert ev["survival"]["c_index"]["not_estimable"] is None
    assert "not estimable" in _text((tmp_path / "report.html").read_text())


@pytest.mark.parametrize("value", ["", "NA", "III"], ids=["empty", "na", "one-level"])
def test_a_covariate_that_adjusts_for_nothing_is_not_estimable_not_silently_dropped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    """A covariate without values, or a categorical one with a single level, gives the design
    matrix no column: the 'adjusted' model was the univariable one, reported as adjusted."""
    write_small(tmp_path)
    _edit_clinical(tmp_path, stage=value)
    rc, err = evaluate_cli(capsys, *_args(tmp_path, "covariates=[stage]"))
    assert rc == 0, err
    assert "FutureWarning" not in err
    ev, html = _outputs(tmp_path)
    cox = ev["survival"]["cox"]
    assert cox["univariable"]["hr"] is not None
    assert cox["adjusted"]["group: high vs low"]["hr"] is None
    assert "covariate 'stage'" in cox["adjusted_not_estimable"]
    assert "drop it from covariates" in cox["adjusted_not_estimable"]
    assert any("adjusted Cox: hazard ratios not estimable" in n for n in ev["survival"]["notes"])


def test_groups_followed_apart_have_no_hazard_ratio_though_each_has_events(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every 'high' event comes after the last 'low' patient left follow-up: those events
    compare no 'low' patient, and lifelines "converged" on an HR of about 1e-8."""
    write_small(tmp_path)
    high = _high(tmp_path)
    time = np.where(high, 11 + np.arange(40) % 10, 1 + np.arange(40) % 10).astype(float)
    _edit_clinical(tmp_path, time=time, event=1)
    rc, err = evaluate_cli(capsys, *_args(tmp_path))
    assert rc == 0, err
    ev, html = _outputs(tmp_path)
    uni = ev["survival"]["cox"]["univariable"]
    why = "no patient of 'low' is still followed at any event of 'high' (last follow-up 10, first"
    assert uni["hr"] is None and uni["not_estimable"].startswith(why)
    assert ev["survival"]["logrank"]["p"] is not None  # the curves still compare
    assert why in _text(html)


def test_hazard_ratios_are_marked_not_estimable_exactly_when_lifelines_diverges() -> None:
    """Against lifelines itself on random cohorts of 2 and 3 groups, some followed apart: the
    reason is given iff lifelines' fit fails or ends on a coefficient beyond |8| (HR 3000)."""
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(120):
        k, n = int(rng.integers(2, 4)), int(rng.integers(6, 30))
        g = rng.integers(0, k, n)
        shift = rng.uniform(0, 12, k) * (rng.random() < 0.6)
        t = np.round(rng.uniform(0, 5, n) + shift[g], int(rng.integers(0, 2)))
        e = (rng.random(n) < rng.uniform(0.2, 0.9)).astype(int)
        if len(set(g)) < k or not all(e[g == i].any() for i in range(k)):
            continue  # groups without events: covered above
        order = [f"g{i}" for i in range(k)]
        why = _no_estimate(pd.Series([order[i] for i in g]), pd.Series(t), pd.Series(e), order)
        x = pd.DataFrame({f"d{i}": (g == i).astype(float) for i in range(1, k)})
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fit = CoxPHFitter().fit(x.assign(t=t, e=e), "t", "e")
            diverged = bool(fit.params_.abs().max() > 8)
        except ConvergenceError:
            diverged = True
        assert (why is not None) == diverged, (g, t, e, why)
        seen.add(diverged)
    assert seen == {True, False}


def test_everyone_at_risk_dying_at_the_one_event_time_gives_no_hazard_ratio(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """All events at one time that ends everyone's follow-up: the exact partial likelihood is
    then constant, yet lifelines (Efron ties) said HR 1.00 (0.54-1.86), p = 1."""
    write_small(tmp_path)
    time = np.where(np.arange(40) < 6, 2.0, 30.0)  # 6 censored early, the rest die at 30
    _edit_clinical(tmp_path, time=time, event=(time == 30).astype(int))
    rc, err = evaluate_cli(capsys, *_args(tmp_path))
    assert rc == 0, err
    ev, html = _outputs(tmp_path)
    uni = ev["survival"]["cox"]["univariable"]
    why = "no patient is still followed after any event"
    assert uni["hr"] is None and uni["p"] is None and uni["not_estimable"].startswith(why)
    assert "hazard ratio" in uni["not_estimable"]
    assert ev["survival"]["logrank"]["p"] is None  # as the log-rank test already said
    assert any(why in n and "Cox" in n for n in ev["survival"]["notes"])
    assert "HR high vs low not estimable" in _text(html)


def test_a_last_event_time_that_ends_follow_up_still_leaves_an_estimable_hazard_ratio() -> None:
    """Only the last event time has everyone at risk dying; the earlier ones order patients,
    so lifelines' HR stands, while one event time for everyone has none."""
    g = pd.Series(["a", "b"] * 5)
    order = ["a", "b"]
    one = (pd.Series([4.0] * 10), pd.Series([1] * 10))
    mixed = (pd.Series([1, 2, 3, 3, 5, 6, 7, 8, 9, 9.0]), pd.Series([1, 1, 0, 1, 1, 0, 1, 1, 1, 1]))
    fits = {}
    for name, (t, e) in {"one": one, "mixed": mixed}.items():
        x = pd.DataFrame({"b": (g == "b").astype(float), "t": t, "e": e})
        fits[name] = CoxPHFitter().fit(x, "t", "e").summary.loc["b"]
    assert fits["one"]["exp(coef)"] == pytest.approx(1.0) and fits["one"]["p"] == pytest.approx(1)
    assert _no_estimate(g, *one, order).startswith("no patient is still followed after any event")
    assert fits["mixed"]["exp(coef)"] != pytest.approx(1.0, abs=0.05)
    assert _no_estimate(g, *mixed, order) is None


def test_c_index_bootstrap_matches_lifelines_on_every_resample(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The vectorised bootstrap gives lifelines' concordance_index of each resample bit for bit,
    with tied times, tied scores, censoring at a death's time and resamples without a pair; so
    does the per-resample loop kept for cohorts above VECTORISED_CASES."""
    from melanoma_mil.evaluation import concordance
    from melanoma_mil.evaluation.clinical import EVENT, TIME
    from melanoma_mil.evaluation.concordance import c_index, concordance_sums
    from melanoma_mil.evaluation.survival_groups import SCORE
    from melanoma_mil.stats import _chunks, _cluster_weights

    rng = np.random.default_rng(3)
    n = 60
    t = rng.integers(1, 12, n).astype(float)  # many tied times
    s = rng.integers(0, 8, n) / 8  # many tied scores
    e = rng.integers(0, 2, n)
    w = _cluster_weights(np.arange(n), 300, rng)
    w[0] = 0
    w[0, :2] = 1  # a resample of two patients: maybe no comparable pair
    pairs, concordant = concordance_sums(t, s, e, w)
    for row, p, c in zip(w.astype(int), pairs, concordant, strict=True):
        idx = np.repeat(np.arange(n), row)
        try:
            expected = concordance_index(t[idx], s[idx], e[idx])
        except ZeroDivisionError:
            assert p == 0
            continue
        assert c / p == expected

    # and the CI over resamples is the one the per-resample loop gave
    data = pd.DataFrame({TIME: t, EVENT: e, SCORE: s})
    boot = np.random.default_rng(0 + 2)
    reps = []
    for b in _chunks(200, n):
        for row in _cluster_weights(np.arange(n), b, boot).astype(int):
            idx = np.repeat(np.arange(n), row)
            reps.append(concordance_index(t[idx], s[idx], e[idx]))
    out = c_index(data, n_boot=200, seed=0, score_name="p")
    assert [out["ci_low"], out["ci_high"]] == np.quantile(reps, [0.025, 0.975]).tolist()
    monkeypatch.setattr(concordance, "VECTORISED_CASES", 0)
    assert c_index(data, n_boot=200, seed=0, score_name="p") == out
