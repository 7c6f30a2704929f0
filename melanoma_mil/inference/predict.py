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
import stat
import time
from pathlib import Path
from typing import Any

import pandas as pd

from melanoma_mil.config import PredictConfig
from melanoma_mil.data.cohort import read_patients
from melanoma_mil.errors import UserError
from melanoma_mil.evaluation.hooks import check_inputs, write_report
from melanoma_mil.ids import id_path
from melanoma_mil.inference.analyse import (
    ATTENTION_FILE,
    FAILED,
    FILE_COLUMNS,
    SHOWN,
    analyse_all,
    check_common,
    claim_for_run,
    made_for,
    print_failures,
    remove_unwritten,
)
from melanoma_mil.inference.ensemble import Ensemble
from melanoma_mil.inference.heatmap import drawn_alike, drawn_files
from melanoma_mil.inference.inputs import PATIENTS, SlideInput, prepare_inputs
from melanoma_mil.inference.tables import write_tables
from melanoma_mil.io import temp_target, write_json
from melanoma_mil.outdir import MARKER, read_marker, refuse_folders_at
from melanoma_mil.rundir import EVALUATION, REPORT, TrainedRun
from melanoma_mil.tracking.loggers import log_slides
from melanoma_mil.workshare import STOP_FIX, says_disk_full

log = logging.getLogger(__name__)

MADE = "evaluation_files"  # key of predict's marker: the evaluation files its report wrote
PENDING = "evaluation_pending"  # and when a report began that was not recorded (ns, epoch)
UNFINISHED = "unfinished"  # and that a call began and has not finished (full disk, killed)
SECOND = 1_000_000_000


def _stamp(path: Path) -> list[int] | None:
    """Size, mtime and inode of a regular file (atomic rewrites make a new inode); None for
    anything else (a symlink, dangling or not, a folder, an entry that cannot be read)."""
    try:
        st = path.lstat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino] if stat.S_ISREG(st.st_mode) else None


def _same_content(recorded: Any, now: list[int] | None) -> bool:
    """``now`` is the file stamped ``recorded``, or a copy of it (`cp -a`, rsync, a restored
    backup keep size and mtime, to the second, but not the inode)."""
    if now is None or not isinstance(recorded, list) or len(recorded) < 2:
        return False
    return recorded[0] == now[0] and abs(recorded[1] - now[1]) < SECOND


def recorded_evaluation(out: Path) -> dict[str, Any]:
    """Predict's record of its report in ``out``'s marker: ``evaluation_files`` (the files it
    wrote, see `record_evaluation`) and ``evaluation_pending`` (when a report began that has not
    been recorded). Read before the folder is claimed, which rewrites the marker for another
    run; `keep_evaluation` puts it back."""
    marker = read_marker(out) or {}
    made = marker.get(MADE)
    record: dict[str, Any] = {MADE: made if isinstance(made, dict) else {}}
    if isinstance(marker.get(PENDING), int):
        record[PENDING] = marker[PENDING]
    return record


def keep_evaluation(out: Path, record: dict[str, Any]) -> None:
    """Put ``record`` (`recorded_evaluation`) back in the marker `claim_for_run` just wrote: a
    folder redone for another run keeps knowing which evaluation files are predict's."""
    marker = read_marker(out) or {}
    kept = record.get(MADE) or PENDING in record
    if kept and any(marker.get(k) != record.get(k) for k in (MADE, PENDING)):
        write_json(out / MARKER, {**marker, **record})


def _begin_report(out: Path) -> None:
    """Note in the marker that a report begins: what a report interrupted before
    `record_evaluation` (kill, power loss) leaves in the evaluation is still predict's."""
    marker = read_marker(out) or {}
    begun = marker.get(PENDING)
    now = time.time_ns() - SECOND  # file times come from a coarser clock than time_ns
    marker[PENDING] = min(begun, now) if isinstance(begun, int) else now
    write_json(out / MARKER, marker)


def record_evaluation(out: Path) -> None:
    """Note in predict's marker each evaluation file its report just wrote, so that overwrite
    deletes them only while unchanged: `evaluate` run into <output_dir>/evaluation (the
    external-validation recipe) rewrites them, and they are then the user's, never removed."""
    from melanoma_mil.evaluation.evaluate import OUTPUTS as EVALUATION_OUTPUTS

    folder = out / EVALUATION
    stamps = {n: _stamp(folder / n) for n in EVALUATION_OUTPUTS}
    made = {n: s for n, s in stamps.items() if s is not None}
    marker = {k: v for k, v in (read_marker(out) or {}).items() if k != PENDING}
    write_json(out / MARKER, {**marker, MADE: made})


