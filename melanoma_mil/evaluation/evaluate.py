"""`evaluate`: predictions (+ labels, + clinical data) -> evaluation.json, figures, report.html.

Everything is computed in memory first and written at the end (each file atomically, the report
last), so a bad input never leaves a half-written folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from melanoma_mil.config import EvaluateConfig, check, to_yaml
from melanoma_mil.errors import UserError
from melanoma_mil.evaluation import classification as C
from melanoma_mil.evaluation.calibration import calibration
from melanoma_mil.evaluation.clinical import Clinical, read_clinical
from melanoma_mil.evaluation.report import (
    RunInfo,
    c_index_text,
    ci,
    hr_text,
    logrank_text,
    now,
    render_report,
)
from melanoma_mil.evaluation.report_inputs import check_heatmaps, find_run, pick_heatmaps
from melanoma_mil.evaluation.tables import Scored, load_scored
from melanoma_mil.evaluation.version import code_version
from melanoma_mil.ids import unmatched_ids
from melanoma_mil.io import json_file_text, json_safe, write_together
from melanoma_mil.outdir import claim_output
from melanoma_mil.rundir import TrainedRun

log = logging.getLogger(__name__)
OUTPUTS = ("evaluation.json", "roc.png", "pr.png", "calibration.png", "km.png")
LEVEL_NOTES = {
    "patient": "each patient's slides averaged: mean probability per class",
    "slide": "one row per slide (bag)",
    "patient_predictions": "one row per patient: predict pooled each patient's slides into a bag",
}


def _class_warnings(
    present: list[str], classes: list[str], dropped: dict[str, int], n_boot: int
) -> list[str]:
    """Say when a metric is over fewer classes or fewer replicates than asked for."""
    out = []
    if len(present) < 2:
        out.append(f"only class {present} among the labels: AUC and curves are undefined")
    elif len(present) < len(classes):
        absent = [c for c in classes if c not in present]
        out.append(
            f"class(es) {absent} absent from the labels: the macro AUC is over {present} only"
        )
    if dropped:
        counts = ", ".join(f"{m} {n}" for m, n in dropped.items())
        out.append(
            f"bootstrap replicates left out of a CI as undefined (a class or prediction missing "
            f"from the resample), of {n_boot}: {counts}"
        )
    return out


def _classification(
    scored: Scored, cfg: EvaluateConfig, warnings: list[str]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, bytes]]:
    from melanoma_mil.viz.clinical import calibration_figure, pr_figure, roc_figure

    units = scored.units[scored.units["y"] >= 0]
    y = units["y"].to_numpy()
    probs = units[scored.prob_columns].to_numpy()
    patients = units["patient_id"].to_numpy()
    classes, pos = scored.classes, scored.classes[-1]
    present = [c for i, c in enumerate(classes) if (y == i).any()]
    binary = len(classes) == 2
    rule = (
        f"{pos} predicted when prob_{pos} >= {cfg.threshold:g}"
        if binary
        else "the most probable class is predicted; metrics are one-vs-rest macro averages"
    )
    cls = C.classification_metrics(y, probs, patients, cfg.threshold, cfg.bootstrap, cfg.seed)
    warnings += _class_warnings(present, classes, cls["bootstrap_dropped"], cfg.bootstrap)
    cls.update(
        metrics=list(C.METRICS),
        n=len(units),
        patients=int(pd.Series(patients).nunique()),
        rule=rule,
        threshold=cfg.threshold if binary else None,
        bootstrap=cfg.bootstrap,
        ci_level=0.95,
        resampled="patients",
        definitions=C.DEFINITIONS,
    )
    cal = calibration(y, probs, cfg.calibration_bins)
    title = f"{len(units)} {cfg.level}s"
    figures: dict[str, bytes] = {}
    if len(present) >= 2:
        band = C.roc_band(y, probs[:, 1], patients, cfg.bootstrap, cfg.seed) if binary else None
        auc = cls["auc"]
        label = f"AUC {auc['value']:.3f} ({auc['ci_low']:.3f}-{auc['ci_high']:.3f})"
        curves = C.roc_curves(y, probs, classes)
        if binary:
            curves = [(f"{curves[0][0]}: {label}", curves[0][1], curves[0][2])]
        figures["roc"] = roc_figure(curves, band, f"ROC, {title}")
        figures["pr"] = pr_figure(C.pr_curves(y, probs, classes), f"precision-recall, {title}")
    score = probs[:, 1] if binary else probs.max(1)
    xlabel = f"predicted prob_{pos}" if binary else "highest predicted probability"
    figures["calibration"] = calibration_figure(
        cal["reliability"], score, xlabel, f"calibration, {title}"
    )
    return cls, cal, figures


def _survival(
    scored: Scored, clinical: Clinical, cfg: EvaluateConfig
) -> tuple[dict[str, Any], bytes]:
    from melanoma_mil.evaluation.survival import analyse_survival
    from melanoma_mil.evaluation.survival_groups import GROUP, SCORE, make_groups
    from melanoma_mil.viz.clinical import km_figure

    patients = scored.patients.set_index("patient_id")
    table = clinical.table
    no_fu = set(clinical.no_follow_up)
    missing = [p for p in patients.index if p not in table.index]
    absent = [p for p in missing if p not in no_fu]
    scored.exclude(absent, "patient", "not in clinical_csv", "survival")
    empty = [p for p in missing if p in no_fu]
    scored.exclude(empty, "patient", "empty time or event in clinical_csv", "survival")
    cohort = patients[patients.index.isin(table.index)]
    if cohort.empty:
        raise UserError(
            f"no patient of the predictions (e.g. {list(patients.index[:3])}) is in clinical CSV "
            f"'{cfg.clinical_csv}' (e.g. {list(table.index[:3])}): patient_id values must match."
        )
    if missing:
        log.warning("survival: %d patients excluded: %s", len(missing), missing[:10])
    pos = scored.classes[-1]
    groups = make_groups(cohort[scored.prob_columns], scored.classes, cfg.groups, cfg.threshold)
    data = table.loc[cohort.index].assign(**{GROUP: groups.labels, SCORE: cohort[f"prob_{pos}"]})
    surv = analyse_survival(
        data, groups, clinical.covariates, cfg.bootstrap, cfg.seed, f"prob_{pos}"
    )
    for patient, reason in surv.adjusted_left_out.items():
        scored.exclude([patient], "patient", reason, "adjusted Cox")
    unused = table.index[~table.index.isin(patients.index)].tolist()  # no prediction names them
    summary = {
        **surv.summary,
        "group_rule": groups.rule,
        "groups_spec": cfg.groups,
        "time_column": clinical.time_column,
        "event_column": clinical.event_column,
        "covariates": clinical.covariates,
        "level": "patient (each patient's slides "
        + ("pooled into one bag by predict)" if scored.slides is None else "averaged)"),
        "patients_used": len(data),
        "patients_excluded": len(missing),
        "clinical_patients_not_predicted": len(unused),
    }
    what = f"{len(unused)} patient(s) of clinical_csv '{cfg.clinical_csv}'"
    fix = "check that their slides were predicted and their patient_id is the predictions' one"
    if note := unmatched_ids(what, unused, patients.index.tolist(), fix):
        summary["notes"].append(note)
    annotation = f"{logrank_text(summary['logrank'])}\n{hr_text(summary['cox']['univariable'])}"
    if empty := [g for g, v in surv.summary["groups"].items() if not v["n"]]:
        annotation += f"\nno patients in {', '.join(empty)}"  # a group without a curve
    title = f"Kaplan-Meier, {len(data)} patients"
    figure = km_figure(surv.fitters, annotation, clinical.time_column, title)
    return summary, figure


def _counts(scored: Scored, survival: dict[str, Any] | None) -> dict[str, Any]:
    names = {**dict(enumerate(scored.classes)), -1: "unlabelled"}
    slides = scored.slides
    per_class = {
        name: {
            "slides": int((slides["y"] == y).sum()) if slides is not None else None,
            "patients": int((scored.patients["y"] == y).sum()),
        }
        for y, name in names.items()
    }
    excluded = scored.excluded
    return {
        "slides_scored": len(scored.slides) if scored.slides is not None else None,
        "slides_excluded": len({x["id"] for x in excluded if x["level"] == "slide"}),
        "patients_scored": len(scored.patients),
        "patients_excluded": len({x["id"] for x in excluded if x["level"] == "patient"}),
        "patients_used": int((scored.patients["y"] >= 0).sum())
        if survival is None
        else int(max((scored.patients["y"] >= 0).sum(), survival["patients_used"])),
        "per_class": per_class,
    }


def _check_outputs(out: Path, report: Path, overwrite: bool) -> None:
    """Refuse, before any work, a folder another command made (`outdir`: never replaced, even
    with overwrite=true) and an earlier evaluation unless ``overwrite``."""
    claim_output(out, {"command": "evaluate"}, overwrite, (*OUTPUTS, report.name), write=False)
    taken = [p for p in [*(out / n for n in OUTPUTS), report] if p.exists()]
    if taken and not overwrite:
        raise UserError(
            f"'{taken[0]}' exists; pass overwrite=true to replace the evaluation or choose "
            "another output_dir."
        )


def _write(
    out: Path, report: Path, ev: dict[str, Any], figures: dict[str, bytes], html: str
) -> None:
    claim_output(out, {"command": "evaluate"}, True, OUTPUTS)  # checked before: mark it
    files = {report: html.encode(), out / "evaluation.json": json_file_text(ev).encode()}
    files |= {out / f"{name}.png": data for name, data in figures.items()}
    write_together(files)  # a full disk midway leaves the earlier evaluation whole
    for name in ("roc", "pr", "calibration", "km"):
        stale = out / f"{name}.png"
        if name not in figures and stale.exists():  # overwrite=true: none of an older one stays
            stale.unlink()


def _inputs(cfg: EvaluateConfig) -> tuple[TrainedRun | None, Scored, Clinical | None]:
    """The run (`find_run`), the scored predictions and the clinical data, read and checked;
    refused when nothing can be evaluated (no label and no clinical data)."""
    run = find_run(cfg)
    check_heatmaps(cfg, run)
    scored = load_scored(cfg.predictions, cfg.labels_csv, cfg.level, run)
    clinical = (
        read_clinical(cfg.clinical_csv, cfg.time_column, cfg.event_column, list(cfg.covariates))
        if cfg.clinical_csv
        else None
    )
    if not scored.labelled and clinical is None:
        source = f"labels CSV '{cfg.labels_csv}'" if cfg.labels_csv else "them"
        raise UserError(
            f"nothing to evaluate: no prediction of '{cfg.predictions}' has a label in {source} "
            "and no clinical data is given; pass labels_csv= with labels and/or clinical_csv=."
        )
    return run, scored, clinical


def evaluate(cfg: EvaluateConfig, report: Path | None = None) -> dict[str, Any]:
    """Compute and write everything; return evaluation.json's content."""
    check(cfg)
    if not cfg.predictions:
        raise UserError("predictions is not set: pass predictions=PATH/predictions.csv.")
    out = Path(cfg.output_dir)
    report = report or out / "report.html"
    _check_outputs(out, report, cfg.overwrite)
    run, scored, clinical = _inputs(cfg)
    level_note = LEVEL_NOTES["patient_predictions" if scored.slides is None else cfg.level]
    warnings: list[str] = []
    if run and run.run_dir.resolve() != Path(str(cfg.predictions)).parent.resolve():
        note = run.threshold_note(cfg.threshold)  # an external cohort's, scored otherwise?
        warnings += [note] if note else []
    ev: dict[str, Any] = {
        "predictions": str(cfg.predictions),
        "kind": scored.kind,
        "run_dir": str(run.run_dir) if run else None,
        "level": cfg.level,
        "level_note": level_note,
        "classes": scored.classes,
        "positive_class": scored.classes[-1],
        "code_version": code_version(),
        "created": now(),
        "classification": None,
        "calibration": None,
        "survival": None,
        "warnings": warnings,
    }
    figures: dict[str, bytes] = {}
    if scored.labelled:
        ev["classification"], ev["calibration"], f = _classification(scored, cfg, warnings)
        figures.update(f)
    else:
        warnings.append("no labels: classification and calibration are not evaluated")
    warnings += scored.warnings
    if clinical is not None:
        ev["survival"], figures["km"] = _survival(scored, clinical, cfg)
        ev["group_rule"] = ev["survival"]["group_rule"]
    ev["counts"] = _counts(scored, ev["survival"])
    ev["excluded"] = scored.excluded
    heatmaps = pick_heatmaps(scored, cfg, warnings)
    ev = json_safe(ev)
    info = None
    if run is not None:
        roc = run.roc_path.read_bytes() if run.roc_path.is_file() else None
        info = RunInfo(str(run.run_dir), to_yaml(run.config), run.provenance, run.summary, roc)
    html = render_report(ev, figures, to_yaml(cfg), info, heatmaps)
    _write(out, report, ev, figures, html)
    return ev


