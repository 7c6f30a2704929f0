"""`fit`: patient-level k-fold cross-validation of a MIL model on cached bags.

Under DDP (``trainer.strategy=ddp``) Lightning re-runs this command once per extra device; every
rank computes the same cohort and splits, and only rank 0 writes files.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.utilities import rank_zero_only

from melanoma_mil.config import FitConfig, check, to_yaml
from melanoma_mil.data.bags import BagStore, load_store
from melanoma_mil.data.cohort import Cohort, build_cohort
from melanoma_mil.data.datamodule import BagDataModule
from melanoma_mil.data.splits import Split, resolve_splits
from melanoma_mil.errors import UserError
from melanoma_mil.io import atomic_path, write_json, write_text
from melanoma_mil.metrics import METRICS, bag_metrics, summarise
from melanoma_mil.models import feature_norm
from melanoma_mil.rundir import save_fold_model
from melanoma_mil.stats import bootstrap_auc_ci
from melanoma_mil.tracking.loggers import finish_fold, fold_logger, log_summary
from melanoma_mil.training.module import MILModule
from melanoma_mil.training.selection import plan_selection
from melanoma_mil.viz.roc import plot_roc

log = logging.getLogger(__name__)


def _precision(cfg: FitConfig) -> str:
    """bf16 autocast on GPUs that support it; fp32 on CPU, where MIL heads gain nothing."""
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    gpu = cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true"


def _fold_name(split: Split, repeats: int) -> str:
    return f"fold_{split.fold}" if repeats == 1 else f"repeat_{split.repeat}_fold_{split.fold}"


def _class_weights(dm: BagDataModule, n_classes: int, balance: str) -> list[float] | None:
    if balance != "loss":
        return None
    counts = dm.class_counts(n_classes).clamp_min(1)
    return (counts.sum() / (n_classes * counts)).tolist()


def _run_fold(
    cfg: FitConfig, cohort: Cohort, store: BagStore, split: Split, out: Path, rank0: bool
) -> pd.DataFrame:
    """Train on split.train, select on split.val, predict split.test; return test predictions."""
    name = _fold_name(split, cfg.cv.repeats)
    fold_dir = out / "folds" / name
    if rank0 and fold_dir.exists():
        shutil.rmtree(fold_dir)
    L.seed_everything(cfg.seed + 1000 * split.repeat + split.fold, workers=True, verbose=False)
    labels = dict(zip(cohort.bags["bag_id"], cohort.bags["label"].astype(int), strict=True))
    sel = plan_selection(cfg, split, labels)
    dm = BagDataModule(
        store,
        labels,
        sel.train,
        sel.val,
        split.test,
        cfg.data.max_instances,
        cfg.data.balance,
        cfg.data.num_workers,
    )
    n_classes = len(cohort.classes)
    module = MILModule.create(
        store.dim,
        n_classes,
        cfg.model,
        cfg.optim,
        _class_weights(dm, n_classes, cfg.data.balance),
        cfg.trainer.max_epochs,
    )
    if cfg.data.standardize:
        feature_norm(module.model).fit_stats([store.bags[b] for b in sel.train])
    ckpt, callbacks, selection_kwargs = sel.callbacks(cfg, fold_dir)
    logger = fold_logger(cfg, out, split.fold, split.repeat)
    trainer = L.Trainer(
        max_epochs=cfg.trainer.max_epochs,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        strategy=cfg.trainer.strategy,
        precision=_precision(cfg),
        deterministic=cfg.trainer.deterministic,
        logger=logger or False,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        default_root_dir=str(fold_dir),
        log_every_n_steps=1,
        enable_progress_bar=sys.stderr.isatty(),
        **selection_kwargs,
    )
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, ckpt_path="best", verbose=False)
    assert module.test_output is not None
    index, y, probs = module.test_output
    if rank0:
        save_fold_model(
            fold_dir / "model.pt", module.model, module.model_cfg, store.dim, cohort.classes
        )
    test_bags = cohort.bags.set_index("bag_id").loc[[split.test[i] for i in index]]
    preds = pd.DataFrame(
        {
            "slide_id": test_bags["slide_ids"].to_numpy(),
            "patient_id": test_bags["patient_id"].to_numpy(),
            "fold": split.fold,
            "repeat": split.repeat,
            "label": [cohort.classes[i] for i in y],
            "y": y,
            "pred": [cohort.classes[i] for i in probs.argmax(1)],
        }
    )
    for i, c in enumerate(cohort.classes):
        preds[f"prob_{c}"] = probs[:, i]
    if n_classes == 2:
        preds["prob"] = probs[:, 1]
    metrics = bag_metrics(y, probs)
    roc_png = fold_dir / "roc.png" if rank0 else None
    if roc_png is not None:
        plot_roc(preds, cohort.classes, roc_png, f"{name}: test ROC", f"AUC {metrics['auc']:.3f}")
    finish_fold(logger, metrics, roc_png)
    log.info(
        "%s: test %s (%s)",
        name,
        " ".join(f"{k}={v:.3f}" for k, v in metrics.items()),
        sel.describe(cfg, ckpt),
    )
    return preds


def _summary(
    preds: pd.DataFrame, cohort: Cohort, digest: str, provenance: dict[str, Any], seed: int
) -> dict[str, Any]:
    prob_cols = [f"prob_{c}" for c in cohort.classes]
    per_fold = [
        bag_metrics(g["y"].to_numpy(), g[prob_cols].to_numpy())
        for _, g in preds.groupby(["repeat", "fold"])
    ]
    # pooled out-of-fold: each bag once (its mean over repeats); CI resamples patients
    pooled = preds.groupby("slide_id").agg(
        {"y": "first", "patient_id": "first", **{c: "mean" for c in prob_cols}}
    )
    y, p = pooled["y"].to_numpy(), pooled[prob_cols].to_numpy()
    value, lo, hi = bootstrap_auc_ci(
        y,
        p[:, 1] if p.shape[1] == 2 else p,
        groups=pooled["patient_id"].to_numpy(),
        n_boot=2000,
        seed=seed,
    )
    return {
        **summarise(per_fold),
        "pooled_auc": {
            "value": value,
            "ci_low": lo,
            "ci_high": hi,
            "ci_level": 0.95,
            "bootstrap": 2000,
            "resampled": "patients",
        },
        "classes": cohort.classes,
        "n_bags": int(len(pooled)),
        "n_folds": int(len(per_fold)),
        "splits_sha256": digest,
        "encoder": provenance.get("encoder"),
        "cache_key": provenance.get("cache_key"),
    }


def _table(summary: dict[str, Any]) -> str:
    folds = len(summary["auc"]["per_fold"])
    head = (
        f"{'metric':<18}" + "".join(f"{'f' + str(i):>7}" for i in range(folds)) + "   mean +- std"
    )
    rows = [head, "-" * len(head)]
    for m in METRICS:
        s = summary[m]
        rows.append(
            f"{m:<18}"
            + "".join(f"{v:>7.3f}" for v in s["per_fold"])
            + f"   {s['mean']:.3f} +- {s['std']:.3f}"
        )
    p = summary["pooled_auc"]
    rows.append(
        f"pooled AUC {p['value']:.3f} (95% CI {p['ci_low']:.3f}-{p['ci_high']:.3f}), "
        f"{summary['n_bags']} bags"
    )
    return "\n".join(rows)


def _check_output_dir(cfg: FitConfig, out: Path) -> None:
    if (out / "cv_summary.json").exists() and not cfg.overwrite:
        raise UserError(
            f"'{out}' already holds a finished run; pass overwrite=true to replace it "
            "(its splits.json is kept and reused) or choose another output_dir."
        )


def _provenance(store: BagStore, cohort: Cohort, cfg: FitConfig, digest: str) -> dict[str, Any]:
    prov = dict(store.provenance)
    prov.update(
        features_dir=str(Path(cfg.data.features_dir or "").resolve()),
        splits_sha256=digest,
        classes=cohort.classes,
        feature_dim=store.dim,
    )
    if prov.get("encoder_weights") == "random":
        warnings.warn(
            f"features in {cfg.data.features_dir} come from a randomly initialised "
            "encoder: results say nothing about pretrained representations.",
            stacklevel=2,
        )
    return prov


def run_fit(cfg: FitConfig) -> int:
    """Cross-validate; write config.yaml, splits.json, predictions.csv, cv_summary.json, roc.png."""
    check(cfg)  # configs built in code (demo, sweep runs) skip load_config
    out = Path(cfg.output_dir)
    rank0 = rank_zero_only.rank == 0
    if rank0:
        _check_output_dir(cfg, out)
    else:  # DDP replicas repeat rank 0's work; only rank 0 reports
        logging.getLogger("melanoma_mil").setLevel(logging.WARNING)
    if cfg.trainer.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    cohort = build_cohort(cfg.data)
    dtype = torch.float16 if cfg.data.dtype == "float16" else torch.float32
    store = load_store(cohort.members, dtype)
    splits, digest = resolve_splits(
        cohort.bags, cfg.cv, cfg.cv.seed, cohort.classes, out, write=rank0
    )
    provenance = _provenance(store, cohort, cfg, digest)
    if rank0:
        write_text(out / "config.yaml", to_yaml(cfg))
        write_json(out / "provenance.json", provenance)
    log.info(
        "fit: %d bags (D=%d), %d folds x %d repeats -> %s",
        len(cohort.bags),
        store.dim,
        cfg.cv.folds,
        cfg.cv.repeats,
        out,
    )
    preds = pd.concat(
        [_run_fold(cfg, cohort, store, s, out, rank0) for s in splits], ignore_index=True
    )
    if not rank0:
        return 0
    summary = _summary(preds, cohort, digest, provenance, cfg.seed)
    with atomic_path(out / "predictions.csv") as tmp:
        preds.to_csv(tmp, index=False)
    pooled = summary["pooled_auc"]
    label = f"pooled AUC {pooled['value']:.3f}" if not math.isnan(pooled["value"]) else "pooled"
    plot_roc(preds, cohort.classes, out / "roc.png", f"{out.name}: out-of-fold ROC", label)
    write_json(out / "cv_summary.json", summary)
    log_summary(cfg, out, summary, preds)
    print(_table(summary))
    print(f"outputs in {out}: cv_summary.json, predictions.csv, roc.png, splits.json, folds/")
    return 0
