"""Statistics for comparing classifiers evaluated on the same bags.

Pooled out-of-fold predictions of two runs on identical splits are *paired* (same bags, same
labels), so their AUCs are correlated; testing them as independent would be far too
conservative. Two paired tests are offered:

* DeLong et al. (1988) for correlated ROC curves, in the fast midrank form of Sun & Xu (2014),
  O(N log N) instead of O(m n).
* A paired cluster bootstrap: patients are resampled (all bags of a patient together, since
  they are not independent), both runs are scored on the same resample, and the p-value comes
  from the centred bootstrap distribution of the difference.

The bootstrap is vectorised: resampling patients with replacement is the same as weighting each
bag by how often its patient was drawn, and a weighted AUC over one sort serves every replicate.

Many runs tested against one reference make some p < 0.05 by chance; `holm` adjusts a family
of p-values so that the chance of any false "differs" stays at the nominal level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import norm, rankdata

FloatArray = NDArray[np.float64]


def _binary(labels: ArrayLike) -> NDArray[np.bool_]:
    y = np.asarray(labels)
    if not np.isin(y, (0, 1)).all():
        raise ValueError("binary labels must be 0/1")
    return y.astype(bool)


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Binary ROC AUC (Mann-Whitney with midranks, so ties count one half)."""
    y = _binary(labels)
    s = np.asarray(scores, dtype=np.float64)
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - m * (m + 1) / 2) / (m * n))


@dataclass(frozen=True)
class DeLongResult:
    auc: FloatArray  # [k] AUC of each predictor
    cov: FloatArray  # [k, k] DeLong covariance of the AUC estimates


def delong(labels: ArrayLike, scores: ArrayLike) -> DeLongResult:
    """AUCs and their covariance for k predictors scored on the same cases (Sun & Xu 2014).

    ``scores`` is [k, N] (or [N] for one predictor); ``labels`` is [N] of 0/1.
    """
    y = _binary(labels)
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    pos, neg = s[:, y], s[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    if m < 2 or n < 2:
        raise ValueError("DeLong needs at least two positive and two negative cases")
    tx = rankdata(pos, axis=1)  # midranks within positives
    ty = rankdata(neg, axis=1)  # midranks within negatives
    tz = rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # midranks over all cases
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1) / (2 * n)
    v01 = (tz[:, :m] - tx) / n  # structural components of the positives
    v10 = 1.0 - (tz[:, m:] - ty) / m  # ... and of the negatives
    cov = np.atleast_2d(np.cov(v01)) / m + np.atleast_2d(np.cov(v10)) / n
    return DeLongResult(auc=aucs, cov=cov)


@dataclass(frozen=True)
class PairedTest:
    auc_a: float
    auc_b: float
    diff: float  # auc_a - auc_b
    ci_low: float
    ci_high: float
    p_value: float


def delong_test(labels: ArrayLike, scores_a: ArrayLike, scores_b: ArrayLike) -> PairedTest:
    """Two-sided DeLong test of AUC(a) == AUC(b) on paired scores, with a 95% CI of the gap.

    p and the CI are NaN when the DeLong variance is zero but the AUCs differ (no estimate
    of the gap's noise); identical rankings give p = 1."""
    res = delong(labels, np.vstack([scores_a, scores_b]))
    diff = float(res.auc[0] - res.auc[1])
    var = float(res.cov[0, 0] + res.cov[1, 1] - 2 * res.cov[0, 1])
    if var <= 1e-15:
        # identical rankings: no evidence of any difference; a gap with zero estimated variance
        # (e.g. a perfect vs a constant scorer on a few cases) says nothing about its noise,
        # so neither a p-value nor a CI can be given: NaN, not a spurious p = 0
        if abs(diff) < 1e-12:
            p, half = 1.0, 0.0
        else:
            p, half = float("nan"), float("nan")
    else:
        se = np.sqrt(var)
        p, half = float(2 * norm.sf(abs(diff) / se)), float(norm.ppf(0.975) * se)
    return PairedTest(float(res.auc[0]), float(res.auc[1]), diff, diff - half, diff + half, p)


def _weighted_auc(y: NDArray[np.bool_], s: FloatArray, w: FloatArray) -> FloatArray:
    """AUC for each row of case weights ``w`` [B, N] (integer weights = a bootstrap resample)."""
    order = np.argsort(s, kind="mergesort")
    s, y, w = s[order], y[order], w[:, order]
    ends = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each block of ties
    cp = np.cumsum(w * y, axis=1)[:, ends]
    cn = np.cumsum(w * ~y, axis=1)[:, ends]
    p = np.diff(cp, axis=1, prepend=0.0)
    n = np.diff(cn, axis=1, prepend=0.0)
    num = (p * (cn - n + 0.5 * n)).sum(axis=1)
    den = cp[:, -1] * cn[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def macro_auc(labels: ArrayLike, probs: ArrayLike, weights: ArrayLike | None = None) -> FloatArray:
    """Binary AUC (probs [N]) or one-vs-rest macro AUC (probs [N, C], labels = class index).

    Multi-class: the mean over the classes present in ``labels`` (with cases on both sides), so
    a class no case has does not make the AUC undefined; a weight row (resample) lacking one of
    those classes gives NaN. Returns one value per weight row ([B]); without weights, a
    single-element array.
    """
    y = np.asarray(labels)
    p = np.asarray(probs, dtype=np.float64)
    w = np.ones((1, len(y))) if weights is None else np.asarray(weights, dtype=np.float64)
    if p.ndim == 1:
        return _weighted_auc(_binary(y), p, w)
    present = [c for c in range(p.shape[1]) if 0 < int((y == c).sum()) < len(y)]
    if not present:
        return np.full(len(w), np.nan)
    return np.mean([_weighted_auc(y == c, p[:, c], w) for c in present], axis=0)


def _cluster_weights(groups: ArrayLike, n_boot: int, rng: np.random.Generator) -> FloatArray:
    """[B, N] bag weights: how often each bag's cluster (patient) was drawn in each replicate."""
    _, idx = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(idx.max()) + 1
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot)
    return counts[:, idx].astype(np.float64)


