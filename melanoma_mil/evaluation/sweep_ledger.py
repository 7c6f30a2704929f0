"""A sweep's ledger (`sweep.json`), shared by every `sweep` process in one output_dir (e.g. the
tasks of a SLURM array): each takes the next run no other process holds, under the ledger's
short lock, and records it there, merged with the others' entries (read, changed, replaced
whole), so that no process loses another's run.

A run being trained is a ledger entry in state ``running`` whose lock (``.sweep-runs/<name>.lock``,
an advisory lock the kernel drops when its process dies, even by SIGKILL) its process holds: an
entry whose lock is free was left by a process that died, and the next process takes it over.
Runs are taken and suggested under the ledger's lock, so processes agree on run names, and a
random or bayes sweep's ``--count N`` is N runs in all however many processes draw them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from melanoma_mil.errors import UserError
from melanoma_mil.io import json_text, locked_writes, write_json
from melanoma_mil.locks import Lock, try_lock
from melanoma_mil.outdir import read_marker
from melanoma_mil.rundir import load_run
from melanoma_mil.tracking.loggers import summary_metrics

log = logging.getLogger(__name__)
LEDGER = "sweep.json"
LEDGER_LOCK = ".sweep.json.lock"  # held only to read and write the ledger
RUN_LOCKS = ".sweep-runs"  # <name>.lock: held by the process training that run
# a running entry's: the run_id of the fit run its folder held when overwrite=true drew it
REPLACING = "replacing"

# Keys that shape no local run and no ranking (`program`/`command` are for `wandb agent`).
_LABELS_ONLY = ("name", "description", "project", "entity", "program", "command")


def _runs_shaping(spec: Any) -> Any:
    """The sweep file as it decides runs and ranking: a reworded name or description still
    resumes the same sweep."""
    if not isinstance(spec, dict):
        return spec
    return {k: v for k, v in spec.items() if k not in _LABELS_ONLY}


def read_ledger(
    path: Path, spec: dict[str, Any], fixed: dict[str, Any], overwrite: bool
) -> list[dict[str, Any]]:
    """Runs of an earlier or concurrent sweep into the same folder. The file's runs and metric
    must be the same (its name, description or agent command may change), and the fixed
    settings too once a run has finished or is running (while none has, changing them may fix
    them)."""
    if not path.is_file() or overwrite:
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("runs", []), list):
        raise UserError(
            f"{path} is not a sweep ledger (unreadable or damaged): use another output_dir, or "
            "overwrite=true to start the sweep anew."
        )
    if _runs_shaping(data.get("sweep")) != _runs_shaping(spec):
        raise UserError(
            f"{path} belongs to a different sweep: use another output_dir or overwrite=true."
        )
    runs = list(data.get("runs", []))
    recorded = data.get("fixed")
    binding = any(e.get("state") in ("finished", "running") for e in runs)
    if binding and recorded is None:  # a ledger from before fixed settings were recorded
        log.warning("%s does not record its fixed settings: resuming with these.", path)
    elif binding and recorded != fixed:
        keys = sorted(k for k in recorded.keys() | fixed.keys() if recorded.get(k) != fixed.get(k))
        diff = ", ".join(f"{k}={recorded.get(k)!r} (now {fixed.get(k)!r})" for k in keys[:5])
        raise UserError(
            f"{path} was run with other fixed settings: {diff}{' ...' if len(keys) > 5 else ''}; "
            "pass those to resume it, or use another output_dir, or overwrite=true to start anew."
        )
    return runs


def _same_metrics(now: dict[str, float], recorded: dict[str, float]) -> bool:
    """The run's metrics are those recorded: as strict JSON, as sweep.json holds them (a NaN
    metric is null there), on the keys recorded (a ledger of an older version may lack some)."""
    now_text = json_text({k: now.get(k) for k in recorded}, sort_keys=True)
    return now_text == json_text(recorded, sort_keys=True)


def recheck_finished(out: Path, entries: list[dict[str, Any]]) -> None:
    """A run the ledger calls finished whose folder is gone, no longer complete (deleted to be
    redone) or holds other results (a `fit overwrite=true` of yours into it) is run again, as a
    failed one is: else its stale metrics would be ranked beside the comparison of what the
    folder holds, or the comparison would fail after every other fit."""
    for entry in entries:
        if entry.get("state") != "finished":
            continue
        try:
            run = load_run(out / entry["name"])
            problem = None
            if run.splits_sha256 != entry.get("splits_sha256"):
                problem = "refitted on other splits"
            elif not _same_metrics(summary_metrics(run.summary), entry.get("metrics") or {}):
                problem = "refitted: its results are not those recorded in the ledger"
        except UserError as e:
            problem = str(e).rstrip(".")
        if problem:
            log.warning(
                "sweep run %s is no longer finished (%s): it runs again", entry["name"], problem
            )
            entry.update(state="failed", error=problem)
            entry.pop("metrics", None)
            entry.pop("session", None)  # retried by the processes sweeping now


@dataclass
class Ledger:
    """``sweep.json`` of one sweep, read and written under its lock by any of its processes."""

    path: Path
    spec: dict[str, Any]
    fixed: dict[str, Any]
    sweep_file: str

    @contextlib.contextmanager
    def held(self, anew: bool = False) -> Iterator[list[dict[str, Any]]]:
        """The runs recorded (none if ``anew``), under the ledger's lock; what the block
        changes is written back whole (a temp file renamed over it) before the lock is freed;
        the temp file of a writer killed before its rename is removed then."""
        with locked_writes(self.path.parent / LEDGER_LOCK, self.path):
            entries = read_ledger(self.path, self.spec, self.fixed, anew)
            before = copy.deepcopy(entries)
            yield entries
            if anew or json_text(entries) != json_text(before):
                ledger = {"sweep": self.spec, "sweep_file": self.sweep_file,
                          "fixed": self.fixed, "runs": entries}  # fmt: skip
                write_json(self.path, ledger)


def run_lock(out: Path, name: str) -> Path:
    return out / RUN_LOCKS / f"{name}.lock"


def take_unfinished(
    out: Path, entries: list[dict[str, Any]], session: str
) -> tuple[int, Lock] | None:
    """A recorded run to train now, locked: one whose process died while training it (its lock
    is free), or one that failed in an earlier session (`sweep._join`): retried once by the
    processes sweeping now, or by an array job's tasks, however far apart they start, and
    whatever their hosts' clocks say. With the ledger's lock held."""
    for i, entry in enumerate(entries):
        state = entry.get("state")
        if state == "finished" or (state == "failed" and entry.get("session") == session):
            continue
        lock = try_lock(run_lock(out, entry["name"]))
        if lock is None:  # a live process trains it
            continue
        if state == "running":
            log.warning("sweep run %s: the process training it is gone; taken over", entry["name"])
        return i, lock
    return None


def _fit_run_id(folder: Path) -> str | None:
    marker = read_marker(folder)
    return str(marker.get("run_id")) if marker and marker.get("command") == "fit" else None


def note_replaced(out: Path, entry: dict[str, Any]) -> None:
    """A run drawn now with overwrite=true: note the fit run its folder holds (an earlier
    sweep's), which this start replaces, for `takeover_overwrites`."""
    if held := _fit_run_id(out / entry["name"]):
        entry[REPLACING] = held


def takeover_overwrites(out: Path, entry: dict[str, Any], overwrite: bool) -> bool:
    """fit's overwrite for a recorded run taken up again: only while its folder still holds the
    run its first start was replacing (fit overwrite=true then resumes the replacement built
    beside it). Else the folder holds this sweep's own run, whose finished folds fit resumes:
    overwrite=true would train it all again."""
    replacing = entry.get(REPLACING)
    return overwrite and replacing is not None and _fit_run_id(out / entry["name"]) == replacing


def orphaned(out: Path, entries: list[dict[str, Any]]) -> bool:
    """Whether a run recorded as running has lost its process (its lock is free): one killed
    after this process last looked for work. With the ledger's lock held, as `_record` unlinks
    a run's lock under it."""
    for entry in entries:
        if entry.get("state") == "running":
            lock = try_lock(run_lock(out, entry["name"]))
            if lock is not None:
                lock.release()
                return True
    return False


def paired_splits(
    out: Path, splits_file: str | None, entries: list[dict[str, Any]]
) -> dict[str, str | None]:
    """The splits every run uses: cv.splits_file, else the first finished run's (None while no
    run has finished: fit's folds then depend only on the cohort and cv.seed)."""
    done = [e for e in entries if e.get("state") == "finished"]
    first = str(out / done[0]["name"] / "splits.json") if done else None
    return {"file": splits_file or first, "sha256": done[0]["splits_sha256"] if done else None}


def unpaired(entry: dict[str, Any], entries: list[dict[str, Any]]) -> str | None:
    """Why a run just finished is not paired with the runs finished before it (a run trained
    beside the first, on folds of a cohort its swept keys changed), or None."""
    done = [e for e in entries if e.get("state") == "finished" and e["name"] != entry["name"]]
    if not done or entry.get("state") != "finished":
        return None
    theirs, ours = done[0]["splits_sha256"], entry["splits_sha256"]
    if theirs == ours:
        return None
    return (
        f"it used splits {str(ours)[:12]}, not the sweep's {str(theirs)[:12]} (made beside "
        "the first run): runs would not be paired; delete this run's folder and re-run this "
        "sweep (the run then uses the first run's splits)"
    )
