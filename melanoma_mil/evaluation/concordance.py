"""Harrell's C of a score against survival, with a percentile CI over patient resamples; each
resample's C from pair counts as matrix products (`concordance_sums`), lifelines' own
concordance_index above VECTORISED_CASES cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from lifelines.utils import concordance_index

from melanoma_mil.evaluation.clinical import EVENT, TIME
from melanoma_mil.evaluation.survival_groups import SCORE
from melanoma_mil.progress import progress
from melanoma_mil.stats import _chunks, _cluster_weights

# cases up to which the C-index bootstrap multiplies N x N matrices (`_resample_c`)
VECTORISED_CASES = 5_000


def c_index(
    data: pd.DataFrame, n_boot: int, seed: int, score_name: str
) -> dict[str, float | str | None]:
    """Harrell's C of the score (lifelines' convention: higher = longer survival), with a
    percentile CI over patient resamples; NaN when no pair of patients is comparable."""
    t, s, e = data[TIME].to_numpy(), data[SCORE].to_numpy(), data[EVENT].to_numpy()
    meaning = (
        f"{score_name}; higher = longer survival (lifelines' convention), "
        "so C < 0.5 means a higher probability goes with shorter survival"
    )
    try:
        value = concordance_index(t, s, e)
    except ZeroDivisionError:  # only an event makes a pair comparable
        why = "no comparable pair of patients: " + (
            f"no events among the {len(t)} patients"
            if not e.any()
            else "no event happens before another patient's follow-up ends"
        )
        nan = math.nan
        return {"value": nan, "ci_low": nan, "ci_high": nan, "score": meaning, "not_estimable": why}
    rng = np.random.default_rng(seed + 2)
    reps: list[float] = []
    quiet = len(t) < 1000  # a bar only where it takes a while
    with progress(total=n_boot, desc="C-index bootstrap", unit="resample", disable=quiet) as bar:
        for b in _chunks(n_boot, len(t)):
            reps += _resample_c(t, s, e, _cluster_weights(np.arange(len(t)), b, rng))
            bar.update(b)
    low, high = np.quantile(reps, [0.025, 0.975]) if reps else (np.nan, np.nan)
    return {
        "value": float(value),
        "ci_low": float(low),
        "ci_high": float(high),
        "score": meaning,
        "not_estimable": None,
    }


def _resample_c(t: np.ndarray, s: np.ndarray, e: np.ndarray, w: np.ndarray) -> list[float]:
    """lifelines' concordance_index of each resample (a row of case counts ``w``) that has a
    comparable pair: `concordance_sums` up to VECTORISED_CASES cases, where its N x N products
    are faster than lifelines' N log N loop (1,000 cases: 45x; 5,000: 4x; 10,000: 0.8x, measured
    on 2 cores), lifelines above."""
    if len(t) <= VECTORISED_CASES:
        pairs, concordant = concordance_sums(t, s, e, w)
        some = pairs > 0  # a resample without a comparable pair has no C
        return (concordant[some] / pairs[some]).tolist()
    reps = []
    for counts in w.astype(int):
        idx = np.repeat(np.arange(len(t)), counts)
        try:
            reps.append(concordance_index(t[idx], s[idx], e[idx]))
        except ZeroDivisionError:  # no comparable pair in this resample
            continue
    return reps


def concordance_sums(
    t: np.ndarray, s: np.ndarray, e: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(comparable pairs, concordant pairs + half the tied ones) of each resample, a row of case
    counts ``w`` [B, N]: lifelines' concordance_index on the resample is their ratio, bit for
    bit (the sums are whole or half numbers, exact in float64). One matrix product per block of
    cases instead of lifelines' Python loop per resample (1,000 patients: 18 ms a resample).
    As lifelines counts them: i and j are comparable when i died before j's time, or died at the
    time j was censored; concordant when i, who died first, scores lower."""
    t, s = np.asarray(t, dtype=float), np.asarray(s, dtype=float)
    died = np.asarray(e, dtype=float) != 0
    pairs, concordant = np.zeros(len(w)), np.zeros(len(w))
    step = max(1, 4_000_000 // max(len(t), 1))  # a block's [cases, N] matrices: ~32 MB each
    for lo in range(0, len(t), step):
        ti, si, di = t[lo : lo + step, None], s[lo : lo + step, None], died[lo : lo + step, None]
        comparable = (di & ((ti < t) | ((ti == t) & ~died))).astype(float)
        score = comparable * ((si < s) + 0.5 * (si == s))
        wi = w[:, lo : lo + step]
        pairs += ((w @ comparable.T) * wi).sum(1)
        concordant += ((w @ score.T) * wi).sum(1)
    return pairs, concordant
