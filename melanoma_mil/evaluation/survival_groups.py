"""Survival groups from predicted probabilities only, never from outcomes: the predicted
class, halves at the median, or quantiles. The first group is the reference (the negative
class, the low half, Q1 or the first class)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

GROUP, SCORE = "__group", "__score"


@dataclass
class Groups:
    labels: pd.Series  # patient_id -> group name (None: no group could be made)
    order: list[str]  # reference first
    rule: str
    # why the groups cannot be compared (a group without patients, quantiles not cut): the
    # log-rank test and hazard ratios are then not estimable, the C-index still is
    not_estimable: str | None = None


def make_groups(probs: pd.DataFrame, classes: list[str], spec: str, threshold: float) -> Groups:
    """Patients (rows of prob_<class> columns) -> groups by ``spec`` (see config.GROUPS_FORM).
    A split the probabilities cannot give is marked not estimable, not an error: `fit` and
    `predict` evaluate after their work, and the other results stand without groups."""
    score = probs[f"prob_{classes[-1]}"]
    if spec == "predicted":
        groups = _predicted(probs, classes, threshold)
    elif spec == "median":
        cut = float(score.median())
        labels = pd.Series(np.where(score >= cut, "high", "low"), index=probs.index)
        rule = f"{score.name} >= the cohort's median {cut:.4g} (high) or below it (low)"
        groups = Groups(labels, ["low", "high"], rule)
    else:
        groups = _quantiles(score, int(spec.split(":")[1]))
    if groups.not_estimable is None:
        groups.not_estimable = _empty_groups(groups, spec, score)
    return groups


def _predicted(probs: pd.DataFrame, classes: list[str], threshold: float) -> Groups:
    pos, neg = classes[-1], classes[0]
    if len(classes) == 2:
        high = probs[f"prob_{pos}"] >= threshold
        labels = pd.Series(np.where(high, pos, neg), index=probs.index)
        rule = f"predicted class: {pos} when prob_{pos} >= {threshold:g}, else {neg}"
        return Groups(labels, list(classes), rule)
    best = probs[[f"prob_{c}" for c in classes]].to_numpy().argmax(1)
    labels = pd.Series([classes[i] for i in best], index=probs.index)
    return Groups(labels, list(classes), "predicted class (the most probable one)")


def _quantiles(score: pd.Series, k: int) -> Groups:
    names = [f"Q{i + 1}" for i in range(k)]
    rule = f"{score.name} quantile groups Q1 (lowest) .. Q{k}"
    try:
        cut, edges = pd.qcut(score, k, labels=names, retbins=True)
    except ValueError:  # tied probabilities make two edges equal
        why = f"{k} quantile groups cannot be cut: {_ties(score)}"
        if score.nunique() > 1:
            why += "; fewer quantiles or groups=median may split them"
        return Groups(pd.Series(None, index=score.index, dtype=object), names, rule, why)
    rule += "; edges " + ", ".join(f"{e:.4g}" for e in edges)
    return Groups(cut.astype(str), names, rule)


def _ties(score: pd.Series) -> str:
    """'7 of 9 patients share prob_x 0.5', the most shared probability."""
    counts = score.value_counts()
    n, value = int(counts.iloc[0]), float(counts.index[0])
    share = f"all {n} patients share" if n == len(score) else f"{n} of {len(score)} patients share"
    return f"{share} {score.name} {value:.4g}"


def _empty_groups(groups: Groups, spec: str, score: pd.Series) -> str | None:
    """Why a group without patients (it has no curve, nothing to compare) leaves the groups
    uncompared, with a way out that is not ``spec`` itself."""
    empty = [g for g in groups.order if not (groups.labels == g).any()]
    if not empty:
        return None
    named = ", ".join(f"'{g}'" for g in empty)
    why = f"no patient falls in group{'s' if len(empty) > 1 else ''} {named} ({groups.rule})"
    if spec != "predicted":
        return f"{why}: {_ties(score)}"
    counts = ", ".join(f"{n} {g}" for g, n in groups.labels.value_counts().items())
    advice = (
        "groups=median or groups=quantiles:K split the cohort at its own probabilities"
        if score.nunique() > 1
        else f"{_ties(score)}, so no split by probability separates them"
    )
    return f"{why}: predicted {counts}; {advice}"
