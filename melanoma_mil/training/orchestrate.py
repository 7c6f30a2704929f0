"""Where a `fit` writes and which folds it trains: resume, fold-parallel processes, replacement.

- A run folder holds one run. A re-run with the same results-relevant settings resumes it (its
  finished folds are kept, the others trained); other settings are refused, and overwrite=true
  replaces the run.
- ``cv.run_folds`` picks splits by index. Processes sharing a run folder each lock the folds
  they train (an advisory lock the kernel drops when its process dies, even by SIGKILL), and
  whichever finds every fold finished writes predictions.csv, roc.png and cv_summary.json.
- overwrite=true builds the new run beside the old one (``.<name>.fit-new``) and swaps it in
  only once complete: a crash leaves the old complete run plus a hidden leftover. It replaces
  the run's own files only: what the user added to the folder is carried over (`rundir.replace`).
- DDP replicas that Lightning launches follow rank 0's plan (passed in the environment); ranks
  started by torchrun or SLURM receive it over the process group (`ranks`). Only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from melanoma_mil import rundir
from melanoma_mil.config import FitConfig, to_yaml
from melanoma_mil.data.cohort import Cohort
from melanoma_mil.data.splits import (
    Split,
    check_covers,
    check_splits,
    cohort_sha256,
    make_splits,
    read_clam_splits,
)
from melanoma_mil.errors import OtherRun, UserError
from melanoma_mil.io import check_writable
from melanoma_mil.locks import Lock, try_lock
from melanoma_mil.outdir import (
    is_empty,
    made_by,
    output_folder,
    read_marker,
    refuse_linked,
    refuse_unwritable,
)

log = logging.getLogger(__name__)

PLAN_ENV = "MELANOMA_MIL_FIT_PLAN"  # rank 0's target and folds, for the replicas it launches


@dataclass
class Plan:
    """Where this process writes and which splits (by index) it trains."""

    out: Path  # the run's folder
    target: Path  # out, or the folder its replacement is built in
    splits: list[Split]
    splits_doc: dict[str, Any]
    fingerprint: rundir.Fingerprint
    resumable: bool  # the target holds this very run (same fingerprint)
    run_id: str = ""
    todo: list[int] = field(default_factory=list)
    finished: int = 0  # folds found finished when planned (resuming)
    locks: dict[str, Lock] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return rundir.fold_names(self.splits)

    @property
    def replacing(self) -> bool:
        return self.target != self.out

    def unfinished(self) -> list[str]:
        digest = self.fingerprint.digest
        return [n for n in self.names if rundir.fold_problem(self.target, n, self.run_id, digest)]

    def release(self, name: str) -> None:
        lock = self.locks.pop(name, None)
        if lock is not None:
            lock.release()

    def release_all(self) -> None:
        for name in list(self.locks):
            self.release(name)


def replace_hint(cfg: FitConfig) -> str:
    """How to go on from a run made otherwise: fold processes cannot replace a run."""
    if cfg.cv.run_folds:
        return (
            "remove that run (or choose another output_dir) and start the fold processes again; "
            "cv.run_folds never replaces a run"
        )
    return rundir.record.REPLACE_HINT


def _written(cfg: FitConfig) -> list[str]:
    """The run's folders this `fit` writes into (a linked one would take its writes away)."""
    logger = {"csv": [rundir.LOGS], "wandb": [rundir.WANDB]}.get(cfg.logger, [])
    return [rundir.FOLDS, *logger, *([rundir.EVALUATION] if cfg.clinical_csv else [])]


