"""The log-rank test across predicted groups when it has no variance to compare them with
(every event when nobody at risk outlives it, or groups never followed together at an event):
lifelines then says chi2 = 0, p = 1; it is reported as not estimable, with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines.statistics import multivariate_logrank_test
from test_evaluate import _args, write_small
from test_survival_edges import _edit_clinical, _text

from melanoma_mil.cli import main
from melanoma_mil.evaluation.clinical import EVENT, TIME
from melanoma_mil.evaluation.logrank import group_logrank
from melanoma_mil.evaluation.survival_groups import GROUP, Groups


def _test(t: list[float], g: list[str], e: list[int]) -> tuple[dict, float, float]:
    """Ours and lifelines' (statistic, p) on one cohort."""
    data = pd.DataFrame({TIME: t, GROUP: g, EVENT: e})
    ours = group_logrank(data, Groups(pd.Series(g), sorted(set(g)), "test"))
    lr = multivariate_logrank_test(pd.Series(t), pd.Series(g), pd.Series(e))
    return ours, float(lr.test_statistic), float(lr.p_value)


@pytest.mark.parametrize(
    ("t", "g", "e", "why"),
    [
        ([5, 5, 5, 5], ["a", "a", "b", "b"], [1, 1, 1, 1], "no patient is still followed after"),
        ([1, 2, 5, 5], ["a", "a", "b", "b"], [0, 0, 1, 1], "no patient is still followed after"),
        ([1, 2, 5, 6], ["a", "a", "b", "b"], [0, 0, 1, 1], "of 'a' and of 'b' are both followed"),
    ],
)
def test_no_variance_is_not_estimable_where_lifelines_says_chi2_0(
    t: list[float], g: list[str], e: list[int], why: str
) -> None:
    ours, statistic, p = _test(t, g, e)
    assert statistic == pytest.approx(0.0, abs=1e-12) and p == pytest.approx(1.0)
    assert ours["not_estimable"] is not None and why in ours["not_estimable"]
    assert np.isnan(ours["statistic"]) and np.isnan(ours["p"])


def test_a_group_followed_apart_leaves_three_groups_not_estimable() -> None:
    """'a' leaves follow-up before the first event: lifelines' pseudo-inverse then gives a
    statistic over 'b' and 'c' alone, with 2 degrees of freedom."""
    ours, statistic, _ = _test([1, 2, 5, 6, 7, 8], list("aabbcc"), [0, 0, 1, 1, 1, 0])
    assert statistic > 0 and ours["df"] == 2
    why = "no event happens while patients of 'a' and of 'b', 'c' are both followed"
    assert ours["not_estimable"].startswith(why) and np.isnan(ours["p"])


def test_a_chi2_of_0_with_variance_is_a_test_and_equals_lifelines() -> None:
    """Observed = expected (one event per group at a time both are followed past): chi2 = 0."""
    ours, statistic, p = _test([3, 3, 7, 7], ["a", "b", "a", "b"], [1, 1, 0, 0])
    assert ours["not_estimable"] is None and (ours["statistic"], ours["p"]) == (statistic, p)


def test_not_estimable_exactly_when_the_textbook_variance_is_zero() -> None:
    """Two groups: V = sum over event times of d (n - d) / (n - 1) * n_a n_b / n^2."""
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        n = int(rng.integers(2, 12))
        g = np.where(rng.random(n) < 0.5, "a", "b")
        t = np.round(rng.uniform(0, 3, n) + 4 * (g == "b") * (rng.random() < 0.4), 0)
        e = (rng.random(n) < rng.uniform(0.3, 1.0)).astype(int)
        if len(set(g)) < 2 or not e.any():
            continue  # a group or the events missing: said otherwise
        v = 0.0
        for time in np.unique(t[e == 1]):
            risk, d = t >= time, int(((t == time) & (e == 1)).sum())
            k, ka = int(risk.sum()), int((risk & (g == "a")).sum())
            v += d * (k - d) / (k - 1) * ka * (k - ka) / k**2 if k > 1 else 0.0
        ours, statistic, p = _test(t.tolist(), g.tolist(), e.tolist())
        assert (ours["not_estimable"] is not None) == (v == 0), (t, g, e, v)
        if v > 0:
            assert ours["statistic"] == pytest.approx(statistic) and ours["p"] == pytest.approx(p)
        seen.add(v == 0)
    assert seen == {True, False}


def test_evaluate_says_why_when_every_patient_has_the_event_at_one_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_small(tmp_path)
    _edit_clinical(tmp_path, time=5.0, event=1)
    assert main(["evaluate", *_args(tmp_path)]) == 0
    printed = capsys.readouterr().out
    ev = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    lr = ev["survival"]["logrank"]
    why = "no patient is still followed after any event"
    assert lr["p"] is None and lr["statistic"] is None and lr["not_estimable"].startswith(why)
    assert f"note: log-rank test not estimable: {why}" in printed
    assert "log-rank not estimable" in printed  # the summary line
    assert f"Log-rank: not estimable ({why}" in _text((tmp_path / "out/report.html").read_text())
