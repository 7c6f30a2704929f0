"""The run folder of `fit`: the one module that names, writes and reads its files.

    <run>/.melanoma-mil.json   command fit, run_id, and the fingerprint of what makes results
         config.yaml           the resolved config
         provenance.json       feature provenance, classes, feature_dim, splits_sha256
         splits.json           the splits and what made them (cv keys, cohort hash, source)
         folds/<fold>/         model.pt, best.ckpt, roc.png, predictions.csv, done.json (last)
         predictions.csv, roc.png, cv_summary.json (last)   once every fold is done
         logs/, wandb/         loggers

A run is complete when every split in splits.json has its fold folder, each with a completion
record (done.json) made by this run (same run_id and fingerprint) whose file hashes match, and
cv_summary.json exists. `predict`, `heatmap`, `compare` and `sweep` open runs only through
`load_run`, which refuses anything else and names what is missing. A fold folder appears in
one rename once complete; a replaced run is swapped in only once its successor is complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf
from torch import nn

from melanoma_mil.config import CVConfig, FitConfig, ModelConfig, load_config
from melanoma_mil.data.splits import Split, splits_hash
from melanoma_mil.errors import UserError
from melanoma_mil.fsutil import create_once, recover_dir, replace_dir
from melanoma_mil.io import atomic_path, sha256_file, write_json
from melanoma_mil.models import build_model
from melanoma_mil.outdir import MARKER, made_by, read_marker, write_marker

CONFIG, PROVENANCE, SPLITS = "config.yaml", "provenance.json", "splits.json"
PREDICTIONS, SUMMARY, ROC = "predictions.csv", "cv_summary.json", "roc.png"
FOLDS, LOGS, WANDB = "folds", "logs", "wandb"
MODEL, CHECKPOINT, DONE = "model.pt", "best.ckpt", "done.json"
# config keys that change no result: a run may be resumed or joined with other values
NOT_RESULTS = frozenset(
    {
        "output_dir",
        "experiment",
        "overwrite",
        "logger",
        "cv.run_folds",
        "cv.splits_file",  # the splits themselves are in the fingerprint
        "data.features_dir",  # the cache key and the cohort hash are
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
RERUN = "re-run the same `fit` command to finish it"


# --------------------------------------------------------------------------- identity
def settings(cfg: FitConfig) -> dict[str, Any]:
    """The config keys that make results, flattened (`model.hidden_dim`: 512, ...)."""
    tree = OmegaConf.to_container(OmegaConf.structured(cfg))
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and key != "label_map":
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    assert isinstance(tree, dict)
    walk(tree, "")
    return {k: v for k, v in flat.items() if k not in NOT_RESULTS and not k.startswith("wandb.")}


@dataclass(frozen=True)
class Fingerprint:
    """What makes a run's results: config keys, splits, labelled cohort, feature cache."""

    settings: dict[str, Any]
    splits_sha256: str
    cohort_sha256: str
    cache_key: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()

    def differences(self, recorded: dict[str, Any]) -> list[str]:
        """'model.hidden_dim: 512 in the run, 256 now' for each difference to a run record."""
        old = {**recorded.get("settings", {}), **{k: recorded.get(k) for k in _IDS}}
        new = {**self.settings, **{k: getattr(self, k) for k in _IDS}}
        keys = sorted(set(old) | set(new))
        return [
            f"{k}: {old.get(k)!r} in the run, {new.get(k)!r} now"
            for k in keys
            if old.get(k) != new.get(k)
        ]


_IDS = ("splits_sha256", "cohort_sha256", "cache_key")


def run_record(run: Path) -> dict[str, Any] | None:
    """The fit marker of ``run``; None if it has none; UserError if another command made it."""
    marker = read_marker(run)
    if marker is not None and marker.get("command") != "fit":
        raise UserError(
            f"'{run}' holds output of {made_by(marker)}, not a `fit` run; choose another folder."
        )
    return marker


def claim_run(run: Path, fp: Fingerprint) -> str:
    """Make ``run`` a run of ``fp`` or join the run already there with the same; its run_id."""
    record = {"command": "fit", "run_id": uuid.uuid4().hex, "fingerprint": fp.digest}
    write_marker(run, {**record, **fp.as_dict()})
    current = run_record(run) or {}
    if current.get("fingerprint") != fp.digest:
        diff = "; ".join(fp.differences(current)[:4])
        raise UserError(
            f"'{run}' holds a run made with other settings ({diff}); pass overwrite=true to "
            "replace it or choose another output_dir."
        )
    return str(current["run_id"])


