"""`compare RUN_DIR ...`: a paired comparison of fit runs (e.g. encoders) on identical splits.

Runs are only comparable when every bag sat in the same test fold in each of them; otherwise a
difference in AUC mixes the representation with the luck of the split. So the splits are
checked first and a mismatch is refused. Per-fold AUC differences are shown (folds are paired),
but the p-values come from the pooled out-of-fold predictions (paired patient bootstrap and
DeLong), because per-fold differences share training data and a t-test on them is
anti-conservative. Runs that differ only in `seed` are also summarised by setting
(`compare_settings`). With many runs some p < 0.05 by chance, so each p is also given
Holm-adjusted over the runs tested against the reference (`with_holm`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from melanoma_mil import stats
from melanoma_mil.config import CompareConfig
from melanoma_mil.errors import UserError
from melanoma_mil.evaluation.compare_plot import plot
from melanoma_mil.evaluation.compare_settings import (
    ci_text,
    diff_text,
    holm_note,
    p_text,
    setting_of,
    settings_markdown,
    settings_table,
    spread_text,
    with_holm,
)
from melanoma_mil.io import write_together
from melanoma_mil.outdir import claim_output
from melanoma_mil.rundir import SPLITS, SUMMARY, load_run, pooled_predictions

log = logging.getLogger(__name__)

TABLE_METRICS = ("auc", "balanced_accuracy", "f1")
SETTINGS_CSV = "comparison_settings.csv"  # only when some runs differ only in seed
OUTPUTS = (
    "comparison.csv",
    "comparison_folds.csv",
    "comparison.md",
    "comparison.png",
    SETTINGS_CSV,
)


@dataclass
class RunResult:
    """What compare needs from one fit run dir."""

    path: Path
    name: str
    encoder: str
    cache_key: str
    summary: dict[str, Any]
    classes: list[str]
    splits_key: str
    run_id: str
    bag_level: str  # data.bag_level: a bag is a slide or a patient
    bags: pd.DataFrame  # one row per bag: slide_id, patient_id, y (class index), probs...
    prob_columns: list[str]
    setting: dict[str, Any]  # what makes its results, seed aside (`compare_settings`)
    seed: int

    def metric(self, key: str) -> dict[str, Any]:
        value = self.summary.get(key)
        if not isinstance(value, dict) or "per_fold" not in value:
            raise UserError(
                f"{self.path / SUMMARY} has no '{key}' with per_fold values: "
                "re-run fit with this package version."
            )
        return value

    def probs(self) -> np.ndarray:
        p = self.bags[self.prob_columns].to_numpy(np.float64)
        return p[:, 0] if p.shape[1] == 1 else p


def load_result(run_dir: str | Path) -> RunResult:
    """A complete fit run (through `rundir.load_run`) as compare needs it: one row per bag."""
    run = load_run(run_dir)
    classes = run.classes
    bags = pooled_predictions(run.predictions, classes).reset_index()
    binary = len(classes) == 2  # the positive class's probability, as `fit` scores AUC
    cols = [f"prob_{classes[-1]}"] if binary else [f"prob_{c}" for c in classes]
    return RunResult(
        path=run.run_dir,
        name=run.run_dir.name,
        encoder=str(run.summary.get("encoder") or run.provenance.get("encoder") or "?"),
        cache_key=str(run.provenance.get("cache_key") or "?"),
        summary=run.summary,
        classes=classes,
        splits_key=run.splits_sha256,
        run_id=run.run_id,
        bag_level=run.config.data.bag_level,
        bags=bags,
        prob_columns=cols,
        setting=setting_of(run),
        seed=run.config.seed,
    )


def check_distinct(runs: list[RunResult]) -> None:
    """The same run twice would be compared with itself (a copied folder keeps its run_id)."""
    for i, run in enumerate(runs):
        for other in runs[:i]:
            if run.path.resolve() == other.path.resolve() or run.run_id == other.run_id:
                raise UserError(
                    f"compare got the same run twice ({other.path} and {run.path}); pass "
                    "different runs."
                )


def check_paired(runs: list[RunResult]) -> None:
    """Refuse runs that were not evaluated on the same splits, bags, labels and classes."""
    ref = runs[0]
    for run in runs[1:]:
        if run.splits_key != ref.splits_key and run.bag_level != ref.bag_level:
            raise UserError(  # no cv.splits_file fits both: one names patients, one slides
                f"runs {ref.path} (data.bag_level={ref.bag_level}) and {run.path} "
                f"(data.bag_level={run.bag_level}) predicted different bags; compare runs "
                "fitted with the same data.bag_level."
            )
        if run.splits_key != ref.splits_key:
            raise UserError(
                f"runs {ref.path} and {run.path} used different splits: a paired comparison "
                f"needs the same folds; re-run fit with cv.splits_file={ref.path / SPLITS}."
            )
        if run.classes != ref.classes:
            raise UserError(_different_classes(ref, run))
        same_bags = run.bags["slide_id"].tolist() == ref.bags["slide_id"].tolist()
        if not same_bags or not np.array_equal(run.bags["y"], ref.bags["y"]):
            raise UserError(
                f"runs {ref.path} and {run.path} predicted different bags or labels: "
                "compare runs of the same cohort and labels."
            )
        _check_same_patients(ref, run)


def _check_same_patients(ref: RunResult, run: RunResult) -> None:
    """The bootstrap resamples the reference's patients: runs whose labels_csv grouped the same
    bags into other patients (e.g. splits pinned with cv.splits_file) are of another cohort."""
    differs = run.bags["patient_id"].to_numpy() != ref.bags["patient_id"].to_numpy()
    if differs.any():
        i = int(np.flatnonzero(differs)[0])
        slide, theirs = ref.bags["slide_id"].iloc[i], run.bags["patient_id"].iloc[i]
        raise UserError(
            f"runs {ref.path} and {run.path} put bags in different patients ({differs.sum()} "
            f"bags, e.g. {slide}: patient {ref.bags['patient_id'].iloc[i]} vs {theirs}), so "
            "their CIs and tests would depend on the reference; fit both with the same "
            "labels_csv patient_id column."
        )


def _different_classes(ref: RunResult, run: RunResult) -> str:
    """Both class lists and the fix: the order matters too, the last class being positive."""
    shown = f"[{', '.join(ref.classes)}] vs [{', '.join(run.classes)}]"
    keys = [f'"data.classes=[{",".join(c)}]"' for c in (ref.classes, run.classes)]
    fix = (
        f"fit one again in the other's order ({keys[0]} or {keys[1]})"
        if sorted(ref.classes) == sorted(run.classes)
        else "fit both on the same labels with the same data.classes=[...]"
    )
    return (
        f"runs {ref.path} and {run.path} have different classes, {shown} (the last is the "
        f"positive class); {fix}."
    )


def _unique_names(runs: list[RunResult]) -> None:
    """Runs sharing a folder name are named by as many trailing path parts as tell them apart
    (a/x/run, b/x/run): the table, its rows and the figure's columns are keyed by name."""
    names = [r.name for r in runs]
    clashing = [r for r in runs if names.count(r.name) > 1]
    parts = [r.path.absolute().parts for r in clashing]
    depth = 2
    while len({p[-depth:] for p in parts}) < len(parts):  # ends: check_distinct, paths differ
        depth += 1
    for run, p in zip(clashing, parts, strict=True):
        run.name = "/".join(p[-depth:])