def check_evaluation(out: Path, record: dict[str, Any]) -> None:
    """Refuse, before any work, an <output_dir>/evaluation holding a file predict's report did
    not write (``record``, see `recorded_evaluation`), or changed since: the report would
    replace, e.g., an `evaluate` the user ran there, and overwrite=true asks to replace
    predict's own outputs, not a user's. Files of a report begun but not recorded (interrupted)
    and leftovers of interrupted writes are predict's; copies of its files too (size and mtime
    are compared, not the inode)."""
    from melanoma_mil.evaluation.evaluate import OUTPUTS as EVALUATION_OUTPUTS

    folder = out / EVALUATION
    made, begun = record.get(MADE) or {}, record.get(PENDING)
    try:
        found = sorted(folder.iterdir()) if folder.is_dir() else []
    except OSError as e:
        raise UserError(
            f"cannot read '{folder}' ({e.strerror or e}), where this call's report goes; fix its "
            "permissions or choose another output_dir."
        ) from None
    for path in found:
        if path.name == MARKER or temp_target(path.name) in (*EVALUATION_OUTPUTS, MARKER):
            continue  # the marker, or a leftover of an interrupted write (`io.atomic_path`)
        now = _stamp(path)
        if _same_content(made.get(path.name), now):
            continue
        pending = isinstance(begun, int) and path.name in EVALUATION_OUTPUTS
        if pending and now is not None and now[1] >= begun:  # since an unrecorded report began
            continue
        kind = "" if now is not None else " (not a readable regular file)"
        raise UserError(
            f"'{path}'{kind} was not written by predict (an `evaluate` run into {folder}, or "
            "changed since), and this call's report would replace it; move that folder "
            "elsewhere or choose another output_dir."
        )


def unfinished(out: Path, run: TrainedRun) -> bool:
    """Whether the last call of predict for ``run`` in ``out`` stopped short (a full disk, a
    kill): its predictions.csv is then no finished result, and a plain re-run resumes it."""
    marker = read_marker(out) or {}
    return marker.get("run_id") == run.run_id and marker.get(UNFINISHED) is True


def mark_unfinished(out: Path, flag: bool) -> None:
    """Note in the marker that a call began (``flag``) or finished (see `unfinished`)."""
    marker = {k: v for k, v in (read_marker(out) or {}).items() if k != UNFINISHED}
    write_json(out / MARKER, {**marker, UNFINISHED: True} if flag else marker)


def drawn_before(
    out: Path, run: TrainedRun, cfg: PredictConfig, inputs: list[SlideInput]
) -> dict[str, dict[str, str]]:
    """slide_id -> drawn files (table columns) of the slides an unfinished call already drew for
    this run with these drawing settings (`drawn_files`): a resumed call scores them again
    (their rows stay whole) but does not redraw them."""
    drawn = drawn_files(out, run, cfg)
    kept: dict[str, dict[str, str]] = {}
    for inp in inputs:
        attention = id_path(out, inp.slide_id) / ATTENTION_FILE
        if (
            inp.features is not None
            and not inp.no_drawing
            and made_for(attention, run)
            and drawn_alike(attention, cfg)
            and (files := drawn(inp.slide_id, inp.slide_path)) is not None
        ):
            kept[inp.slide_id] = files
    return kept


def analyse_resumed(
    inputs: list[SlideInput], ensemble: Ensemble, cfg: PredictConfig, kept: dict[str, Any]
) -> tuple[pd.DataFrame, str]:
    """`analyse_all`, but the slides in ``kept`` (`drawn_before`) are scored, not redrawn, and
    their rows name the files drawn before."""
    table, stop = analyse_all(
        [i for i in inputs if i.slide_id not in kept], ensemble, cfg, cfg.heatmaps, "predict"
    )
    if not kept:
        return table, stop
    again, _ = analyse_all(
        [i for i in inputs if i.slide_id in kept], ensemble, cfg, False, "predict (drawn before)"
    )
    ok = again["status"] == "ok"
    for column in FILE_COLUMNS:
        if files := {s: f[column] for s, f in kept.items() if column in f}:
            again.loc[ok, column] = again.loc[ok, "slide_id"].map(files)
    return pd.concat([t for t in (table, again) if not t.empty], ignore_index=True), stop


def print_undrawn(table: pd.DataFrame, target: Path) -> None:
    """Name the slides scored but not drawn (bags without tile geometry) when the command
    ends: they are ok, so `print_failures` does not list them."""
    undrawn = table.loc[(table["status"] == "ok") & table["reason"].fillna("").ne(""), "slide_id"]
    if undrawn.empty:
        return
    more = f" and {len(undrawn) - SHOWN} more" if len(undrawn) > SHOWN else ""
    n = len(undrawn)
    print(
        f"predict: {n} slide{'s' if n != 1 else ''} scored without a heatmap, "
        f"{'their bags hold' if n != 1 else 'its bag holds'} no tile "
        f"geometry (reasons in {target}): {', '.join(undrawn.iloc[:SHOWN])}{more}; drop "
        f"features_dir to tile and extract {'them' if n != 1 else 'it'} for heatmaps."
    )


