"""report.html: one self-contained file (every image a data URI, no script, no link out) that a
reviewer can open offline: what was run, the cohort, cross-validation, classification,
calibration, survival and the top heatmaps."""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;
margin-top:1.8em}table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
.figs{display:flex;flex-wrap:wrap;gap:1em}.figs figure{margin:0}
.figs img{max-width:520px;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:.4em .8em;margin:.5em 0}
.key{display:flex;flex-wrap:wrap;gap:1em}.key div{background:#f6f8fa;padding:.5em 1em;
border-radius:6px}.muted{color:#666;font-size:.9em}pre{background:#f6f8fa;padding:.6em;
overflow-x:auto;font-size:.85em}
"""
MEDIAN_KEYS = ("median", "median_ci_low", "median_ci_high")


@dataclass
class RunInfo:
    """The `fit` run behind the predictions (read through melanoma_mil.rundir)."""

    run_dir: str
    config_yaml: str
    provenance: dict[str, Any]
    cv_summary: dict[str, Any] | None
    roc_png: bytes | None


@dataclass
class Heatmap:
    slide_id: str
    prob: float
    image: bytes  # JPEG
    caption: str


def _e(x: Any) -> str:
    return html.escape(str(x))


def num(x: Any, digits: int = 3) -> str:
    """A number for people: '-' when missing, 'not reached' for an infinite median."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "not reached"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def pval(p: float | None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "-"
    return "< 0.0001" if p < 1e-4 else f"{p:.2g}" if p < 0.01 else f"{p:.3f}"


def p_is(p: float | None) -> str:
    """'p = 0.012' or 'p < 0.0001'."""
    text = pval(p)
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def logrank_text(lr: dict[str, Any]) -> str:
    """'log-rank p = 0.012', or why there is no test (one wording for report, figure, CLI)."""
    return "log-rank not estimable" if lr.get("not_estimable") else f"log-rank {p_is(lr['p'])}"


def hr_text(uni: dict[str, Any]) -> str:
    """'HR high vs low 2.10 (95% CI 1.20-3.70)' or 'HR high vs low not estimable'."""
    contrast = uni["term"].removeprefix("group: ")
    if uni.get("not_estimable"):
        return f"HR {contrast} not estimable"
    low, high = num(uni["ci_low"], 2), num(uni["ci_high"], 2)
    return f"HR {contrast} {num(uni['hr'], 2)} (95% CI {low}-{high})"


def c_index_text(c: dict[str, Any]) -> str:
    """'C-index 0.640 (0.55-0.72), higher = longer survival': a C of 0.36 is as strong as one of
    0.64 with the other sign, so the convention travels with the number."""
    if c.get("not_estimable"):
        return "C-index not estimable"
    return f"C-index {ci(c)}, higher = longer survival"


def ci(m: dict[str, Any] | None, digits: int = 3) -> str:
    if not m:
        return "-"
    return f"{num(m['value'], digits)} ({num(m['ci_low'], digits)}-{num(m['ci_high'], digits)})"


def _table(head: list[str], rows: list[list[Any]], numeric_from: int = 1) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=n' if i >= numeric_from else ''}>{_e(v)}</td>" for i, v in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{th}</tr>{body}</table>"


