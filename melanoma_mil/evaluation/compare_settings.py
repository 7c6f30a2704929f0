"""`compare`'s table by setting: runs that differ only in `seed` are one setting.

A sweep runs each setting with several seeds on the same splits; one seed pair decides nothing
("encoder A beats B" may be one lucky initialisation), so such runs are summarised together:
mean ± std over seeds, and the gap to the reference setting as the mean over seeds of each
side's pooled AUC, tested with one paired patient bootstrap over all their runs.

Each table's p-values are also Holm-adjusted over its rows against the reference (`with_holm`):
a grid of dozens of runs has some p < 0.05 by chance.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from melanoma_mil import stats
from melanoma_mil.rundir import TrainedRun, run_record, settings

if TYPE_CHECKING:
    from melanoma_mil.evaluation.compare import RunResult

log = logging.getLogger(__name__)
FEATURES = "features"  # the setting key of the feature cache (data.features_dir is no setting)


def setting_of(run: TrainedRun) -> dict[str, Any]:
    """What makes the run's results, `seed` aside: its config's settings and its features (the
    cache key its fit recorded, else the features' hash)."""
    record = run_record(run.run_dir) or {}
    features = record.get("cache_key") or record.get("features_sha256") or "?"
    setting = {k: v for k, v in settings(run.config).items() if k != "seed"}
    return {**setting, FEATURES: str(features)}


def _key(run: RunResult) -> str:
    return json.dumps(run.setting, sort_keys=True, default=str)


def group_settings(runs: list[RunResult]) -> tuple[list[list[RunResult]], dict[str, str]]:
    """The runs by setting, in the order each setting first appears, and the runs left out as
    repeats of a seed their setting already has (a re-run, e.g. the same model and cache in two
    sweeps: one seed, not two), each with the run it repeats."""
    groups: dict[str, list[RunResult]] = {}
    repeats: dict[str, str] = {}
    for run in runs:
        group = groups.setdefault(_key(run), [])
        same = next((r for r in group if r.seed == run.seed), None)
        if same is None:
            group.append(run)
        else:
            repeats[run.name] = same.name
    return list(groups.values()), repeats


def _labels(groups: list[list[RunResult]]) -> list[str]:
    """Each setting named by the keys whose values differ between settings (model.name=abmil)
    among those it has (a key one model reads is absent from the others'); the first run's name
    when none do."""
    firsts = [g[0].setting for g in groups]
    keys = sorted({k for s in firsts for k in s if any(s.get(k) != t.get(k) for t in firsts)})
    return [
        ", ".join(f"{k}={s[k]}" for k in keys if k in s) or g[0].name
        for s, g in zip(firsts, groups, strict=True)
    ]


def _spread(values: list[float]) -> tuple[float, float]:
    """Mean and std over seeds; the std is undefined (NaN) for one seed."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else float("nan")


def settings_table(
    runs: list[RunResult], ref_index: int, n_boot: int, seed: int
) -> pd.DataFrame | None:
    """One row per setting against the reference run's setting; None when no setting has two
    runs (then compare writes what it always did)."""
    groups, repeats = group_settings(runs)
    if all(len(g) < 2 for g in groups):
        return None
    for run, same in repeats.items():
        why = "same setting and seed: one seed, left out of the table by setting"
        log.warning("compare: run %s repeats run %s (%s)", run, same, why)
    ref = runs[ref_index]
    y, patients = ref.bags["y"].to_numpy(), ref.bags["patient_id"].to_numpy()
    labels = _labels(groups)
    ref_group = next(i for i, g in enumerate(groups) if _key(g[0]) == _key(ref))
    ref_probs = [r.probs() for r in groups[ref_group]]
    rows = []
    for i, (label, group) in enumerate(zip(labels, groups, strict=True)):
        probs = [r.probs() for r in group]
        names = {r.name for r in group}
        pooled = _spread([float(stats.macro_auc(y, p)[0]) for p in probs])
        per_fold = _spread([float(r.metric("auc")["mean"]) for r in group])
        boot = stats.paired_bootstrap_seeds_test(y, probs, ref_probs, patients, n_boot, seed)
        rows.append(
            {
                "setting": label,
                "encoder": group[0].encoder,
                "runs": ";".join(r.name for r in group),
                "seeds": ";".join(str(r.seed) for r in group),
                "n_seeds": len(group),
                "repeats_left_out": ";".join(k for k, v in repeats.items() if v in names),
                "pooled_auc_mean": pooled[0],
                "pooled_auc_std": pooled[1],
                "auc_mean": per_fold[0],
                "auc_std": per_fold[1],
                "reference": labels[ref_group],
                "is_reference": i == ref_group,
                "pooled_auc_diff": boot.diff,
                "pooled_auc_diff_ci_low": boot.ci_low,
                "pooled_auc_diff_ci_high": boot.ci_high,
                "p_bootstrap": boot.p_value,
            }
        )
    return with_holm(pd.DataFrame(rows), ["p_bootstrap"])


def with_holm(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """``table`` with a ``{column}_holm`` for each p-value column, appended last (the columns
    before keep their places): `stats.holm` over the rows against the reference, the family
    this table tests; the reference's own row (itself vs itself) and n/a p-values are NaN."""
    others = ~table["is_reference"].to_numpy(bool)
    for column in columns:
        adjusted = np.full(len(table), np.nan)
        adjusted[others] = stats.holm(table.loc[others, column].to_numpy(np.float64))
        table[f"{column}_holm"] = adjusted
    return table


def p_text(raw: float | None, holm: float) -> str:
    """'0.012 (Holm 0.036)': the raw p beside its Holm-adjusted one; 'n/a' without a test."""
    if raw is None or pd.isna(raw):
        return "n/a"
    return f"{raw:.3g} (Holm {holm:.3g})"


def holm_note(family: int, unit: str, detail: str = "") -> str:
    """The footnote's sentence naming the Holm family: its ``family`` rows (of ``unit``, e.g.
    'run') with a p-value; none when no row has one (no Holm p is shown)."""
    if family == 0:
        return ""
    return (
        " Holm: the p-value adjusted for multiple comparisons (Holm 1979, family-wise error) "
        f"over the family of this comparison's {family} {unit}{'' if family == 1 else 's'}{detail} "
        "tested against its reference (n/a ones left out). Quote it, not the raw p, when one of "
        "several differs from the reference, and only with its family: other runs or another "
        "reference make another."
    )


def spread_text(mean: float, std: float) -> str:
    """'0.812 ± 0.031'; the mean alone when the std is undefined (one seed), 'n/a' when the
    mean is (every test fold lacks a class): a table shows no 'nan'."""
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if np.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def ci_text(value: float, low: float, high: float, signed: bool = False) -> str:
    """'0.812 [0.760, 0.860]' (signed: '+0.041 [-0.010, +0.090]'); '[CI n/a]' when the bootstrap
    gives no CI (every replicate the same gap, or none with both classes)."""
    f = "+.3f" if signed else ".3f"
    ci = "[CI n/a]" if np.isnan(low) else f"[{low:{f}}, {high:{f}}]"
    return f"{value:{f}} {ci}"


def diff_text(diff: float, low: float, high: float) -> str:
    """A difference with its CI: `ci_text`, signed."""
    return ci_text(diff, low, high, signed=True)


def settings_markdown(table: pd.DataFrame, n_boot: int) -> str:
    """The second table of comparison.md: one row per setting, over its seeds."""
    lines = [
        "## By setting, over seeds",
        "",
        "| setting | runs | seeds | pooled AUC | AUC per fold | Δ pooled AUC [95% CI] "
        "| p (bootstrap) |",
        "|" + "---|" * 7,
    ]
    for r in table.itertuples():
        if r.is_reference:
            delta, p = "reference", ""
        else:
            delta = diff_text(
                r.pooled_auc_diff, r.pooled_auc_diff_ci_low, r.pooled_auc_diff_ci_high
            )
            p = p_text(r.p_bootstrap, r.p_bootstrap_holm)
        cells = [
            r.setting,
            r.runs.replace(";", ", "),
            r.seeds.replace(";", ", "),
            spread_text(r.pooled_auc_mean, r.pooled_auc_std),
            spread_text(r.auc_mean, r.auc_std),
            delta,
            p,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "A setting is the runs that differ only in `seed`. Mean ± std over its seeds of the "
        "pooled AUC and of the mean AUC over folds. Δ = mean over seeds of the pooled AUC - the "
        "same for the reference's setting, with a paired patient bootstrap "
        f"({n_boot} replicates: each resamples patients once and scores every run of both "
        "settings on it); its CI is over patients, the spread over seeds is the ± std."
        + holm_note(int(table["p_bootstrap_holm"].notna().sum()), "setting"),
    ]
    left_out = [r for r in table["repeats_left_out"] if r]
    if left_out:
        lines.append(
            "Left out here as repeats of a seed their setting already has (same setting and "
            f"seed): {', '.join(';'.join(left_out).split(';'))}."
        )
    return "\n".join(lines) + "\n"
