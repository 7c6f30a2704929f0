"""`fit` and `predict` evaluate their own predictions when given clinical data (or labels, for
`predict`): the same outputs as `evaluate`, in <output_dir>/evaluation/, and
<output_dir>/report.html. Inputs are checked before the long work starts."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

from melanoma_mil.config import CLINICAL_KEYS, EvaluateConfig
from melanoma_mil.errors import UserError
from melanoma_mil.rundir import EVALUATION, REPORT

log = logging.getLogger(__name__)


def check_inputs(cfg: Any, run: Any = None) -> None:
    """Read the clinical CSV (and predict's labels_csv, mapped to ``run``'s classes as its
    report will) now, so a bad one fails before training or prediction."""
    if getattr(cfg, "labels_csv", None) and run is not None:
        from melanoma_mil.evaluation.tables import labels_table

        labels_table(cfg.labels_csv, run, run.classes)
    if cfg.clinical_csv:
        from melanoma_mil.evaluation.clinical import read_clinical

        read_clinical(cfg.clinical_csv, cfg.time_column, cfg.event_column, list(cfg.covariates))


def _command(ecfg: EvaluateConfig) -> str:
    """The `evaluate` command that redoes the report: the keys given, not the defaults."""
    keys = ["predictions", "labels_csv", "run_dir", *CLINICAL_KEYS, "output_dir"]
    default = EvaluateConfig()
    args = [
        f"{k}={getattr(ecfg, k)}"
        for k in keys
        if getattr(ecfg, k) not in (None, [], "") and getattr(ecfg, k) != getattr(default, k)
    ]
    return "python -m melanoma_mil evaluate " + " ".join(shlex.quote(a) for a in args)


def write_report(
    cfg: Any, out: Path, predictions: Path, run_dir: str | Path, labels_csv: str | None = None
) -> int:
    """Evaluate ``predictions`` into out/evaluation/ and out/report.html. Returns the exit code:
    0, or 1 after a one-line error: exit 2 means bad input found before any work, and here the
    work is done (the predictions stand; the command to redo the report is shown)."""
    from melanoma_mil.evaluation.evaluate import evaluate, print_notes, summary_line

    ecfg = EvaluateConfig(
        predictions=str(predictions),
        output_dir=str(out / EVALUATION),
        labels_csv=labels_csv,
        run_dir=str(run_dir),
        overwrite=True,  # this command's own predictions were just written
        **{k: getattr(cfg, k) for k in CLINICAL_KEYS},
    )
    try:
        ev = evaluate(ecfg, report=out / REPORT)
    except UserError as e:
        log.error("error: report not written: %s (then: %s)", e, _command(ecfg))
        return 1
    print(f"evaluate: {summary_line(ev)} -> {out / REPORT}")
    print_notes(ev)  # as `evaluate` does: why a number is not estimable
    return 0
