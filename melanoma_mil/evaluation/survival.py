"""Survival of predicted groups, with lifelines: Kaplan-Meier per group, log-rank across the
groups (`logrank`), Cox hazard ratios (group alone, then adjusted for covariates) with a check
of the proportional-hazards assumption (`cox`), and Harrell's C of the probability with a
bootstrap CI (`concordance`).

Groups are made from predicted probabilities only, never from outcomes. The first group is the
reference: the negative class, the low half, Q1 or the first class; the univariable hazard
ratio is the last group (positive class / high / QK) against it.

A result that the data cannot give (a hazard ratio when a group has no events or its patients
all left follow-up before another group's first event, or when no patient outlives any event;
a group comparison when a group has no patients, a Cox model that does not converge, a log-rank
test or C-index without any event, a log-rank test without variance: `logrank`) is NaN with
the reason in ``not_estimable`` and in the notes, rather than an error: the Kaplan-Meier curves
and whatever else is defined still stand, and a survival problem never costs the
classification outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from lifelines import KaplanMeierFitter
from lifelines.utils import median_survival_times

from melanoma_mil.evaluation.clinical import EVENT, TIME
from melanoma_mil.evaluation.concordance import c_index
from melanoma_mil.evaluation.cox import cox_models
from melanoma_mil.evaluation.logrank import group_logrank
from melanoma_mil.evaluation.survival_groups import GROUP, Groups

ALL = "all patients"  # the one curve drawn when no group could be made
MEDIANS = ("median", "median_ci_low", "median_ci_high")


def _kaplan_meier(data: pd.DataFrame, order: list[str]) -> tuple[dict[str, Any], list[Any]]:
    """A curve per group with patients; a group without any has a row of zeros and no curve,
    and when no group could be made at all the whole cohort has one curve."""
    if not data[GROUP].isin(order).any():
        data, order = data.assign(**{GROUP: ALL}), [ALL]
    table, fitters = {}, []
    for g in order:
        d = data[data[GROUP] == g]
        if d.empty:
            table[g] = {"n": 0, "events": 0, **dict.fromkeys(MEDIANS, math.nan)}
            continue
        kmf = KaplanMeierFitter(label=g).fit(d[TIME], d[EVENT])
        ci = median_survival_times(kmf.confidence_interval_)
        table[g] = {
            "n": len(d),
            "events": int(d[EVENT].sum()),
            "median": float(kmf.median_survival_time_),
            "median_ci_low": float(ci.iloc[0, 0]),
            "median_ci_high": float(ci.iloc[0, 1]),
        }
        fitters.append(kmf)
    return table, fitters


@dataclass
class Survival:
    summary: dict[str, Any]
    fitters: list[Any]  # KaplanMeierFitter per group, in group order
    # patient -> why the adjusted Cox model left them out ("missing <covariate>, ...")
    adjusted_left_out: dict[str, str] = field(default_factory=dict)


def analyse_survival(
    data: pd.DataFrame,
    groups: Groups,
    covariates: dict[str, str],
    n_boot: int,
    seed: int,
    score_name: str,
) -> Survival:
    """``data``: index patient_id; TIME, EVENT, GROUP, SCORE and the covariates."""
    notes: list[str] = []
    km, fitters = _kaplan_meier(data, groups.order)
    logrank = group_logrank(data, groups)
    if groups.not_estimable:
        notes.append(
            f"groups not compared (log-rank test and hazard ratios not estimable): "
            f"{groups.not_estimable}. The C-index uses the probability, not the groups."
        )
    elif logrank["not_estimable"]:
        notes.append(f"log-rank test not estimable: {logrank['not_estimable']}")
    cox, left_out = cox_models(data, groups, covariates, notes)
    summary = {
        "groups": km,
        "group_order": list(km),  # the groups used: [ALL] when none could be made
        "logrank": logrank,
        "cox": cox,
        "c_index": c_index(data, n_boot, seed, score_name),
        "notes": notes,
    }
    if summary["c_index"]["not_estimable"]:
        notes.append(f"C-index not estimable: {summary['c_index']['not_estimable']}")
    return Survival(summary, fitters, left_out)