def _delong_p(y: np.ndarray, probs: np.ndarray, ref_probs: np.ndarray) -> float | None:
    """DeLong p-value; None for multi-class or fewer than two bags of a class."""
    if probs.ndim != 1:
        return None
    try:
        return stats.delong_test(y, probs, ref_probs).p_value
    except ValueError:
        return None


def _fold_diffs(diff: np.ndarray) -> dict[str, Any]:
    """Per-fold AUC differences over the folds where both AUCs are defined (a fold with one
    class has none), and how many those are."""
    d = diff[np.isfinite(diff)]
    return {
        "fold_auc_diff_mean": float(d.mean()) if len(d) else float("nan"),
        "fold_auc_diff_std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
        "folds_better": int((d > 0).sum()),
        "folds_compared": len(d),
        "folds": len(diff),
    }


def comparison_tables(
    runs: list[RunResult], ref_index: int, n_boot: int, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per run, one row per run x fold) with paired statistics against the reference."""
    ref = runs[ref_index]
    y, groups = ref.bags["y"].to_numpy(), ref.bags["patient_id"].to_numpy()
    ref_folds = np.asarray(ref.metric("auc")["per_fold"], dtype=float)
    rows, fold_rows = [], []
    for run in runs:
        row: dict[str, Any] = {"run": run.name, "encoder": run.encoder, "cache_key": run.cache_key}
        row["n_bags"] = len(run.bags)
        row["n_patients"] = run.bags["patient_id"].nunique()
        for key in TABLE_METRICS:
            m = run.metric(key)
            row[f"{key}_mean"], row[f"{key}_std"] = float(m["mean"]), float(m["std"])
        pooled, low, high = stats.bootstrap_auc_ci(y, run.probs(), groups, n_boot, seed)
        row.update(pooled_auc=pooled, pooled_auc_ci_low=low, pooled_auc_ci_high=high)
        folds = np.asarray(run.metric("auc")["per_fold"], dtype=float)
        if len(folds) != len(ref_folds):
            raise UserError(f"{run.path} has {len(folds)} folds, the reference {len(ref_folds)}.")
        diff = folds - ref_folds
        row.update(reference=ref.name, is_reference=run is ref, **_fold_diffs(diff))
        boot = stats.paired_bootstrap_test(y, run.probs(), ref.probs(), groups, n_boot, seed)
        row.update(
            pooled_auc_diff=boot.diff,
            pooled_auc_diff_ci_low=boot.ci_low,
            pooled_auc_diff_ci_high=boot.ci_high,
            p_bootstrap=boot.p_value,
        )
        row["p_delong"] = _delong_p(y, run.probs(), ref.probs())
        row["run_dir"] = str(run.path)
        rows.append(row)
        for k, (auc, d) in enumerate(zip(folds, diff, strict=True)):
            fold_rows.append({"run": run.name, "fold": k, "auc": auc, "auc_diff_vs_ref": d})
    return with_holm(pd.DataFrame(rows), ["p_bootstrap", "p_delong"]), pd.DataFrame(fold_rows)


def markdown(table: pd.DataFrame, n_boot: int) -> str:
    """The paper table: mean ± std over folds, pooled AUC with CI, paired differences."""
    head = (
        "| run | encoder | AUC | balanced acc. | F1 | pooled AUC [95% CI] "
        "| ΔAUC per fold | Δ pooled AUC [95% CI] | p (bootstrap) | p (DeLong) |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in table.itertuples():
        ci = ci_text(r.pooled_auc, r.pooled_auc_ci_low, r.pooled_auc_ci_high)
        if r.is_reference:
            delta, dci, pb, pd_ = "reference", "", "", ""
        else:
            delta = spread_text(r.fold_auc_diff_mean, r.fold_auc_diff_std)
            if r.folds_compared < r.folds:  # the others have an undefined AUC
                delta += f" ({r.folds_compared} of {r.folds} folds)"
            dci = diff_text(r.pooled_auc_diff, r.pooled_auc_diff_ci_low, r.pooled_auc_diff_ci_high)
            pb = p_text(r.p_bootstrap, r.p_bootstrap_holm)
            pd_ = p_text(r.p_delong, r.p_delong_holm)
        cells = [
            r.run,
            r.encoder,
            spread_text(r.auc_mean, r.auc_std),
            spread_text(r.balanced_accuracy_mean, r.balanced_accuracy_std),
            spread_text(r.f1_mean, r.f1_std),
            ci,
            delta,
            dci,
            pb,
            pd_,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    first = table.iloc[0]
    lines += [
        "",
        f"Mean ± std over test folds; pooled AUC over all {first.n_bags} out-of-fold bags "
        f"({first.n_patients} patients) with a {n_boot}-replicate patient bootstrap CI. "
        "Δ = run - reference on identical splits; p-values compare the pooled AUCs with a "
        "paired patient bootstrap and DeLong's test (Sun & Xu 2014; binary only, treats bags "
        "as independent, so prefer the bootstrap when patients have several slides)."
        + _holm_note(table),
    ]
    return "\n".join(lines) + "\n"


def _holm_note(table: pd.DataFrame) -> str:
    """`holm_note` of the runs with a bootstrap p, and of those with a DeLong p if fewer."""
    n_boot, n_delong = (int(table[f"{c}_holm"].notna().sum()) for c in ("p_bootstrap", "p_delong"))
    detail = "" if n_delong in (0, n_boot) else f" ({n_delong} for DeLong)"
    return holm_note(n_boot, "run", detail)


def _reference_index(runs: list[RunResult], reference: str | None) -> int:
    if reference is None:
        return 0
    for i, run in enumerate(runs):
        if (
            reference in (run.name, str(run.path))
            or Path(reference).resolve() == run.path.resolve()
        ):
            return i
    raise UserError(f"reference={reference!r} is none of the runs {[r.name for r in runs]}.")


def compare_runs(cfg: CompareConfig, marker: dict[str, Any] | None = None) -> pd.DataFrame:
    """Load, check and compare the runs; write the outputs; return the per-run table.

    ``marker`` (default ``{"command": "compare"}``) says who made the folder: `sweep` marks its
    own comparison so that it never takes one of yours for it."""
    if len(cfg.run_dirs) < 2:
        raise UserError("compare needs at least two run dirs: compare RUN_DIR RUN_DIR ...")
    out = Path(cfg.output_dir)
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not cfg.overwrite:
        raise UserError(
            f"{out} already holds {existing}: pass overwrite=true or another output_dir."
        )
    marker = marker or {"command": "compare"}
    claim_output(out, marker, cfg.overwrite, OUTPUTS, write=False)  # before the long work
    runs = [load_result(d) for d in cfg.run_dirs]
    check_distinct(runs)
    check_paired(runs)
    _unique_names(runs)
    ref_index = _reference_index(runs, cfg.reference)
    table, folds = comparison_tables(runs, ref_index, cfg.bootstrap, cfg.seed)
    by_setting = settings_table(runs, ref_index, cfg.bootstrap, cfg.seed)
    claim_output(out, marker, cfg.overwrite, OUTPUTS)
    md = markdown(table, cfg.bootstrap)
    files = {out / "comparison.csv": table, out / "comparison_folds.csv": folds}
    if by_setting is not None:
        files[out / SETTINGS_CSV] = by_setting
        md += "\n" + settings_markdown(by_setting, cfg.bootstrap)
    blobs = {path: df.to_csv(index=False).encode() for path, df in files.items()}
    blobs |= {out / "comparison.md": md.encode(), out / "comparison.png": plot(runs, folds)}
    write_together(blobs)  # a full disk midway leaves the earlier comparison whole
    if by_setting is None:  # an earlier comparison's (overwrite=true) is not of these runs
        (out / SETTINGS_CSV).unlink(missing_ok=True)
    print(md, end="")
    written = "" if by_setting is None else f", {SETTINGS_CSV}"
    log.info(
        "comparison written to %s (comparison.csv, comparison.md%s, comparison.png)", out, written
    )
    return table


def run_compare(cfg: CompareConfig) -> int:
    compare_runs(cfg)
    return 0
