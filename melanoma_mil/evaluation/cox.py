"""Cox hazard ratios of predicted groups (the group alone, then adjusted for covariates), with
a check of the proportional-hazards assumption (lifelines: Efron ties, Wald CIs).

A hazard ratio the data cannot give (a group without events or whose patients all left
follow-up before another group's first event, no patient outliving any event, a covariate that
adjusts for nothing, a fit that does not converge) is NaN with the reason, never an error or a
meaningless huge estimate.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter
from lifelines.exceptions import ConvergenceError
from lifelines.statistics import proportional_hazard_test
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from melanoma_mil.evaluation.clinical import EVENT, TIME
from melanoma_mil.evaluation.survival_groups import GROUP, Groups

PH_ALPHA = 0.05


def _design(data: pd.DataFrame, order: list[str], covariates: dict[str, str]) -> pd.DataFrame:
    """Cox design matrix: group dummies against the first group, then the covariates
    (numeric as they are, categorical as dummies against their first level)."""
    x = pd.DataFrame(index=data.index)
    for g in order[1:]:
        x[f"group: {g} vs {order[0]}"] = (data[GROUP] == g).astype(float)
    for c, kind in covariates.items():
        if kind == "numeric":
            x[c] = data[c].astype(float)
            continue
        levels = sorted(data[c].dropna().unique())
        for lev in levels[1:]:
            x[f"{c}: {lev} vs {levels[0]}"] = (data[c] == lev).astype(float).where(data[c].notna())
    return x


_UNCONVERGED = "Newton-Raphson failed to converge sufficiently"


@dataclass
class CoxFit:
    """A Cox model on the complete cases ``data``, or (``model`` None) why it has no estimate."""

    model: Any | None  # CoxPHFitter
    data: pd.DataFrame
    columns: list[str]
    reason: str | None = None


def _no_estimate(
    groups: pd.Series, times: pd.Series, events: pd.Series, order: list[str]
) -> str | None:
    """Why group hazard ratios have no finite estimate. Without events in a group the partial
    likelihood keeps rising as its hazard ratio goes to 0 (infinity for the others when it is
    the reference); lifelines then "converges" on a meaningless huge HR instead of failing."""
    if not events.any():
        return f"no events among the {len(events)} patients"
    if not _outlived(times, events):
        return (
            "no patient is still followed after any event (each event time is the last "
            "follow-up of everyone at risk), so the partial likelihood has no information on "
            "a hazard ratio"
        )
    silent = [g for g in order if not events[groups == g].any()]
    if not silent:
        return _apart(groups, times, events, order)
    sizes = [int((groups == g).sum()) for g in silent]
    if len(silent) == 1:
        who = f"group '{silent[0]}' has no events among its {sizes[0]} patients"
    else:
        named = ", ".join(f"'{g}' ({n} patients)" for g, n in zip(silent, sizes, strict=True))
        who = f"groups {named} have no events"
    return f"{who}, so a hazard ratio against it is 0 or infinite"


def _outlived(times: pd.Series, events: pd.Series) -> bool:
    """Whether some event time has a patient at risk who outlives it. Where everyone at risk
    has the event, the exact partial likelihood of that time is 1 whatever the hazard ratio,
    but Efron's (and Breslow's) approximation still pulls it to 1: with no other event time,
    lifelines said HR 1.00 (0.54-1.86), p = 1, as if the groups' hazards were shown alike."""
    t, e = times.to_numpy(float), events.to_numpy(bool)
    return any((t >= u).sum() > (e & (t == u)).sum() for u in np.unique(t[e]))