# --------------------------------------------------------------------------- splits.json
def splits_document(
    splits: list[Split], cv: CVConfig, cohort_sha256: str, source: str | None
) -> dict[str, Any]:
    """splits.json: the splits and what made them (cv keys, or the file they came from)."""
    return {
        "sha256": splits_hash(splits),
        "seed": cv.seed,
        "folds": cv.folds,
        "repeats": cv.repeats,
        "val_fraction": cv.val_fraction,
        "source": source,
        "cohort_sha256": cohort_sha256,
        "splits": [asdict(s) for s in splits],
    }


def read_splits_document(run: Path) -> dict[str, Any] | None:
    """A run's splits.json, None if it has none, UserError (naming the fix) if damaged."""
    doc = _read_json(run / SPLITS) if (run / SPLITS).exists() else None
    if doc is not None and not isinstance(doc.get("splits"), list):
        raise _damaged(run / SPLITS, "has no split list")
    return doc


def read_splits_file(path: Path) -> list[Split]:
    """The splits of a splits.json written by `fit` (cv.splits_file)."""
    try:
        return [Split(**s) for s in json.loads(path.read_text())["splits"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a splits file written by `fit` ({e}).") from None


def splits_of(doc: dict[str, Any], path: Path) -> list[Split]:
    """The splits of a splits.json document."""
    try:
        return [Split(**s) for s in doc["splits"]]
    except (KeyError, TypeError) as e:
        raise _damaged(path, f"has a malformed split ({e})") from None


def splits_problems(
    doc: dict[str, Any], cv: CVConfig, cohort_sha256: str, bag_ids: list[str]
) -> list[str]:
    """Why a run's splits.json may not be reused for this config and cohort (empty: it may)."""
    problems = []
    if doc.get("source") is None and cv.splits_file is None:
        for key in ("folds", "seed", "repeats", "val_fraction"):
            if doc.get(key) != getattr(cv, key):
                problems.append(f"cv.{key}: {doc.get(key)!r} in {SPLITS}, {getattr(cv, key)!r} now")
    if doc.get("cohort_sha256") != cohort_sha256:
        split = {b for s in doc.get("splits", []) for k in ("train", "val", "test") for b in s[k]}
        added, gone = sorted(set(bag_ids) - split), sorted(split - set(bag_ids))
        if added:
            problems.append(f"{len(added)} labelled bag(s) in no split ({', '.join(added[:5])})")
        if gone:
            problems.append(f"{len(gone)} split bag(s) no longer labelled ({', '.join(gone[:5])})")
        if not added and not gone:
            problems.append("labels, patients or classes changed since the splits were made")
    return problems


def read_provenance(run: Path) -> dict[str, Any]:
    """A run's provenance.json (feature identity, classes, splits hash)."""
    return _read_json(Path(run) / PROVENANCE)


def write_run_files(
    run: Path, config_yaml: str, provenance: dict[str, Any], splits_doc: dict[str, Any]
) -> None:
    """config.yaml, provenance.json and splits.json, each made once (concurrent processes of one
    run race safely: the first complete file stays)."""
    create_once(run / SPLITS, _json_bytes(splits_doc))
    create_once(run / PROVENANCE, _json_bytes(provenance))
    create_once(run / CONFIG, config_yaml.encode())


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


def commit_fold(
    run: Path, name: str, partial: Path, preds: pd.DataFrame, record: dict[str, Any]
) -> None:
    """Finish a fold trained in ``partial`` (model.pt, best.ckpt, roc.png already there): its
    test predictions, then the completion record, then one rename to folds/<name>."""
    with atomic_path(partial / PREDICTIONS) as tmp:
        preds.to_csv(tmp, index=False)
    files = {f: sha256_file(partial / f) for f in (MODEL, PREDICTIONS)}
    write_json(partial / DONE, {**record, "name": name, "files": files})
    final = run / FOLDS / name
    if final.exists():  # a stale or foreign fold: moved aside, then dropped
        stale = run / FOLDS / f".{name}.stale-{uuid.uuid4().hex[:8]}"
        final.rename(stale)
        shutil.rmtree(stale)
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


def write_results(run: Path, preds: pd.DataFrame, summary: dict[str, Any], draw_roc: Any) -> None:
    """predictions.csv, roc.png (``draw_roc(path)``), then cv_summary.json: the run is complete."""
    with atomic_path(run / PREDICTIONS) as tmp:
        preds.to_csv(tmp, index=False)
    draw_roc(run / ROC)
    write_json(run / SUMMARY, summary)


# --------------------------------------------------------------------------- replacement
def staging(out: Path) -> tuple[Path, Path]:
    """(where a replacement of ``out`` is built, where the replaced run goes before removal)."""
    return out.parent / f".{out.name}.fit-new", out.parent / f".{out.name}.fit-old"


def display_name(run_dir: Path) -> str:
    """The run's name, also while it is built beside the run it replaces."""
    name = Path(run_dir).resolve().name
    return (
        name[1 : -len(".fit-new")] if name.startswith(".") and name.endswith(".fit-new") else name
    )


def recover(out: Path) -> None:
    """Finish (or undo) a replacement a crash interrupted; drop the replaced run's leftover."""
    new, old = staging(out)
    recover_dir(new, out, old, new.exists() and (new / SUMMARY).is_file())
    if old.is_dir() and (read_marker(old) or {}).get("command") == "fit":
        shutil.rmtree(old)


def replace_run(out: Path, new: Path) -> None:
    """Swap the complete run ``new`` in at ``out``; the old run is removed only afterwards."""
    replace_dir(new, out, staging(out)[1])


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
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)


def load_fold_model(path: Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a fold model saved by `save_fold_model`, in eval mode."""
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
        model = build_model(ModelConfig(**blob["model"]), blob["in_dim"], len(blob["classes"]))
    except (OSError, RuntimeError, KeyError, TypeError, EOFError, ValueError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise _damaged(path, f"is not a readable fold model ({first})") from None
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise UserError(
            f"{path}: fold model does not match this version of melanoma-mil "
            f"({first}); re-run `fit` with overwrite=true to retrain it."
        ) from None
    return model.to(device).eval()


# --------------------------------------------------------------------------- reading a run
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
        """cv_summary.json: per-fold metrics, pooled out-of-fold AUC with its CI."""
        return _read_json(self.run_dir / SUMMARY)

    @property
    def roc_path(self) -> Path:
        """The run's ROC figure (each test fold and the pooled curve)."""
        return self.run_dir / ROC

    @cached_property
    def predictions(self) -> pd.DataFrame:
        path = self.run_dir / PREDICTIONS
        try:
            return pd.read_csv(path, dtype={"slide_id": str, "patient_id": str, "label": str})
        except (OSError, ValueError) as e:
            raise _damaged(path, f"is unreadable ({e})") from None


def load_run(run_dir: str | Path) -> TrainedRun:
    """Open a complete, consistent `fit` run; a one-line error naming what is missing or mixed."""
    root = Path(run_dir)
    if not root.is_dir():
        raise UserError(f"run_dir '{root}' not found: pass the output_dir of a `fit` run.")
    record = run_record(root)
    if record is None:
        old = " (made by an older version: re-run `fit` into a new output_dir)"
        raise UserError(
            f"run_dir '{root}' is not a `fit` run (no {MARKER})"
            f"{old if (root / SUMMARY).exists() else ''}."
        )
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
    provenance, config = _read_json(root / PROVENANCE), _read_config(root / CONFIG)
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
        raise UserError(f"run '{root}': {SPLITS} is not the one its folds were trained on; {_FIX}.")
    # keys the record lacks came after the run was made (its config.yaml lacks them too)
    recorded = record.get("settings", {})
    drift = [k for k, v in settings(config).items() if k in recorded and recorded[k] != v]
    if drift:
        raise UserError(
            f"run '{root}': {CONFIG} differs from what its folds were trained with ({drift[:4]}); "
            f"restore it or {_FIX}."
        )
    classes = provenance.get("classes")
    if not isinstance(classes, list) or len(classes) < 2:
        raise _damaged(root / PROVENANCE, "lists no classes")


_FIX = "re-run `fit` with overwrite=true to rebuild the run"


def _damaged(path: Path, why: str) -> UserError:
    return UserError(f"{path} {why}: the run is damaged; {_FIX}.")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _damaged(path, f"is unreadable ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(data, dict):
        raise _damaged(path, "is not a JSON object")
    return data


def _read_config(path: Path) -> FitConfig:
    try:
        return load_config(FitConfig, [str(path)], recorded=True)
    except UserError as e:
        raise _damaged(path, f"is not a valid fit config ({e})") from None


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
