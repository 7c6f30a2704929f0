"""The run folder's file names, the keys that change no result, and how a damaged file is
reported (one line naming the file and the fix)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from melanoma_mil.config import FitConfig, load_config
from melanoma_mil.errors import UserError
from melanoma_mil.io import json_file_text
from melanoma_mil.outdir import MARKER

CONFIG, PROVENANCE, SPLITS = "config.yaml", "provenance.json", "splits.json"
PREDICTIONS, SUMMARY, ROC = "predictions.csv", "cv_summary.json", "roc.png"
FOLDS, LOGS, WANDB = "folds", "logs", "wandb"
MODEL, CHECKPOINT, DONE = "model.pt", "best.ckpt", "done.json"
EVALUATION, REPORT = "evaluation", "report.html"  # fit's report with clinical_csv
REPLACE_LOCK = ".replace.lock"  # held by the process building a replacement run
FINISH_LOCK = ".finish.lock"  # in folds/: held by the process checking and writing the results
MADE_ONCE = (SPLITS, PROVENANCE, CONFIG)  # by the first process of the run (`create_once`)
RESULTS = (PREDICTIONS, ROC, SUMMARY)  # by the process that finds every fold done
# the run's own entries, each whole: `fit overwrite=true` replaces them and carries over the rest
RUN_ENTRIES = frozenset(
    {MARKER, CONFIG, PROVENANCE, SPLITS, FOLDS, PREDICTIONS, ROC, SUMMARY, LOGS, WANDB}
    | {EVALUATION, REPORT, REPLACE_LOCK}
)
# run entries that `fit` writes through another command, which may write them itself
WRITTEN_FOR_RUN = {(EVALUATION,): "evaluate"}
# run entries made from predictions.csv (by `evaluate`): dropped when the predictions change,
# or they would describe predictions the run no longer has
DERIVED = (EVALUATION, REPORT)
# config keys that change no result: a run may be resumed or joined with other values
NOT_RESULTS = frozenset(
    {
        "output_dir",
        "experiment",
        "overwrite",
        "logger",
        "cv.run_folds",
        "cv.splits_file",  # the splits themselves are in the fingerprint
        "data.features_dir",  # the cache key (else feature dim and files) and cohort hash are
        "data.labels_csv",
        "data.label_column",
        "data.on_missing",
        "data.num_workers",
        "data.store_dir",  # where the bag store lives, not what it holds
        "data.memory_gb",
        # the report of `evaluate` at the end of fit, not the folds' results
        "clinical_csv",
        "time_column",
        "event_column",
        "covariates",
        "groups",
        "threshold",
    }
)


def run_owns(name: str) -> bool:
    """Whether the top-level entry ``name`` of a run folder is the run's (an entry, the temp
    file of one's interrupted write, or one moved aside to be dropped), not the user's."""
    temp = name.endswith(".tmp") and any(name.startswith(f".{own}.") for own in RUN_ENTRIES)
    return name in RUN_ENTRIES or temp or any(name.startswith(aside(own)) for own in DERIVED)


def aside(name: str) -> str:
    """The prefix of the name an entry ``name`` is renamed to before it is deleted, so that it
    disappears at once (a kill midway leaves it under this name, for the next finisher)."""
    return f".{name}.stale-"


RERUN = "re-run the same `fit` command to finish it"

FIX = "re-run `fit` with overwrite=true to rebuild the run"


def damaged(path: Path, why: str) -> UserError:
    return UserError(f"{path} {why}: the run is damaged; {FIX}.")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise damaged(path, f"is unreadable ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(data, dict):
        raise damaged(path, "is not a JSON object")
    return data


def read_config(path: Path) -> FitConfig:
    try:
        return load_config(FitConfig, [str(path)], recorded=True)
    except UserError as e:
        raise damaged(path, f"is not a valid fit config ({e})") from None


def json_bytes(obj: Any) -> bytes:
    return json_file_text(obj).encode()