def image(data: bytes, name: str, caption: str, mime: str = "image/png") -> str:
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return (
        f'<figure><img src="{uri}" alt="{_e(caption)}" data-figure="{_e(name)}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _notes(notes: list[str]) -> str:
    return "".join(f'<div class="warn">{_e(n)}</div>' for n in notes)


def _key_numbers(ev: dict[str, Any]) -> str:
    items = []
    cls, surv = ev.get("classification"), ev.get("survival")
    if cls:
        items.append(f"AUC {ci(cls['auc'])}")
    if surv:
        items.append(logrank_text(surv["logrank"]))
        items.append(hr_text(surv["cox"]["univariable"]))
        items.append(c_index_text(surv["c_index"]))
    return '<div class="key">' + "".join(f"<div>{_e(i)}</div>" for i in items) + "</div>"


def _what_was_run(ev: dict[str, Any], config_yaml: str, run: RunInfo | None) -> str:
    parts = ["<h2>What was run</h2>"]
    parts.append(
        _table(
            ["item", "value"],
            [
                ["predictions", ev["predictions"]],
                ["predictions from", ev["kind"]],
                ["scored per", f"{ev['level']} ({ev['level_note']})"],
                ["classes (last = positive)", ", ".join(ev["classes"])],
                ["code version", ev["code_version"]],
                ["created", ev["created"]],
            ],
        )
    )
    if run is None:
        parts.append(
            '<p class="muted">No `fit` run is known for these predictions (pass run_dir=): '
            "encoder, tiling and splits are not shown.</p>"
        )
    else:
        prov = run.provenance
        rows = [["run_dir", run.run_dir]]
        rows += [[k, v if isinstance(v, str) else json.dumps(v)] for k, v in sorted(prov.items())]
        parts.append("<h3>Run: encoder and weights provenance, tiling, splits</h3>")
        parts.append(_table(["field", "value"], rows))
        parts.append(f"<details><summary>fit config.yaml</summary><pre>{_e(run.config_yaml)}</pre>")
        parts.append("</details>")
    parts.append(f"<details><summary>evaluate config</summary><pre>{_e(config_yaml)}</pre>")
    parts.append("</details>")
    return "".join(parts)


def _cohort(ev: dict[str, Any]) -> str:
    counts = ev["counts"]
    rows = [[c, v["slides"], v["patients"]] for c, v in counts["per_class"].items()]
    parts = ["<h2>Cohort</h2>", _table(["class (label)", "slides", "patients"], rows)]
    parts.append(
        _table(
            ["count", "n"],
            [[k, v] for k, v in counts.items() if not isinstance(v, dict)],
        )
    )
    excluded = ev["excluded"]
    if excluded:
        shown = excluded[:500]
        parts.append(f"<h3>Excluded ({len(excluded)})</h3>")
        rows = [[x["id"], x["level"], x["analysis"], x["reason"]] for x in shown]
        parts.append(_table(["id", "level", "left out of", "why"], rows, numeric_from=9))
        if len(excluded) > len(shown):
            more = len(excluded) - len(shown)
            parts.append(f'<p class="muted">... and {more} more (all in evaluation.json).</p>')
    return "".join(parts)


def _cross_validation(run: RunInfo | None) -> str:
    if run is None or not run.cv_summary:
        return ""
    s = run.cv_summary
    metrics = [m for m in ("auc", "accuracy", "balanced_accuracy", "f1") if m in s]
    folds = len(s[metrics[0]]["per_fold"]) if metrics else 0
    head = ["metric", *[f"fold {i}" for i in range(folds)], "mean", "std"]
    rows = [
        [m, *[num(v) for v in s[m]["per_fold"]], num(s[m]["mean"]), num(s[m]["std"])]
        for m in metrics
    ]
    parts = ["<h2>Cross-validation (the run's test folds)</h2>", _table(head, rows)]
    pooled = s.get("pooled_auc")
    if pooled:
        parts.append(
            f"<p>Pooled out-of-fold AUC {_e(ci(pooled))} (95% CI, "
            f"{_e(pooled.get('bootstrap', ''))} bootstrap resamples of "
            f"{_e(pooled.get('resampled', 'patients'))}), {_e(s.get('n_bags', ''))} bags; "
            f"splits sha256 {_e(str(s.get('splits_sha256', ''))[:16])}.</p>"
        )
    if run.roc_png:
        parts.append('<div class="figs">')
        parts.append(image(run.roc_png, "cv_roc", "run's ROC: each test fold and pooled"))
        parts.append("</div>")
    return "".join(parts)


def _classification(ev: dict[str, Any], figures: dict[str, bytes]) -> str:
    cls = ev.get("classification")
    if not cls:
        return "<h2>Classification</h2><p class='muted'>No labels: pass labels_csv=.</p>"
    rows = [
        [m, num(cls[m]["value"]), num(cls[m]["ci_low"]), num(cls[m]["ci_high"])]
        for m in cls["metrics"]
    ]
    parts = [
        "<h2>Classification</h2>",
        f"<p>{_e(cls['n'])} {_e(ev['level'])}s; {_e(cls['rule'])}. 95% CIs: "
        f"{_e(cls['bootstrap'])} bootstrap resamples of patients (percentile).</p>",
        _table(["metric", "value", "95% CI low", "95% CI high"], rows),
        '<div class="figs">',
    ]
    for name, caption in (("roc", "ROC with 95% bootstrap band"), ("pr", "precision-recall")):
        if name in figures:
            parts.append(image(figures[name], name, caption))
    parts.append("</div>")
    cal = ev["calibration"]
    parts += [
        "<h2>Calibration</h2>",
        f"<p>Brier score {_e(num(cal['brier']))}, expected calibration error (ECE) "
        f"{_e(num(cal['ece']))}: {_e(cal['definition'])}.</p>",
        '<div class="figs">',
        image(figures["calibration"], "calibration", "reliability diagram"),
        "</div>",
    ]
    return "".join(parts)


def _survival(ev: dict[str, Any], figures: dict[str, bytes]) -> str:
    surv = ev.get("survival")
    if not surv:
        return "<h2>Survival</h2><p class='muted'>No clinical data: pass clinical_csv=.</p>"
    rows = [[g, v["n"], v["events"], *_medians(v)] for g, v in surv["groups"].items()]
    lr, c_index = surv["logrank"], surv["c_index"]
    cox = surv["cox"]
    logrank = (
        f"not estimable ({lr['not_estimable']})"
        if lr["not_estimable"]
        else f"chi2 = {num(lr['statistic'], 2)} on {lr['df']} df, {p_is(lr['p'])}"
    )
    harrell = (
        f"not estimable ({c_index['not_estimable']})"
        if c_index["not_estimable"]
        else f"{ci(c_index)} ({c_index['score']})"
    )
    parts = [
        "<h2>Survival</h2>",
        f"<p>{_e(surv['patients_used'])} patients ({_e(surv['patients_excluded'])} excluded); "
        f"time: <code>{_e(surv['time_column'])}</code>, event: "
        f"<code>{_e(surv['event_column'])}</code>. Groups: {_e(surv['group_rule'])}.</p>",
        _table(["group", "patients", "events", "median survival", "95% CI low", "high"], rows),
        f"<p>Log-rank: {_e(logrank)}. Harrell's C of the probability: {_e(harrell)}.</p>",
        "<h3>Cox proportional hazards</h3>",
        _cox_table(surv),
    ]
    if cox.get("adjusted") is not None:
        left = cox["adjusted_left_out"]
        parts.append(
            f"<p>The adjusted model uses the {_e(cox['adjusted_n'])} of "
            f"{_e(surv['patients_used'])} patients with every covariate; {_e(left)} "
            f"{'lacks' if left == 1 else 'lack'} one"
            f"{' (listed under Excluded, left out of: adjusted Cox)' if left else ''}.</p>"
        )
    ph = cox["ph_check"]
    tested = [m for m in ("univariable", "adjusted") if ph.get(m)]
    untested = [m for m in ("univariable", "adjusted") if m in ph and not ph[m]]
    verdict = (
        "not tested: no Cox model could be estimated"
        if not tested
        else "holds for every term"
        if ph["ok"]
        else "fails for some terms, see below"
    )
    if tested and untested:
        verdict += f" (the {' and '.join(untested)} model not tested: not estimable)"
    parts.append(f"<p class='muted'>Proportional hazards ({_e(ph['test'])}): {_e(verdict)}.</p>")
    parts.append(_notes(surv["notes"]))
    parts.append('<div class="figs">')
    parts.append(image(figures["km"], "km", "Kaplan-Meier by group, numbers at risk below"))
    parts.append("</div>")
    return "".join(parts)


def _medians(group: dict[str, Any]) -> list[str]:
    """A missing median is one the curve never reached, unless the group has no patients."""
    if not group["n"]:
        return ["-"] * len(MEDIAN_KEYS)
    return [num(group[k], 1) if group[k] is not None else "not reached" for k in MEDIAN_KEYS]


def _cox_table(surv: dict[str, Any]) -> str:
    """Hazard ratios with the patients each model used; a model without an estimate says
    "not estimable" in place of numbers (the reason is in the notes under the table)."""
    cox = surv["cox"]
    models = [("univariable", {cox["univariable"]["term"]: cox["univariable"]})]
    if cox.get("adjusted") is not None:
        models.append(("adjusted", cox["adjusted"]))
    rows = []
    for model, terms in models:
        n = surv["patients_used"] if model == "univariable" else cox["adjusted_n"]
        missing = (
            cox["univariable"]["not_estimable"]
            if model == "univariable"
            else cox.get("adjusted_not_estimable")
        )
        for t, v in terms.items():
            if missing:
                rows.append([f"{model}: {t}", n, "not estimable", "-", "-", "-"])
            else:
                hr = [num(v["hr"]), num(v["ci_low"]), num(v["ci_high"]), pval(v["p"])]
                rows.append([f"{model}: {t}", n, *hr])
    return _table(["term", "patients", "HR", "95% CI low", "high", "p"], rows)


def _heatmaps(heatmaps: list[Heatmap]) -> str:
    if not heatmaps:
        return ""
    parts = ["<h2>Top heatmaps</h2>", '<div class="figs">']
    parts += [image(h.image, f"heatmap:{h.slide_id}", h.caption, "image/jpeg") for h in heatmaps]
    parts.append("</div>")
    return "".join(parts)


def render_report(
    ev: dict[str, Any],
    figures: dict[str, bytes],
    config_yaml: str,
    run: RunInfo | None,
    heatmaps: list[Heatmap],
) -> str:
    """The whole report as one HTML string."""
    title = f"melanoma-mil evaluation: {ev['predictions']}"
    body = [
        f"<h1>{_e('melanoma-mil evaluation')}</h1>",
        f"<p class='muted'>{_e(ev['predictions'])} - {_e(ev['created'])}</p>",
        _key_numbers(ev),
        _notes(ev.get("warnings", [])),
        _what_was_run(ev, config_yaml, run),
        _cohort(ev),
        _cross_validation(run),
        _classification(ev, figures),
        _survival(ev, figures),
        _heatmaps(heatmaps),
    ]
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
