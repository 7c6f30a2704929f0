"""The run folder of `fit`: the one package that names, writes and reads its files.

    <run>/.melanoma-mil.json   command fit, run_id, and the fingerprint of what makes results
         config.yaml           the resolved config
         provenance.json       feature provenance, classes, feature_dim, splits_sha256
         splits.json           the splits and what made them (cv keys, cohort hash, source)
         folds/<fold>/         model.pt, best.ckpt, roc.png, predictions.csv, done.json (last)
         predictions.csv, roc.png, cv_summary.json (last)   once every fold is done
         logs/, wandb/         loggers
         evaluation/, report.html   the report of `evaluate`, with clinical_csv; removed
                                    when predictions.csv is remade with other predictions

These entries, each whole, are the run's (`run_owns`); anything else in the folder is the user's
(notes, other commands' outputs in folders of their own): `fit overwrite=true` carries it over.

A run is complete when every split in splits.json has its fold folder, each with a completion
record (done.json) made by this run (same run_id and fingerprint) whose file hashes match, and
cv_summary.json exists. `predict`, `heatmap`, `compare` and `sweep` open runs only through
`load_run`, which refuses anything else and names what is missing. A fold folder appears in
one rename once complete; a replaced run is swapped in only once its successor is complete.

Modules: `layout` (file names, damaged-file errors), `record` (identity, splits.json and the
files made once), `folds` (fold folders, results, fold models), `replace` (the swap of a
replaced run), `load` (`load_run`).
"""

from melanoma_mil.rundir.folds import (
    busy_folds,
    commit_fold,
    finishing,
    fold_lock,
    fold_name,
    fold_names,
    fold_predictions,
    fold_problem,
    load_fold_model,
    partial_dir,
    pooled_predictions,
    save_fold_model,
    write_results,
)
from melanoma_mil.rundir.layout import (
    CHECKPOINT,
    CONFIG,
    DONE,
    EVALUATION,
    FOLDS,
    LOGS,
    MODEL,
    NOT_RESULTS,
    PREDICTIONS,
    PROVENANCE,
    REPLACE_LOCK,
    REPORT,
    RERUN,
    ROC,
    SPLITS,
    SUMMARY,
    WANDB,
    run_owns,
)
from melanoma_mil.rundir.load import (
    TrainedRun,
    load_run,
)
from melanoma_mil.rundir.record import (
    Fingerprint,
    claim_run,
    read_provenance,
    read_splits_document,
    read_splits_file,
    run_record,
    settings,
    splits_document,
    splits_of,
    splits_problems,
    write_run_files,
)
from melanoma_mil.rundir.replace import display_name, recover, replace_run, run_path, staging

__all__ = [
    "busy_folds",
    "CHECKPOINT",
    "CONFIG",
    "DONE",
    "EVALUATION",
    "FOLDS",
    "Fingerprint",
    "LOGS",
    "MODEL",
    "NOT_RESULTS",
    "PREDICTIONS",
    "PROVENANCE",
    "REPLACE_LOCK",
    "REPORT",
    "RERUN",
    "ROC",
    "SPLITS",
    "SUMMARY",
    "TrainedRun",
    "WANDB",
    "claim_run",
    "commit_fold",
    "display_name",
    "fold_lock",
    "fold_name",
    "fold_names",
    "fold_predictions",
    "finishing",
    "fold_problem",
    "load_fold_model",
    "load_run",
    "partial_dir",
    "pooled_predictions",
    "read_provenance",
    "read_splits_document",
    "read_splits_file",
    "recover",
    "replace_run",
    "run_owns",
    "run_path",
    "run_record",
    "save_fold_model",
    "settings",
    "splits_document",
    "splits_of",
    "splits_problems",
    "staging",
    "write_results",
    "write_run_files",
]