def _target(out: Path, cfg: FitConfig) -> tuple[Path, dict[str, Any] | None]:
    """(the folder to write, the run record found there); refuses folders fit did not make."""
    output_folder(out, "fit")
    if not cfg.overwrite:  # a replacement is built in a folder of its own
        refuse_linked(out, "fit", _written(cfg))
    record = rundir.run_record(out) if out.is_dir() else None
    if record is None and not is_empty(out):
        marker = read_marker(out)
        what = made_by(marker) if marker else "someone else (it is not a `fit` run)"
        if marker is None and (out / rundir.SUMMARY).exists():
            what = "an older version of melanoma-mil (no run record)"
        raise UserError(
            f"output_dir '{out}' is not empty and was made by {what}; choose another "
            "output_dir (fit never deletes a folder it did not make)."
        )
    if cfg.overwrite and record is not None:
        new = rundir.staging(out)[0]
        # built beside the run: else refused after the bag store is built, on a hidden name;
        # locked there (a run folder mounted on its own may sit in a folder without locks)
        name = f"output_dir '{out}' is replaced by a new run built beside it: its folder"
        check_writable(new.parent, name=name, locks=True)
        _check_deletable(out)
        return new, rundir.run_record(new) if new.is_dir() else None
    return out, record


def _check_deletable(out: Path) -> None:
    """Refuse, before any work, a run to replace whose own entries (folds/, logs/, ...) hold a
    folder that cannot be written: they are deleted once the new run is swapped in, and that
    failed after the whole new run was trained."""
    for entry in out.iterdir():
        if not rundir.run_owns(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        name = f"output_dir '{out}' is replaced by a new run, and the old run's files deleted:"
        for folder, _, _ in os.walk(entry):  # not into links: a link is deleted, not emptied
            check_writable(folder, name=f"{name} its folder")


def _splits(
    cfg: FitConfig, cohort: Cohort, target: Path, record: dict[str, Any] | None
) -> tuple[list[Split], dict[str, Any]]:
    """cv.splits_file, else the splits of the run being resumed, else new ones (nothing written).

    A run's splits.json is reused only if the same cv keys made it from the same labelled
    cohort; otherwise the run is refused (or, when building a replacement, new splits made)."""
    cohort_sha = cohort_sha256(cohort.bags, cohort.classes)
    if cfg.cv.splits_file:
        source = Path(cfg.cv.splits_file)
        if not source.exists():
            raise UserError(f"cv.splits_file '{source}' not found.")
        clam = source.is_dir() or source.suffix == ".csv"
        splits = read_clam_splits(source) if clam else rundir.read_splits_file(source)
        check_splits(splits, cohort.bags, str(source))
        check_covers(splits, cohort.bags, str(source))
        return splits, rundir.splits_document(splits, cfg.cv, cohort_sha, str(source))
    doc = rundir.read_splits_document(target) if record is not None else None
    if doc is not None:
        problems = rundir.splits_problems(doc, cfg.cv, cohort_sha, list(cohort.bags["bag_id"]))
        if not problems:
            splits = rundir.splits_of(doc, target / rundir.SPLITS)
            check_splits(splits, cohort.bags, str(target / rundir.SPLITS))
            log.info("splits: reusing %s (%d splits)", target / rundir.SPLITS, len(splits))
            return splits, doc
        if target == Path(cfg.output_dir):
            what = f"whose {rundir.SPLITS} was made otherwise ({'; '.join(problems)})"
            raise OtherRun(target, what, replace_hint(cfg))
    splits = make_splits(cohort.bags, cfg.cv, cfg.cv.seed, cohort.classes)
    return splits, rundir.splits_document(splits, cfg.cv, cohort_sha, None)


def plan_fit(cfg: FitConfig, cohort: Cohort, features: dict[str, Any], rank0: bool) -> Plan:
    """Decide target, splits and the folds to train; refuse a mismatching run. Writes nothing.

    ``features``: the feature identity fields of `rundir.Fingerprint` (cache_key, ...)."""
    out = Path(cfg.output_dir)
    target, record = _target(out, cfg)
    splits, doc = _splits(cfg, cohort, target, record)
    fp = rundir.Fingerprint(rundir.settings(cfg), doc["sha256"], doc["cohort_sha256"], **features)
    same = record is not None and record.get("fingerprint") == fp.digest
    if record is not None and not same and target == out:
        what = f"made with other settings ({'; '.join(fp.differences(record)[:4])})"
        raise OtherRun(out, what, replace_hint(cfg))
    requested = list(dict.fromkeys(cfg.cv.run_folds)) or list(range(len(splits)))
    if max(requested) >= len(splits):
        raise UserError(
            f"cv.run_folds={list(cfg.cv.run_folds)}: this run has {len(splits)} splits "
            f"(indices 0-{len(splits) - 1}, repeat-major)."
        )
    plan = Plan(
        out, target, splits, doc, fp, same, str(record["run_id"]) if same and record else ""
    )
    replayed = None if rank0 else os.environ.get(PLAN_ENV)
    if replayed:  # a DDP replica: exactly rank 0's folds
        data = json.loads(replayed)
        plan.target, plan.todo = Path(data["target"]), list(data["todo"])
    else:
        todo = set(plan.unfinished()) if same else set(plan.names)
        plan.todo = [i for i in requested if plan.names[i] in todo]
        plan.finished = len(plan.names) - len(todo)  # not the folds left to other processes
    if plan.todo and target == out:  # else built anew; a finished run's folders are only read
        refuse_unwritable([out / name for name in _written(cfg)], "fit")
    return plan


def cleanup(out: Path, overwrite: bool) -> None:
    """Rank 0, first: finish a swap a crash interrupted; without overwrite, drop an idle
    leftover of a crashed `fit overwrite=true`, or swap it in if it was complete (its results
    written, the crash came before the swap: the replacement the user asked for)."""
    rundir.recover(out)
    new = rundir.staging(out)[0]
    for dropped in new.parent.glob(f"{glob.escape(new.name)}.drop-*"):  # a killed _discard's
        shutil.rmtree(dropped, ignore_errors=True)
    if overwrite or not new.is_dir():
        return
    lock = try_lock(new / rundir.REPLACE_LOCK)
    if lock is None:
        return  # a replacement being built right now
    try:  # decided and done under the lock: processes starting together act once
        made = rundir.run_record(new) is not None
        if made and (new / rundir.SUMMARY).is_file():
            if not out.exists():  # the run it replaces was removed since: it is the run now
                new.rename(rundir.run_path(out))
                (out / rundir.REPLACE_LOCK).unlink(missing_ok=True)
            elif not _swap_when_idle(out, new):
                return
            log.warning("fit: '%s': finished its replacement by a complete run that a crash "
                        "left in '%s'", out, new)  # fmt: skip
        elif made or is_empty(new):
            done = [p.parent.name for p in (new / rundir.FOLDS).glob(f"*/{rundir.DONE}")]
            if done:
                log.warning(
                    "fit: removed the unfinished replacement of '%s' (finished: %s) that a "
                    "crashed `fit overwrite=true` left in '%s'",
                    out,
                    ", ".join(sorted(done)),
                    new,
                )
            _discard(new)
    finally:
        lock.release()


def _discard(folder: Path) -> None:
    """Delete a leftover replacement: renamed away first, so no other process finds it half
    deleted (or deletes it twice)."""
    gone = folder.with_name(f"{folder.name}.drop-{os.getpid()}")
    try:
        folder.rename(gone)
    except FileNotFoundError:
        return
    shutil.rmtree(gone, ignore_errors=True)


def _swap_when_idle(out: Path, new: Path) -> bool:
    """Swap the complete replacement ``new`` in, unless a process still trains a fold of the
    run in ``out`` (it would write that fold into the new run): then it waits in ``new`` for
    the next `fit`."""
    busy = rundir.busy_folds(out)
    if busy:
        log.warning(
            "fit: the replacement of '%s' is complete in '%s', but %s of the run there is still "
            "being trained by another process; the next `fit` with these settings swaps it in",
            out,
            new,
            ", ".join(busy),
        )
        return False
    rundir.replace_run(out, new)
    return True


def _take_staging(plan: Plan) -> None:
    """Lock the replacement folder; a leftover made with other settings is started over."""
    new = plan.target
    busy = rundir.busy_folds(plan.out)
    if busy:
        raise UserError(
            f"'{plan.out}': {', '.join(busy)} of its run is being trained by another process "
            "right now; replace the run once that process has ended."
        )
    busy_msg = f"another `fit overwrite=true` is replacing '{plan.out}' right now."
    if new.is_dir():
        lock = try_lock(new / rundir.REPLACE_LOCK)
        if lock is None:
            raise UserError(busy_msg)
        if plan.resumable:
            plan.locks[rundir.REPLACE_LOCK] = lock
            return
        try:
            if rundir.run_record(new) is None and not is_empty(new):
                raise UserError(f"'{new}' is in the way of replacing '{plan.out}'; move it away.")
            _discard(new)
        finally:
            lock.release()
    new.mkdir(parents=True, exist_ok=True)
    lock = try_lock(new / rundir.REPLACE_LOCK)
    if lock is None:  # another replacement took the folder meanwhile
        raise UserError(busy_msg)
    plan.locks[rundir.REPLACE_LOCK] = lock


def start_fit(plan: Plan, cfg: FitConfig, provenance: dict[str, Any]) -> None:
    """Rank 0: claim the target, write the run files once, lock the folds this process trains."""
    if plan.replacing:
        _take_staging(plan)
    plan.run_id = rundir.claim_run(plan.target, plan.fingerprint, replace_hint(cfg))
    saved = dataclasses.replace(  # the run as one command: no fold subset, nothing to replace
        cfg, overwrite=False, cv=dataclasses.replace(cfg.cv, run_folds=[])
    )
    rundir.write_run_files(plan.target, to_yaml(saved), provenance, plan.splits_doc)
    if plan.finished:
        what = f"the replacement of {plan.out}" if plan.replacing else str(plan.out)
        log.info("fit: resuming %s (%d fold(s) already finished)", what, plan.finished)
    todo = []
    for i in plan.todo:
        name = plan.names[i]
        lock = try_lock(rundir.fold_lock(plan.target, name))
        if lock is None:
            log.info("%s: being trained by another process; left to it", name)
            continue
        if not rundir.fold_problem(plan.target, name, plan.run_id, plan.fingerprint.digest):
            lock.release()  # finished meanwhile by another process
            continue
        plan.locks[name] = lock
        shutil.rmtree(rundir.partial_dir(plan.target, name), ignore_errors=True)  # a killed try
        shutil.rmtree(plan.target / rundir.LOGS / name, ignore_errors=True)
        todo.append(i)
    plan.todo = todo
    if todo:  # the results are remade once these folds are done
        (plan.target / rundir.SUMMARY).unlink(missing_ok=True)
    os.environ[PLAN_ENV] = json.dumps({"target": str(plan.target), "todo": todo})


def finish(
    plan: Plan, write: Callable[[Path], dict[str, Any]]
) -> tuple[dict[str, Any], bool] | None:
    """Once every fold is finished: (the run's summary, whether this process wrote the results
    with ``write(folder)``); a replacement is then swapped in. None while folds are missing, or
    while a process still trains a fold of the run a replacement is to replace."""
    missing = plan.unfinished()
    if missing:
        log.warning(
            "fit: %d fold(s) not finished (%s): processes training them, or a later `fit` with "
            "the same settings, finish the run",
            len(missing),
            ", ".join(missing[:8]),
        )
        return None
    target = plan.target
    with rundir.finishing(target):
        wrote = not (target / rundir.SUMMARY).is_file()
        summary = write(target) if wrote else rundir.load_run(target).summary
    for lock_file in (target / rundir.FOLDS).glob(".*.lock"):
        lock_file.unlink(missing_ok=True)
    if plan.replacing and not _swap_when_idle(plan.out, target):
        return None
    plan.release_all()
    return summary, wrote