def _chunks(n_boot: int, n_cases: int) -> list[int]:
    step = max(1, 4_000_000 // max(n_cases, 1))  # bound the [B, N] weight matrix to ~32 MB
    return [min(step, n_boot - i) for i in range(0, n_boot, step)]


def bootstrap_auc_ci(
    labels: ArrayLike,
    probs: ArrayLike,
    groups: ArrayLike | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(AUC, low, high): percentile bootstrap CI, resampling ``groups`` (patients) if given."""
    y = np.asarray(labels)
    g = np.arange(len(y)) if groups is None else np.asarray(groups)
    rng = np.random.default_rng(seed)
    reps = np.concatenate(
        [macro_auc(y, probs, _cluster_weights(g, b, rng)) for b in _chunks(n_boot, len(y))]
    )
    alpha = (1 - level) / 2
    low, high = np.nanquantile(reps, [alpha, 1 - alpha])
    return float(macro_auc(y, probs)[0]), float(low), float(high)


def paired_bootstrap_test(
    labels: ArrayLike,
    probs_a: ArrayLike,
    probs_b: ArrayLike,
    groups: ArrayLike | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedTest:
    """Paired cluster bootstrap of AUC(a) - AUC(b); two-sided p from the centred distribution."""
    y = np.asarray(labels)
    g = np.arange(len(y)) if groups is None else np.asarray(groups)
    rng = np.random.default_rng(seed)
    diffs: list[FloatArray] = []
    for b in _chunks(n_boot, len(y)):
        w = _cluster_weights(g, b, rng)
        diffs.append(macro_auc(y, probs_a, w) - macro_auc(y, probs_b, w))
    auc_a, auc_b = float(macro_auc(y, probs_a)[0]), float(macro_auc(y, probs_b)[0])
    return _paired_result(np.concatenate(diffs), auc_a, auc_b, level)


def paired_bootstrap_seeds_test(
    labels: ArrayLike,
    probs_a: Sequence[ArrayLike],
    probs_b: Sequence[ArrayLike],
    groups: ArrayLike | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedTest:
    """`paired_bootstrap_test` of two settings, each run with several seeds on the same bags:
    mean over a's runs of the AUC - the same over b's (the counts may differ). Each replicate
    scores every run on one patient resample, so all stay paired; the CI is that of the
    seed-averaged gap over patients (the spread over seeds is not resampled)."""
    y = np.asarray(labels)
    g = np.arange(len(y)) if groups is None else np.asarray(groups)
    rng = np.random.default_rng(seed)

    def mean_auc(runs: Sequence[ArrayLike], w: FloatArray | None) -> FloatArray:
        return np.mean([macro_auc(y, p, w) for p in runs], axis=0)

    diffs: list[FloatArray] = []
    for b in _chunks(n_boot, len(y)):
        w = _cluster_weights(g, b, rng)
        diffs.append(mean_auc(probs_a, w) - mean_auc(probs_b, w))
    auc_a, auc_b = float(mean_auc(probs_a, None)[0]), float(mean_auc(probs_b, None)[0])
    return _paired_result(np.concatenate(diffs), auc_a, auc_b, level)


def _paired_result(d: FloatArray, auc_a: float, auc_b: float, level: float) -> PairedTest:
    """CI and two-sided p of the observed gap from its bootstrap replicates ``d``."""
    d = d[np.isfinite(d)]
    obs = auc_a - auc_b
    if len(d) == 0 or (np.ptp(d) == 0 and abs(obs) > 1e-12):
        # no resample held both classes, or every one gave the same gap (e.g. a perfect vs a
        # constant scorer on a few cases): no estimate of the gap's noise, as in `delong_test`
        return PairedTest(auc_a, auc_b, obs, float("nan"), float("nan"), float("nan"))
    alpha = (1 - level) / 2
    low, high = np.quantile(d, [alpha, 1 - alpha])
    extreme = int((np.abs(d - obs) >= abs(obs) - 1e-12).sum())
    p = (1 + extreme) / (1 + len(d))
    return PairedTest(auc_a, auc_b, obs, float(low), float(high), float(p))


def holm(p_values: ArrayLike) -> FloatArray:
    """Holm (1979) step-down adjusted p-values: rejecting where adjusted < alpha keeps the
    family-wise error at alpha under any dependence (runs tested against one reference are
    correlated). The family is the p-values present: NaN (or None: no test) stays NaN and does
    not count. Ascending p_(i) becomes max over j <= i of min(1, (m - j + 1) p_(j))."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError("holm takes a 1-D sequence of p-values")
    present = np.flatnonzero(~np.isnan(p))
    if ((p[present] < 0) | (p[present] > 1)).any():
        raise ValueError("p-values must lie in [0, 1]")
    order = present[np.argsort(p[present], kind="stable")]
    m = len(order)
    adjusted = np.full(len(p), np.nan)
    adjusted[order] = np.minimum(np.maximum.accumulate(p[order] * (m - np.arange(m))), 1.0)
    return adjusted
