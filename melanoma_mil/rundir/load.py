"""Opening a run: `load_run` returns a `TrainedRun` only for a complete, consistent run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from melanoma_mil.config import FitConfig
from melanoma_mil.errors import UserError
from melanoma_mil.outdir import MARKER, made_by, read_marker
from melanoma_mil.rundir.folds import fold_names, fold_problem, load_fold_model
from melanoma_mil.rundir.layout import (
    CONFIG,
    EVALUATION,
    FIX,
    FOLDS,
    MODEL,
    PREDICTIONS,
    PROVENANCE,
    RERUN,
    ROC,
    SPLITS,
    SUMMARY,
    damaged,
    read_config,
    read_json,
)
from melanoma_mil.rundir.record import read_splits_document, run_record, settings, splits_of


@dataclass
class TrainedRun:
    """A complete, consistent `fit` run (only `load_run` makes one)."""

    run_dir: Path
    config: FitConfig
    classes: list[str]
    provenance: dict[str, Any]
    run_id: str = ""
    folds: list[str] = field(default_factory=list)  # fold names, in split order
    splits_sha256: str = ""

    @property
    def model_paths(self) -> list[Path]:
        return [self.run_dir / FOLDS / name / MODEL for name in self.folds]

    def fold_names(self) -> list[str]:
        return list(self.folds)

    def fold_models(self, device: str | torch.device = "cpu") -> list[nn.Module]:
        return [load_fold_model(p, device) for p in self.model_paths]

    @cached_property
    def summary(self) -> dict[str, Any]:
        """cv_summary.json: per-fold metrics, pooled out-of-fold AUC with its CI; a missing
        number (null, or NaN in a run written before null) is NaN, as it was computed."""
        summary = read_json(self.run_dir / SUMMARY)
        return {k: _missing_as_nan(v) if isinstance(v, dict) else v for k, v in summary.items()}

    @property
    def roc_path(self) -> Path:
        """The run's ROC figure (each test fold and the pooled curve)."""
        return self.run_dir / ROC

    def threshold_note(self, threshold: float) -> str | None:
        """A warning when the run's own report (`fit clinical_csv=`) predicted the positive class
        from another probability than ``threshold``: an external cohort scored with another
        rule than the internal report would be compared on two different rules."""
        try:
            report = read_json(self.run_dir / EVALUATION / "evaluation.json")
            used = float(report["classification"]["threshold"])
        except (UserError, KeyError, TypeError, ValueError):  # no report, or a multi-class one
            return None
        if used == threshold:
            return None
        return (
            f"run '{self.run_dir}' reported its own predictions with threshold={used:g}; these "
            f"use threshold={threshold:g}: pass threshold={used:g} to apply the same rule"
        )

    @cached_property
    def predictions(self) -> pd.DataFrame:
        path = self.run_dir / PREDICTIONS
        try:
            return pd.read_csv(path, dtype={"slide_id": str, "patient_id": str, "label": str})
        except (OSError, ValueError) as e:
            raise damaged(path, f"is unreadable ({e})") from None


_NUMBERS = ("mean", "std", "value", "ci_low", "ci_high")


def _missing_as_nan(entry: dict[str, Any]) -> dict[str, Any]:
    """A metric's or the pooled AUC's numbers with null as NaN: an AUC of a test fold with
    one class is undefined, and every reader (fit's table, compare, report) handles NaN."""
    out = {k: math.nan if k in _NUMBERS and v is None else v for k, v in entry.items()}
    if isinstance(out.get("per_fold"), list):
        out["per_fold"] = [math.nan if v is None else v for v in out["per_fold"]]
    return out


_PASS_RUN = f"pass the output_dir of a `fit` run instead (the folder holding {SUMMARY})"


def load_run(run_dir: str | Path) -> TrainedRun:
    """Open a complete, consistent `fit` run; a one-line error naming what is missing or mixed."""
    root = Path(run_dir)
    if not root.is_dir():
        found = "is a file" if root.exists() else "not found"
        raise UserError(f"run_dir '{root}' {found}: {_PASS_RUN}.")
    marker = read_marker(root)
    if marker is not None and marker.get("command") != "fit":  # e.g. extract's or tile's folder
        raise UserError(f"run_dir '{root}' holds output of {made_by(marker)}: {_PASS_RUN}.")
    record = run_record(root)
    if record is None:
        fix = _PASS_RUN  # a feature or tile folder, an empty one...
        if (root / SUMMARY).exists():
            fix = "it was made by an older version: re-run `fit` into a new output_dir"
        raise UserError(f"run_dir '{root}' is not a `fit` run (no {MARKER}): {fix}.")
    doc = read_splits_document(root)
    if doc is None:
        raise UserError(f"run '{root}' is incomplete: no {SPLITS}; {RERUN}.")
    names = fold_names(splits_of(doc, root / SPLITS))
    problems = _fold_problems(root, record, names)
    if problems:
        raise UserError(f"run '{root}' is incomplete or mixed: {'; '.join(problems[:6])}.")
    missing = [n for n in (CONFIG, PROVENANCE, PREDICTIONS, SUMMARY) if not (root / n).is_file()]
    if missing:
        raise UserError(f"run '{root}' is incomplete: no {missing}; {RERUN}.")
    provenance, config = read_json(root / PROVENANCE), read_config(root / CONFIG)
    _check_consistent(root, record, doc, provenance, config)
    classes = [str(c) for c in provenance["classes"]]
    return TrainedRun(
        root, config, classes, provenance, str(record["run_id"]), names, doc["sha256"]
    )


def _fold_problems(root: Path, record: dict[str, Any], names: list[str]) -> list[str]:
    """Each fold of splits.json that is not finished by this run, and stray fold folders."""
    run_id, digest = record.get("run_id", ""), record.get("fingerprint", "")
    problems = [
        f"{name} {why} ({RERUN})"
        for name in names
        if (why := fold_problem(root, name, run_id, digest))
    ]
    folders = (root / FOLDS).iterdir() if (root / FOLDS).is_dir() else []
    stray = sorted(p.name for p in folders if not p.name.startswith(".") and p.name not in names)
    return problems + [f"{FOLDS}/{name} is not in {SPLITS} (delete it)" for name in stray]


def _check_consistent(
    root: Path,
    record: dict[str, Any],
    doc: dict[str, Any],
    provenance: dict[str, Any],
    config: FitConfig,
) -> None:
    """splits.json, provenance.json and config.yaml are the ones the folds were trained with."""
    digest = doc.get("sha256")
    if digest != record.get("splits_sha256") or provenance.get("splits_sha256") != digest:
        raise UserError(f"run '{root}': {SPLITS} is not the one its folds were trained on; {FIX}.")
    # keys the record lacks came after the run was made (its config.yaml lacks them too)
    recorded = record.get("settings", {})
    drift = [k for k, v in settings(config).items() if k in recorded and recorded[k] != v]
    if drift:
        raise UserError(
            f"run '{root}': {CONFIG} differs from what its folds were trained with ({drift[:4]}); "
            f"restore it or {FIX}."
        )
    classes = provenance.get("classes")
    if not isinstance(classes, list) or len(classes) < 2:
        raise damaged(root / PROVENANCE, "lists no classes")
