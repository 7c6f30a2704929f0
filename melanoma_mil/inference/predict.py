"""`predict`: a trained run's fold-model ensemble on new slides.

Slides are tiled and encoded exactly as the run recorded (or read from a matching feature
cache); the ensemble probability is the mean over fold models. predictions.csv holds, per slide:
slide_id, prob (binary: the positive = last class) and prob_<class>, pred, one prob_<fold> per
fold model (prob_<fold>_<class> for several classes), n_tiles, status and reason (of an ok
slide: why it has no heatmap, when its bag holds no tile geometry). With
patients_csv, predictions.csv also holds each slide's patient_id, and patient_predictions.csv
scores each patient's scored slides pooled into one bag, in the CSV's row order, as `fit`
builds bags with data.bag_level=patient.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from melanoma_mil.config import PredictConfig
from melanoma_mil.data.bags import read_bag
from melanoma_mil.data.cohort import read_patients
from melanoma_mil.errors import UserError
from melanoma_mil.evaluation.hooks import check_inputs, write_report
from melanoma_mil.inference.analyse import (
    ATTENTION_FILE,
    FAILED,
    FILE_COLUMNS,
    SHOWN,
    analyse_all,
    check_common,
    claim_for_run,
    ensemble_columns,
    print_failures,
    remove_unwritten,
)
from melanoma_mil.inference.ensemble import Ensemble
from melanoma_mil.inference.inputs import SlideInput, prepare_inputs
from melanoma_mil.io import atomic_path, write_json
from melanoma_mil.outdir import MARKER, read_marker
from melanoma_mil.rundir import EVALUATION, REPORT, TrainedRun
from melanoma_mil.tracking.loggers import log_slides

log = logging.getLogger(__name__)

META = ["n_tiles", "status", "reason"]
PATIENTS = "patient_predictions.csv"
MADE = "evaluation_files"  # key of predict's marker: the evaluation files its report wrote


def _ordered(table: pd.DataFrame) -> pd.DataFrame:
    """slide_id and prediction columns first, file paths and bookkeeping last."""
    files = [c for c in FILE_COLUMNS if c in table]
    front = [c for c in table.columns if c not in {"slide_id", *META, *files}]
    return table[["slide_id", *front, *META, *files]].sort_values("slide_id")


def patient_table(
    patient_of: dict[str, str], slides: pd.DataFrame, inputs: list[SlideInput], ensemble: Ensemble
) -> pd.DataFrame:
    """One row per patient: the ensemble on all tiles of the patient's successfully scored
    slides (slides that failed are listed in left_out, not pooled), with predictions.csv's
    probability columns. Slides are pooled in the patients CSV's row order, as `fit` pools them
    (order-sensitive models, e.g. TransMIL, score another order differently)."""
    paths = {i.slide_id: i.features for i in inputs if i.features is not None}
    row_of = {s: i for i, s in enumerate(patient_of)}
    scored = set(slides.loc[slides["status"].isin(["ok", "no_heatmap"]), "slide_id"]) & set(paths)
    rows: list[dict[str, Any]] = []
    ids = slides["slide_id"].map(lambda s: patient_of.get(s, s))  # unlisted: its own patient
    for patient, group in slides.groupby(ids, sort=True):
        members = sorted(group["slide_id"], key=lambda s: row_of.get(s, -1))
        usable = [s for s in members if s in scored]
        row: dict[str, Any] = {
            "patient_id": patient,
            "slide_ids": ";".join(usable),
            "n_slides": len(usable),
            "left_out": ";".join(sorted(set(group["slide_id"]) - set(usable))),
        }
        if usable:
            feats = np.concatenate([read_bag(paths[s])[0] for s in usable])
            probs, _ = ensemble(feats)
            row.update(ensemble_columns(probs, ensemble.fold_names, ensemble.classes))
            row.update(n_tiles=len(feats), status="ok")
        else:
            row.update(n_tiles=0, status="failed")
        rows.append(row)
    table = pd.DataFrame(rows)
    front = [c for c in table.columns if c not in {"left_out", "n_tiles", "status"}]
    return table[[*front, "n_tiles", "status", "left_out"]]


def _stamp(path: Path) -> list[int]:
    """Size, mtime and inode: any rewrite (atomic ones make a new inode) changes it."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def recorded_evaluation(out: Path) -> dict[str, Any]:
    """The evaluation files predict's report wrote in ``out`` (see `record_evaluation`); read
    before the folder is claimed, which rewrites the marker for another run."""
    made = (read_marker(out) or {}).get(MADE)
    return made if isinstance(made, dict) else {}


def record_evaluation(out: Path) -> None:
    """Note in predict's marker each evaluation file its report just wrote, so that overwrite
    deletes them only while unchanged: `evaluate` run into <output_dir>/evaluation (the
    external-validation recipe) rewrites them, and they are then the user's, never removed."""
    from melanoma_mil.evaluation.evaluate import OUTPUTS as EVALUATION_OUTPUTS

    folder = out / EVALUATION
    made = {n: _stamp(folder / n) for n in EVALUATION_OUTPUTS if (folder / n).is_file()}
    write_json(out / MARKER, {**(read_marker(out) or {}), MADE: made})