def summary_line(ev: dict[str, Any]) -> str:
    counts, cls, level = ev["counts"], ev["classification"], ev["level"]
    parts = [f"{counts['patients_scored']} patients"]
    if cls:  # say so when the AUC is over fewer units than were scored (some unlabelled)
        units = counts["slides_scored"] if level == "slide" else counts["patients_scored"]
        over = f" on the {cls['n']} labelled {level}s" if cls["n"] != units else ""
        parts.append(f"AUC {ci(cls['auc'])}{over}")
    if ev["survival"]:
        s = ev["survival"]
        parts.append(
            f"{logrank_text(s['logrank'])}, {hr_text(s['cox']['univariable'])}, "
            f"{c_index_text(s['c_index'])}"
        )
    return "; ".join(parts) + " (95% CIs)"


def print_notes(ev: dict[str, Any]) -> None:
    """The warnings and survival notes under the summary line: why a number is missing."""
    for w in ev["warnings"] + ((ev["survival"] or {}).get("notes") or []):
        print(f"  note: {w}")


def run_evaluate(cfg: EvaluateConfig) -> int:
    """The `evaluate` command: print the key numbers and where the report is."""
    ev = evaluate(cfg)
    print(f"evaluate: {summary_line(ev)}")
    print_notes(ev)
    print(f"outputs in {cfg.output_dir}: report.html, evaluation.json, figures")
    return 0