def _apart(groups: pd.Series, times: pd.Series, events: pd.Series, order: list[str]) -> str | None:
    """Why group hazard ratios diverge although every group has events: some groups' patients
    are all out of follow-up before the other groups' first event. Those events then compare
    no patient of the first groups, and the likelihood keeps rising as the hazard ratio
    between the two sets goes to 0 or infinity. Exact for group terms: with a dummy per group
    the estimate is finite iff the graph "a patient of A is at risk at an event of B" joins
    every group to every other (strongly connected); a covariate cannot make it finite."""
    present = [g for g in order if (groups == g).any()]
    last = {g: times[groups == g].max() for g in present}
    first = {g: times[(groups == g) & events.astype(bool)].min() for g in present}
    at_risk = [[a != b and first[b] <= last[a] for b in present] for a in present]
    n, labels = connected_components(csr_matrix(np.array(at_risk)), connection="strong")
    if n == 1:
        return None
    # a set no arrow leaves: its patients are at risk at none of the others' events
    leaves = {int(labels[i]) for i, row in enumerate(at_risk) for j, on in enumerate(row)
              if on and labels[j] != labels[i]}  # fmt: skip
    early = [g for i, g in enumerate(present) if labels[i] not in leaves]
    late = [g for g in present if g not in early]
    quoted = [", ".join(f"'{g}'" for g in gs) for gs in (early, late)]
    return (
        f"no patient of {quoted[0]} is still followed at any event of {quoted[1]} "
        f"(last follow-up {max(last[g] for g in early):g}, first event "
        f"{min(first[g] for g in late):g}), so a hazard ratio between them is 0 or infinite"
    )


def _inert_covariates(data: pd.DataFrame, covariates: dict[str, str]) -> str | None:
    """Why the adjusted model cannot adjust for every covariate: one without any value among
    the patients, or a categorical one with a single level. Such a covariate gives no column
    (no dummy), so the "adjusted" hazard ratio would silently be the univariable one. (A
    constant numeric one keeps its column and lifelines refuses it.)"""
    problems = []
    for c, kind in covariates.items():
        values = data[c].dropna()
        if values.empty:
            problems.append(f"covariate '{c}' has no value for any of the {len(data)} patients")
        elif kind == "categorical" and values.nunique() < 2:
            problems.append(
                f"covariate '{c}' has one value ({values.iloc[0]!r}) for all {len(values)} "
                "patients with it, so it adjusts for nothing"
            )
    if not problems:
        return None
    return "; ".join(problems) + ": drop it from covariates or correct clinical_csv"


def _fit_cox(
    x: pd.DataFrame,
    data: pd.DataFrame,
    groups: Groups,
    notes: list[str],
    inert: str | None = None,
) -> CoxFit:
    """CoxPHFitter on the complete cases of ``x`` (lifelines: Efron ties, Wald CIs); ``inert``:
    why the covariates cannot be adjusted for (see `_inert_covariates`)."""
    df = x.assign(**{TIME: data[TIME], EVENT: data[EVENT]}).dropna()
    columns, order = list(x.columns), groups.order
    reason = (
        groups.not_estimable
        or inert
        or _no_estimate(data.loc[df.index, GROUP], df[TIME], df[EVENT], order)
    )
    if reason:
        return CoxFit(None, df, columns, reason)
    advice = (
        "; a covariate may be constant, collinear with another or separate the groups: "
        "drop it from covariates"
        if len(columns) > len(order) - 1
        else ""
    )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cph = CoxPHFitter().fit(df, duration_col=TIME, event_col=EVENT)
    except (ConvergenceError, ValueError, np.linalg.LinAlgError) as e:
        first = re.sub(r"\s+", " ", str(e)).strip()[:200]
        return CoxFit(None, df, columns, f"lifelines' fit did not converge ({first}){advice}")
    said = [re.sub(r"\s+", " ", str(w.message)).strip() for w in caught]
    unconverged = [m for m in said if m.startswith(_UNCONVERGED)]
    kept = [m for m in said if ("onverg" in m or "variance" in m) and m not in unconverged]
    notes.extend(m[:300] for m in kept)
    # lifelines only warns when Newton-Raphson stops unconverged, and returns the last step's
    # coefficients (hazard ratios such as 1e-4 with a CI of 1e-195 to 1e186): no estimate.
    if unconverged:
        why = f"lifelines' fit did not converge ({_UNCONVERGED}){advice}"
        return CoxFit(None, df, columns, why)
    return CoxFit(cph, df, columns)