def check_evaluation(out: Path, made: dict[str, Any]) -> None:
    """Refuse, before any work, an <output_dir>/evaluation holding a file predict's report did
    not write (``made``), or changed since: the report would replace, e.g., an `evaluate` the
    user ran there, and overwrite=true asks to replace predict's own outputs, not a user's."""
    folder = out / EVALUATION
    found = sorted(folder.iterdir()) if folder.is_dir() else []
    for path in found:
        if path.name != MARKER and made.get(path.name) != _stamp(path):
            raise UserError(
                f"'{path}' was not written by predict (an `evaluate` run into {folder}, or "
                "changed since), and this call's report would replace it; move that folder "
                "elsewhere or choose another output_dir."
            )


def print_undrawn(table: pd.DataFrame, target: Path) -> None:
    """Name the slides scored but not drawn (bags without tile geometry) when the command
    ends: they are ok, so `print_failures` does not list them."""
    undrawn = table.loc[(table["status"] == "ok") & table["reason"].fillna("").ne(""), "slide_id"]
    if undrawn.empty:
        return
    more = f" and {len(undrawn) - SHOWN} more" if len(undrawn) > SHOWN else ""
    print(
        f"predict: {len(undrawn)} slides scored without a heatmap, their bags hold no tile "
        f"geometry (reasons in {target}): {', '.join(undrawn.iloc[:SHOWN])}{more}; drop "
        "features_dir to tile and extract them for heatmaps."
    )


def remove_stale(out: Path, cfg: PredictConfig, table: pd.DataFrame, made: dict[str, Any]) -> None:
    """With overwrite, delete this command's own outputs in ``out`` that this call did not
    rewrite (slides not redone, patient / report files not asked for), so the folder never
    mixes the previous call's results with this call's. Only predict's file names are touched,
    and of the evaluation only files its report wrote (``made``) and nobody changed since."""
    from melanoma_mil.evaluation.evaluate import OUTPUTS as EVALUATION_OUTPUTS

    if not cfg.patients_csv:
        (out / PATIENTS).unlink(missing_ok=True)
    if not (cfg.clinical_csv or cfg.labels_csv):
        (out / REPORT).unlink(missing_ok=True)
        for name in EVALUATION_OUTPUTS:
            path = out / EVALUATION / name
            if path.is_file() and made.get(name) == _stamp(path):
                path.unlink()
    remove_unwritten(out, table, every=True)


def _report(cfg: PredictConfig, out: Path, scored: Path, run: TrainedRun) -> int:
    """Evaluate ``scored`` into out/evaluation/ and out/report.html (`write_report`'s exit
    code), recording the files written as predict's own."""
    rc = write_report(cfg, out, scored, run.run_dir, cfg.labels_csv)
    if rc == 0:
        record_evaluation(out)
    return rc


def run_predict(cfg: PredictConfig) -> int:
    """Predict every slide; 0 if none failed, else 1 (after finishing the others)."""
    from melanoma_mil.features.run import resolve_device

    out = Path(cfg.output_dir)
    target = out / "predictions.csv"
    run = check_common(cfg)
    outputs = (target.name, PATIENTS, f"*/{ATTENTION_FILE}", REPORT, f"{EVALUATION}/*")
    claim_for_run(cfg, run, "predict", outputs, write=False)
    if target.exists() and not cfg.overwrite:
        raise UserError(f"'{target}' exists; pass overwrite=true or choose another output_dir.")
    check_inputs(cfg)
    made = recorded_evaluation(out)
    if cfg.clinical_csv or cfg.labels_csv:
        check_evaluation(out, made)
    if run.config.data.bag_level == "patient" and not cfg.patients_csv:
        log.warning(
            "this run was trained on patient bags (data.bag_level=patient) but slides are scored "
            "one by one; pass patients_csv=CSV (slide_id, patient_id) to score patients as trained"
        )
    patient_of = read_patients(cfg.patients_csv) if cfg.patients_csv else None
    # new slides are not the run's: its tissue masks (named by training slide ids) do not apply
    inputs, _ = prepare_inputs(run, cfg, own_masks=False)
    if not inputs:
        raise UserError("no slides to predict: check slides_dir / manifest / slide_ids.")
    claim_for_run(cfg, run, "predict", outputs, write=True)
    ensemble = Ensemble(run, resolve_device(cfg.device))
    table = _ordered(analyse_all(inputs, ensemble, cfg, render=cfg.heatmaps, desc="predict"))
    if patient_of is not None:  # lets `evaluate` group the slides by patient
        table.insert(1, "patient_id", table["slide_id"].map(lambda s: patient_of.get(s, s)))
    with atomic_path(target) as tmp:
        table.to_csv(tmp, index=False)
    if cfg.overwrite:
        remove_stale(out, cfg, table, made)
    if patient_of is not None:
        patients = patient_table(patient_of, table, inputs, ensemble)
        with atomic_path(out / PATIENTS) as tmp:
            patients.to_csv(tmp, index=False)
        print(f"predict: {len(patients)} patients -> {out / PATIENTS}")
    log_slides(run.config, run.run_dir, table, out, "predict")
    ok = table[table["status"].isin(["ok", "no_heatmap"])]
    counts = ok["pred"].value_counts().to_dict() if len(ok) else {}
    print(
        f"predict: {len(ok)}/{len(table)} slides, {len(ensemble.models)} fold models, "
        f"predicted {counts} -> {target}"
    )
    print_failures(table, target, "predict")
    print_undrawn(table, target)
    rc = 1 if table["status"].isin(FAILED).any() else 0
    if cfg.clinical_csv or cfg.labels_csv:  # patient bags are scored as the run was trained
        pooled = patient_of is not None and run.config.data.bag_level == "patient"
        rc = max(rc, _report(cfg, out, out / PATIENTS if pooled else target, run))
    return rc