def remove_stale(
    out: Path, cfg: PredictConfig, table: pd.DataFrame, record: dict[str, Any], marked: bool
) -> None:
    """With overwrite, delete this command's own outputs in ``out`` that this call did not
    rewrite (slides not redone, patient / report files not asked for), so the folder never
    mixes the previous call's results with this call's. Only predict's file names are touched,
    and of the evaluation only files its report wrote (``record``, `recorded_evaluation`) and
    nobody changed since: the very file (inode too), never a copy or a replacement. Slide
    folders of slides not in ``table`` only when ``out`` was ``marked`` before this call."""
    from melanoma_mil.evaluation.evaluate import OUTPUTS as EVALUATION_OUTPUTS

    made = record.get(MADE) or {}
    if not cfg.patients_csv:
        (out / PATIENTS).unlink(missing_ok=True)
    if not (cfg.clinical_csv or cfg.labels_csv):
        (out / REPORT).unlink(missing_ok=True)
        for name in EVALUATION_OUTPUTS:
            path = out / EVALUATION / name
            now = _stamp(path)
            if now is not None and made.get(name) == now:
                path.unlink()
    remove_unwritten(out, table, every=marked)  # unmarked: no earlier call's slides are known


def _report(cfg: PredictConfig, out: Path, scored: Path, run: TrainedRun) -> int:
    """Evaluate ``scored`` into out/evaluation/ and out/report.html (`write_report`'s exit
    code), recording the files written as predict's own (also after a failed report: what it
    wrote is predict's). The report is noted as begun first, so that one interrupted before it
    is recorded stays predict's."""
    _begin_report(out)
    rc = write_report(cfg, out, scored, run.run_dir, cfg.labels_csv)
    record_evaluation(out)
    return rc


def _print_summary(table: pd.DataFrame, ensemble: Ensemble, target: Path) -> None:
    """The slides scored, the fold models, the predicted classes; failed and undrawn slides."""
    ok = table[table["status"].isin(["ok", "no_heatmap"])]
    counts = ok["pred"].value_counts().to_dict() if len(ok) else {}
    print(
        f"predict: {len(ok)}/{len(table)} slides, {len(ensemble.models)} fold models on "
        f"{ensemble.device}, predicted {counts} -> {target}"
    )
    print_failures(table, target, "predict")
    print_undrawn(table, target)


def run_predict(cfg: PredictConfig) -> int:
    """Predict every slide; 0 if none failed, else 1 (after finishing the others)."""
    from melanoma_mil.features.hardware import resolve_device

    out = Path(cfg.output_dir)
    target = out / "predictions.csv"
    run = check_common(cfg)
    # slides' folders: checked by `inputs.prepare_inputs` once its slides are known
    outputs = (target.name, PATIENTS, REPORT, f"{EVALUATION}/*")
    refuse_folders_at(out, "predict", (target.name, PATIENTS, REPORT))  # a user's folder
    claim_for_run(cfg, run, "predict", outputs, write=False)
    # an unfinished call's predictions.csv (a full disk, a kill) is resumed by a plain re-run
    resume = not cfg.overwrite and unfinished(out, run)
    if target.exists() and not cfg.overwrite and not resume:
        raise UserError(f"'{target}' exists; pass overwrite=true or choose another output_dir.")
    check_inputs(cfg, run)
    report = bool(cfg.clinical_csv or cfg.labels_csv)
    # with a report, the note is printed under its numbers (whose accuracy it qualifies)
    if not report and (note := run.threshold_note(cfg.threshold)):
        log.warning("%s", note)
    made = recorded_evaluation(out)  # before claim_for_run rewrites the marker for another run
    marked = read_marker(out) is not None
    if report:
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
    keep_evaluation(out, made)
    mark_unfinished(out, True)
    ensemble = Ensemble(run, resolve_device(cfg.device), cfg.threshold)
    kept = drawn_before(out, run, cfg, inputs) if resume and cfg.heatmaps else {}
    table, stop = analyse_resumed(inputs, ensemble, cfg, kept)
    tables = write_tables(target, table, patient_of, cfg.patients_csv, inputs, ensemble)
    table = tables[target]
    if cfg.overwrite:
        remove_stale(out, cfg, table, made, marked)
    elif resume:  # the unfinished call's partial drawings of the slides redone now
        remove_unwritten(out, table, every=False)
    if patient_of is not None:
        print(f"predict: {len(tables[out / PATIENTS])} patients -> {out / PATIENTS}")
    log_slides(run.config, run.run_dir, table, out, "predict")
    _print_summary(table, ensemble, target)
    if stop:  # every slide is scored: only the drawing stopped
        log.error("predict stopped drawing heatmaps: %s; %s", stop, STOP_FIX)
    rc = 1 if table["status"].isin(FAILED).any() else 0
    if report:  # patient bags are scored as the run was trained
        pooled = patient_of is not None and run.config.data.bag_level == "patient"
        rc = max(rc, _report(cfg, out, out / PATIENTS if pooled else target, run))
    # a slide tile, extract or the drawing could not write for a full disk: a re-run finishes it
    if not stop and not table["reason"].fillna("").astype(str).map(says_disk_full).any():
        mark_unfinished(out, False)
    return rc
