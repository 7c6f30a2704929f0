"""The log-rank test across predicted survival groups, or why it is not estimable: no event,
a group without patients, or no variance to compare the groups with (lifelines then says
chi2 = 0, p = 1, which reads as curves that agree)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from lifelines.statistics import multivariate_logrank_test
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from melanoma_mil.evaluation.clinical import EVENT, TIME
from melanoma_mil.evaluation.survival_groups import GROUP, Groups


def _no_variance(data: pd.DataFrame, order: list[str]) -> str | None:
    """Why the log-rank test has no variance to compare the groups with though there are
    events. An event time adds to it only if a patient at risk outlives it, and then joins the
    groups at risk at it; the test needs every group joined to the others. Otherwise lifelines
    (a pseudo-inverse) says chi2 = 0, p = 1, as if the curves agreed."""
    t, e, g = data[TIME].to_numpy(float), data[EVENT].to_numpy(bool), data[GROUP].to_numpy()
    joined, outlived = np.eye(len(order), dtype=bool), False
    for time in np.unique(t[e]):
        at_risk = t >= time
        if at_risk.sum() > (e & (t == time)).sum():
            outlived = True
            present = np.array([(at_risk & (g == name)).any() for name in order])
            joined |= np.outer(present, present)
    if not outlived:
        return (
            "no patient is still followed after any event (each event time is the last "
            "follow-up of everyone at risk), so the log-rank test has no variance"
        )
    n, labels = connected_components(csr_matrix(joined), directed=False)
    if n == 1:
        return None
    apart = [", ".join(f"'{x}'" for x, k in zip(order, labels, strict=True) if (k == 0) == side)
             for side in (True, False)]  # fmt: skip
    return (
        f"no event happens while patients of {apart[0]} and of {apart[1]} are both followed "
        "and one of them outlives it, so the log-rank test has no variance to compare them"
    )


def group_logrank(data: pd.DataFrame, groups: Groups) -> dict[str, Any]:
    """Log-rank across the groups; without any event, or without variance (`_no_variance`),
    it has no information (lifelines says chi2 = 0, p = 1), so it is NaN with the reason, as it
    is when the groups are not all there."""
    why, df = groups.not_estimable, len(groups.order) - 1
    if why is None and not data[EVENT].any():
        why = f"no events among the {len(data)} patients"
    why = why or _no_variance(data, groups.order)
    if why:
        return {"statistic": math.nan, "p": math.nan, "df": df, "not_estimable": why}
    lr = multivariate_logrank_test(data[TIME], data[GROUP], data[EVENT])
    return {
        "statistic": float(lr.test_statistic),
        "p": float(lr.p_value),
        "df": int(lr.degrees_of_freedom),
        "not_estimable": None,
    }
