"""A run's identity (the fit marker and its fingerprint) and the files made once per run:
splits.json, provenance.json, config.yaml."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from melanoma_mil.config import CVConfig, FitConfig
from melanoma_mil.data.splits import Split, splits_hash
from melanoma_mil.errors import OtherRun, UserError
from melanoma_mil.fsutil import create_once
from melanoma_mil.outdir import made_by, read_marker, write_marker
from melanoma_mil.rundir.layout import (
    CONFIG,
    NOT_RESULTS,
    PROVENANCE,
    SPLITS,
    damaged,
    json_bytes,
    read_json,
)


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
    for key, (model, before) in ADDED_LATER.items():
        if flat["model.name"] != model or flat[key] == before:
            del flat[key]
    return {k: v for k, v in flat.items() if k not in NOT_RESULTS and not k.startswith("wandb.")}


# keys added after runs were recorded, read by one model only: left out of a run's settings for
# the other models, and at the value that trains as before the key, so those runs still resume
ADDED_LATER = {"model.topk_warmup": ("topk", 0.0)}


@dataclass(frozen=True)
class Fingerprint:
    """What makes a run's results: config keys, splits, labelled cohort, feature cache.

    Bags without a cache key (CLAM files, h5 of other tools) are identified by their feature
    dim and files instead (`data.store.features_identity`). Those two are left out of the
    digest when None, so runs made with a cache key keep the digest they were recorded with."""

    settings: dict[str, Any]
    splits_sha256: str
    cohort_sha256: str
    cache_key: str | None
    feature_dim: int | None = None
    features_sha256: str | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: v for k, v in data.items() if k not in _WITHOUT_KEY or v is not None}

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


_WITHOUT_KEY = ("feature_dim", "features_sha256")
_IDS = ("splits_sha256", "cohort_sha256", "cache_key", *_WITHOUT_KEY)


def run_record(run: Path) -> dict[str, Any] | None:
    """The fit marker of ``run``; None if it has none; UserError if another command made it."""
    marker = read_marker(run)
    if marker is not None and marker.get("command") != "fit":
        raise UserError(
            f"'{run}' holds output of {made_by(marker)}, not a `fit` run; choose another folder."
        )
    return marker


REPLACE_HINT = "pass overwrite=true to replace it, or choose another output_dir"


def claim_run(run: Path, fp: Fingerprint, hint: str = REPLACE_HINT) -> str:
    """Make ``run`` a run of ``fp`` or join the run already there with the same; its run_id.
    ``hint``: how to go on when the run there has other settings."""
    record = {"command": "fit", "run_id": uuid.uuid4().hex, "fingerprint": fp.digest}
    write_marker(run, {**record, **fp.as_dict()})
    current = run_record(run) or {}
    if current.get("fingerprint") != fp.digest:
        diff = "; ".join(fp.differences(current)[:4])
        raise OtherRun(run, f"made with other settings ({diff})", hint)
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
    doc = read_json(run / SPLITS) if (run / SPLITS).exists() else None
    if doc is not None and not isinstance(doc.get("splits"), list):
        raise damaged(run / SPLITS, "has no split list")
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
        raise damaged(path, f"has a malformed split ({e})") from None


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
    return read_json(Path(run) / PROVENANCE)


def write_run_files(
    run: Path, config_yaml: str, provenance: dict[str, Any], splits_doc: dict[str, Any]
) -> None:
    """config.yaml, provenance.json and splits.json, each made once (concurrent processes of one
    run race safely: the first complete file stays)."""
    create_once(run / SPLITS, json_bytes(splits_doc))
    create_once(run / PROVENANCE, json_bytes(provenance))
    create_once(run / CONFIG, config_yaml.encode())
