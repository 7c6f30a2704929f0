"""A run's folds: where each is trained, its completion record, the run's pooled results,
and the plain-torch fold models."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from melanoma_mil.config import ModelConfig
from melanoma_mil.data.splits import Split
from melanoma_mil.errors import UserError
from melanoma_mil.io import atomic_path, locked_writes, sha256_file, write_bytes, write_json
from melanoma_mil.locks import try_lock
from melanoma_mil.models import build_model
from melanoma_mil.outdir import MARKER
from melanoma_mil.rundir.layout import (
    DERIVED,
    DONE,
    FINISH_LOCK,
    FOLDS,
    MADE_ONCE,
    MODEL,
    PREDICTIONS,
    RESULTS,
    ROC,
    SUMMARY,
    aside,
    damaged,
)
from melanoma_mil.rundir.record import run_record

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- folds
def fold_name(fold: int, repeat: int, repeats: int) -> str:
    """folds/<name>: fold_<k>, or repeat_<r>_fold_<k> with repeated CV."""
    return f"fold_{fold}" if repeats == 1 else f"repeat_{repeat}_fold_{fold}"


def fold_names(splits: list[Split]) -> list[str]:
    repeats = len({s.repeat for s in splits})
    return [fold_name(s.fold, s.repeat, repeats) for s in splits]


def partial_dir(run: Path, name: str) -> Path:
    """Where a fold is trained; it becomes folds/<name> in one rename once complete."""
    return run / FOLDS / f".{name}.partial"


def fold_lock(run: Path, name: str) -> Path:
    return run / FOLDS / f".{name}.lock"


def busy_folds(run: Path) -> list[str]:
    """The folds of ``run`` that a live process is training now (it holds their lock)."""
    busy = []
    for path in sorted((run / FOLDS).glob(".*.lock")):
        if path.name == FINISH_LOCK or not path.is_file():
            continue
        lock = try_lock(path)
        if lock is None:
            busy.append(path.name[1 : -len(".lock")])
        else:
            lock.release()
    return busy


def commit_fold(
    run: Path, name: str, partial: Path, preds: pd.DataFrame, record: dict[str, Any]
) -> None:
    """Finish a fold trained in ``partial`` (model.pt, best.ckpt, roc.png already there): its
    test predictions, then the completion record, then one rename to folds/<name>."""
    with atomic_path(partial / PREDICTIONS) as tmp:
        preds.to_csv(tmp, index=False)
    files = {f: sha256_file(partial / f) for f in (MODEL, PREDICTIONS)}
    write_json(partial / DONE, {**record, "name": name, "files": files})
    current = (run_record(run) or {}).get("run_id")
    if current != record["run_id"]:  # `fit overwrite=true` swapped another run in meanwhile
        raise UserError(
            f"'{run}' was replaced by another run while this process trained {name}; its "
            f"{name} is dropped (the new run is kept)."
        )
    final = run / FOLDS / name
    for left in (run / FOLDS).glob(f".{glob.escape(name)}.stale-*"):  # of a commit killed midway
        with contextlib.suppress(OSError):  # a peer's cleanup may have taken it
            _delete(left)
    if os.path.lexists(final):  # a stale or foreign fold, or a link: moved aside, then dropped
        stale = run / FOLDS / f".{name}.stale-{uuid.uuid4().hex[:8]}"
        final.rename(stale)
        _delete(stale)  # a link only: never what it points to
    partial.rename(final)


def fold_problem(run: Path, name: str, run_id: str, fingerprint: str) -> str | None:
    """Why folds/<name> is not a finished fold of this run, or None if it is."""
    folder = run / FOLDS / name
    if not (folder / DONE).is_file():
        return "missing" if not folder.exists() else "unfinished (no done.json)"
    try:
        record = json.loads((folder / DONE).read_text())
    except (OSError, ValueError):
        return f"damaged ({DONE} unreadable)"
    if record.get("run_id") != run_id or record.get("fingerprint") != fingerprint:
        return "made by another run"
    for file, digest in (record.get("files") or {}).items():
        path = folder / file
        if not path.is_file() or sha256_file(path) != digest:
            return f"damaged ({file} differs from its record)"
    return None


def fold_predictions(run: Path, names: list[str]) -> pd.DataFrame:
    """The folds' test predictions in split order, probabilities as float32 (as trained)."""
    frames = []
    for name in names:
        df = pd.read_csv(
            run / FOLDS / name / PREDICTIONS, dtype={"slide_id": str, "patient_id": str}
        )
        probs = [c for c in df.columns if c.startswith("prob")]
        frames.append(df.astype({c: np.float32 for c in probs}))
    return pd.concat(frames, ignore_index=True)