def _terms(fit: CoxFit) -> dict[str, dict[str, float]]:
    """Each term's hazard ratio, 95% CI and p; NaN throughout when there is no estimate."""
    if fit.model is None:
        return {c: dict.fromkeys(("hr", "ci_low", "ci_high", "p"), math.nan) for c in fit.columns}
    s = fit.model.summary
    return {
        str(t): {
            "hr": float(s.loc[t, "exp(coef)"]),
            "ci_low": float(s.loc[t, "exp(coef) lower 95%"]),
            "ci_high": float(s.loc[t, "exp(coef) upper 95%"]),
            "p": float(s.loc[t, "p"]),
        }
        for t in s.index
    }


def _ph_check(fit: CoxFit) -> dict[str, Any] | None:
    """Schoenfeld-residual test of each term (lifelines' proportional_hazard_test); None
    when there is no model to test."""
    if fit.model is None:
        return None
    test = proportional_hazard_test(fit.model, fit.data, time_transform="rank")
    p = {str(t): float(v) for t, v in test.summary["p"].items()}
    return {"p": p, "violated": [t for t, v in p.items() if v < PH_ALPHA]}


def _left_out(data: pd.DataFrame, used: pd.Index, covariates: dict[str, str]) -> dict[str, str]:
    """The patients the adjusted model's complete cases lack, with the covariates they lack,
    so that the report can list them (lifelines only ever sees the complete cases)."""
    names = list(covariates)
    gone = data.loc[~data.index.isin(used), names].isna()
    return {
        str(p): "missing " + ", ".join(c for c in names if row[c]) for p, row in gone.iterrows()
    }


def cox_models(
    data: pd.DataFrame, groups: Groups, covariates: dict[str, str], notes: list[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The univariable and adjusted Cox models with their proportional-hazards checks, and the
    patients the adjusted model left out (see `_left_out`)."""
    order, quiet = groups.order, groups.not_estimable is not None  # said once, by the caller
    uni = _fit_cox(_design(data, order, {}), data, groups, notes)
    uni_terms = _terms(uni)
    last = f"group: {order[-1]} vs {order[0]}"
    cox: dict[str, Any] = {
        "univariable": {**uni_terms[last], "term": last, "not_estimable": uni.reason},
        "adjusted": None,
        "ph_check": {"test": "Schoenfeld residuals, rank(time) (lifelines)", "alpha": PH_ALPHA},
    }
    if uni.reason and not quiet:
        notes.append(
            f"univariable Cox: hazard ratio not estimable: {uni.reason}; the Kaplan-Meier "
            "curves and the log-rank test do not need it."
        )
    if len(order) > 2:
        cox["univariable_all"] = uni_terms
    cox["ph_check"]["univariable"] = _ph_check(uni)
    left_out: dict[str, str] = {}
    if covariates:
        inert = _inert_covariates(data, covariates)
        adj = _fit_cox(_design(data, order, covariates), data, groups, notes, inert)
        cox["adjusted"] = _terms(adj)
        cox["adjusted_n"] = len(adj.data)
        left_out = _left_out(data, adj.data.index, covariates)
        cox["adjusted_left_out"] = len(left_out)
        cox["adjusted_not_estimable"] = adj.reason
        if adj.reason and not quiet:
            notes.append(f"adjusted Cox: hazard ratios not estimable: {adj.reason}.")
        cox["ph_check"]["adjusted"] = _ph_check(adj)
    checks = [cox["ph_check"].get(k) or {} for k in ("univariable", "adjusted")]
    violated = sorted({t for c in checks for t in c.get("violated", [])})
    tested = any(cox["ph_check"].get(k) for k in ("univariable", "adjusted"))
    cox["ph_check"]["ok"] = not violated if tested else None  # None: no model to test
    if violated:
        notes.append(
            f"proportional-hazards assumption fails (p < {PH_ALPHA}) for {violated}: their "
            "hazard ratios average a hazard ratio that changes over time; read the "
            "Kaplan-Meier curves, or stratify on those covariates."
        )
    return cox, left_out