def pooled_predictions(preds: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """One row per bag (slide_id): patient_id, y and prob_<class> averaged over repeats (each
    repeat's prediction is out-of-fold)."""
    cols = [f"prob_{c}" for c in classes]
    agg = {"patient_id": "first", "y": "first", **{c: "mean" for c in cols}}
    return preds.groupby("slide_id", sort=True).agg(agg)


@contextlib.contextmanager
def finishing(run: Path) -> Iterator[None]:
    """Hold the run's finish lock (one process at a time checks and writes its results) and
    first remove what killed writers left at the run's top: temp files of its files (those
    made once by `fsutil.create_once`, which retries a temp removed under it, and the results)
    and entries moved aside to be dropped."""
    with locked_writes(
        run / FOLDS / FINISH_LOCK, *(run / n for n in (MARKER, *MADE_ONCE, *RESULTS))
    ):
        for left in (p for name in DERIVED for p in run.glob(f"{glob.escape(aside(name))}*")):
            _delete(left)
        yield


def write_results(run: Path, preds: pd.DataFrame, summary: dict[str, Any], draw_roc: Any) -> None:
    """predictions.csv, roc.png (``draw_roc(path)``), then cv_summary.json: the run is complete.
    Called in `finishing`. What was made from other predictions (`DERIVED`) goes before the
    new ones appear."""
    with atomic_path(run / PREDICTIONS) as tmp:
        preds.to_csv(tmp, index=False)
        old = run / PREDICTIONS
        if not old.is_file() or sha256_file(old) != sha256_file(tmp):
            _drop_derived(run)
    draw_roc(run / ROC)
    write_json(run / SUMMARY, summary)


def _drop_derived(run: Path) -> None:
    """Delete the run's entries made from its earlier predictions, each renamed aside first so
    that none is seen half deleted."""
    dropped = []
    for name in DERIVED:
        path = run / name
        if path.exists():
            dropped.append(name + ("/" if path.is_dir() else ""))
            moved = path.rename(run / f"{aside(name)}{uuid.uuid4().hex[:8]}")
            _delete(moved)
    if dropped:
        log.warning(
            "fit: '%s': removed %s, made from the predictions the run had before (a `fit` with "
            "clinical_csv=, or `evaluate`, makes them for the new ones)",
            run,
            ", ".join(dropped),
        )


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


# --------------------------------------------------------------------------- fold models
def save_fold_model(
    path: Path, model: nn.Module, cfg: ModelConfig, in_dim: int, classes: list[str]
) -> None:
    """Plain-torch export of a fold's best model (loads without Lightning, weights_only)."""
    blob = {
        "state_dict": model.state_dict(),
        "model": asdict(cfg),
        "in_dim": in_dim,
        "classes": classes,
    }
    save_torch(path, blob)


def save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` to ``path`` atomically. Serialised in memory first: torch's own file
    writer fails on a full disk with a RuntimeError ('unexpected pos ...') that names no file,
    where a plain write raises ENOSPC with its path (one line from the CLI)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def load_fold_model(path: Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a fold model saved by `save_fold_model`, in eval mode."""
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
        model = build_model(ModelConfig(**blob["model"]), blob["in_dim"], len(blob["classes"]))
    except (OSError, RuntimeError, KeyError, TypeError, EOFError, ValueError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise damaged(path, f"is not a readable fold model ({first})") from None
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise UserError(
            f"{path}: fold model does not match this version of melanoma-mil "
            f"({first}); re-run `fit` with overwrite=true to retrain it."
        ) from None
    return model.to(device).eval()
