"""`fit`: patient-level k-fold cross-validation of a MIL model on cached bags.

The run folder (what is written where, when a run is complete) belongs to `rundir`; resuming,
fold-parallel processes and replacing a run to `orchestrate`. Under DDP
(``trainer.strategy=ddp``) every rank computes the same cohort, trains rank 0's splits and folds,
and only rank 0 writes files.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from melanoma_mil import rundir
from melanoma_mil.config import FitConfig, check
from melanoma_mil.data.bags import read_attrs
from melanoma_mil.data.cohort import Cohort, build_cohort, is_number
from melanoma_mil.data.datamodule import BagDataModule
from melanoma_mil.data.splits import Split
from melanoma_mil.data.store import BagStore, features_identity, open_store
from melanoma_mil.evaluation.hooks import check_inputs, write_report
from melanoma_mil.features.identity import plain
from melanoma_mil.metrics import bag_metrics, predicted
from melanoma_mil.models import fit_feature_stats
from melanoma_mil.tracking.loggers import (
    abort_fold,
    check_logger,
    finish_fold,
    fold_logger,
    log_summary,
    note_finished,
)
from melanoma_mil.training.checkpoint_io import own_checkpoint_io
from melanoma_mil.training.checks import check_parallel
from melanoma_mil.training.epochs import EpochLines
from melanoma_mil.training.module import MILModule
from melanoma_mil.training.orchestrate import (
    PLAN_ENV,
    Plan,
    cleanup,
    finish,
    plan_fit,
    start_fit,
)
from melanoma_mil.training.ranks import external_ranks, rank0_plan
from melanoma_mil.training.results import results_writer, table
from melanoma_mil.training.selection import (
    FoldSelection,
    RunSelection,
    plan_selection,
    run_selection,
)
from melanoma_mil.viz.roc import auc_label, plot_roc

log = logging.getLogger(__name__)


def _precision(cfg: FitConfig) -> str:
    """bf16 autocast on GPUs that support it; fp32 on CPU, where MIL heads gain nothing."""
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    gpu = cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true"


def _class_weights(dm: BagDataModule, n_classes: int, balance: str) -> list[float] | None:
    if balance != "loss":
        return None
    counts = dm.class_counts(n_classes).clamp_min(1)
    return (counts.sum() / (n_classes * counts)).tolist()


def _trainer(
    cfg: FitConfig, fold_dir: Path, logger: Logger | None, sel: FoldSelection, name: str
) -> tuple[L.Trainer, ModelCheckpoint]:
    """One fold's Trainer and the checkpoint callback whose "best" weights are tested; its
    progress is Lightning's bar on a terminal, else a line every few seconds (`EpochLines`).

    trainer.accumulate_grad_batches counts bags per optimizer step over all devices: DDP adds
    one bag per device to each step, so each device accumulates its share."""
    ckpt, callbacks, selection_kwargs = sel.callbacks(cfg, fold_dir)
    bar = sys.stderr.isatty()
    callbacks = callbacks if bar else [*callbacks, EpochLines(name)]
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    trainer = L.Trainer(
        max_epochs=sel.epochs,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy,
        precision=_precision(cfg),
        deterministic=cfg.trainer.deterministic,
        logger=logger or False,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches // world,
        default_root_dir=str(fold_dir),
        log_every_n_steps=1,
        enable_progress_bar=bar,
        **selection_kwargs,
    )
    own_checkpoint_io(trainer.strategy)
    return trainer, ckpt


def _labels(cohort: Cohort) -> dict[str, int]:
    """bag_id -> class index."""
    return dict(zip(cohort.bags["bag_id"], cohort.bags["label"].astype(int), strict=True))


def _run_fold(
    cfg: FitConfig,
    cohort: Cohort,
    store: BagStore,
    split: Split,
    name: str,
    fold_dir: Path,
    run_dir: Path,
    chosen: RunSelection,
    rank0: bool,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Train on split.train, select on split.val, predict split.test into ``fold_dir`` (model.pt,
    best.ckpt, roc.png); return the test predictions and metrics."""
    seed = cfg.seed + 1000 * split.repeat + split.fold
    L.seed_everything(seed, workers=True, verbose=False)
    labels = _labels(cohort)
    sel = plan_selection(chosen, cfg, split)
    dm = BagDataModule(
        store,
        labels,
        sel.train,
        sel.val,
        split.test,
        cfg.data.max_instances,
        cfg.data.balance,
        cfg.data.num_workers,
        seed,
        cfg.trainer.accumulate_grad_batches,
    )
    module = _fold_module(cfg, len(cohort.classes), store, dm, sel, seed)
    logger = fold_logger(cfg, run_dir, split.fold, split.repeat)
    trainer, ckpt = _trainer(cfg, fold_dir, logger, sel, name)
    try:
        trainer.fit(module, datamodule=dm)
        trainer.test(module, datamodule=dm, ckpt_path="best", verbose=False)
    except SystemExit:  # Lightning ends a Ctrl-C with exit(1), which reads as a failure
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    assert module.test_output is not None
    index, y, probs = module.test_output
    if rank0:
        rundir.save_fold_model(
            fold_dir / rundir.MODEL, module.model, module.model_cfg, store.dim, cohort.classes
        )
    preds = _test_predictions(cohort, split, index, y, probs)
    metrics = bag_metrics(y, probs)
    roc_png = fold_dir / rundir.ROC if rank0 else None
    if roc_png is not None:
        plot_roc(preds, cohort.classes, roc_png, f"{name}: test ROC", auc_label(metrics["auc"]))
    finish_fold(logger, metrics, roc_png)
    log.info(
        "%s: test %s (%s; trained on %s, precision %s)",
        name,
        " ".join(f"{k}={v:.3f}" for k, v in metrics.items()),
        sel.describe(cfg, ckpt),
        _where(trainer),
        trainer.precision,
    )
    return preds, metrics


def _where(trainer: L.Trainer) -> str:
    """Rank 0's device, and how many ranks trained (only rank 0 logs)."""
    ranks = f" (rank 0 of {trainer.world_size})" if trainer.world_size > 1 else ""
    return f"{trainer.strategy.root_device}{ranks}"


def _fold_module(
    cfg: FitConfig,
    n_classes: int,
    store: BagStore,
    dm: BagDataModule,
    sel: FoldSelection,
    seed: int,
) -> MILModule:
    """The fold's model with its ensemble members, standardised on its training bags."""
    module = MILModule.create(
        store.dim,
        n_classes,
        replace(cfg.model, members=sel.members),
        cfg.optim,
        _class_weights(dm, n_classes, cfg.data.balance),
        sel.epochs,
        seed,
    )
    if cfg.data.standardize:
        fit_feature_stats(module.model, [store.bags[b] for b in sel.train])
    return module


def _test_predictions(
    cohort: Cohort, split: Split, index: np.ndarray, y: np.ndarray, probs: np.ndarray
) -> pd.DataFrame:
    """The fold's rows of predictions.csv: ``index`` into split.test, labels, probabilities."""
    test_bags = cohort.bags.set_index("bag_id").loc[[split.test[i] for i in index]]
    preds = pd.DataFrame(
        {
            "slide_id": test_bags["slide_ids"].to_numpy(),
            "patient_id": test_bags["patient_id"].to_numpy(),
            "fold": split.fold,
            "repeat": split.repeat,
            "label": [cohort.classes[i] for i in y],
            "y": y,
            "pred": [cohort.classes[i] for i in predicted(probs)],
        }
    )
    for i, c in enumerate(cohort.classes):
        preds[f"prob_{c}"] = probs[:, i]
    if len(cohort.classes) == 2:
        preds["prob"] = probs[:, 1]
    return preds


def _train(
    plan: Plan,
    cfg: FitConfig,
    cohort: Cohort,
    store: BagStore,
    chosen: RunSelection,
    rank0: bool,
) -> None:
    """Train the plan's folds; rank 0 commits each as soon as it is done."""
    for i in plan.todo:
        split, name = plan.splits[i], plan.names[i]
        partial = rundir.partial_dir(plan.target, name)
        try:
            preds, metrics = _run_fold(
                cfg, cohort, store, split, name, partial, plan.target, chosen, rank0
            )
            if rank0:
                record = {
                    "run_id": plan.run_id,
                    "fingerprint": plan.fingerprint.digest,
                    "repeat": split.repeat,
                    "fold": split.fold,
                    "metrics": metrics,
                }
                rundir.commit_fold(plan.target, name, partial, preds, record)
        except BaseException:
            abort_fold(cfg)  # its W&B run, else the next fold (or sweep run) logs into it
            if rank0:  # no partial fold left behind (a SIGKILL'd one is cleared by the next fit)
                shutil.rmtree(partial, ignore_errors=True)
            raise
        plan.release(name)


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


def _feature_ids(cohort: Cohort, cfg: FitConfig) -> dict[str, Any]:
    """The run fingerprint's feature identity: the cache key of the cohort's bags (`open_store`
    checks that they all share it), else their feature dim and files (CLAM .pt, h5 without
    the attr), so a resume on other features is refused either way."""
    path = next(iter(cohort.members.values()))[0][1]
    key = plain(read_attrs(path).get("cache_key"))
    if key is not None:
        return {"cache_key": str(key)}
    dim, files = features_identity(cohort.members, cfg.data.features_dir)
    return {"cache_key": None, "feature_dim": dim, "features_sha256": files}


def _warn_topk_order(cfg: FitConfig, classes: list[str]) -> None:
    """topk ranks a bag's tiles by P(last class) (Campanella: P(tumour)), so it learns only when
    the tiles that decide a slide belong to the last class; an alphabetical order chose that
    class by name (immune_high vs immune_low puts immune_low last). Numeric labels (0/1) put
    the conventional positive last already."""
    numeric = all(is_number(c) for c in classes)  # 0/1: 1 last
    if cfg.model.name == "topk" and not cfg.data.classes and len(classes) == 2 and not numeric:
        log.warning(
            "model.name=topk ranks each bag's tiles by P(%s), the last class in alphabetical "
            "order (data.classes unset): if the tiles that decide a slide belong to '%s', pass "
            "\"data.classes=[%s,%s]\" (quoted for zsh).",
            classes[1], classes[0], classes[1], classes[0],
        )  # fmt: skip


def run_fit(cfg: FitConfig) -> int:
    """Cross-validate into output_dir (resuming a run of the same settings there)."""
    check(cfg)  # configs built in code (demo, sweep runs) skip load_config
    check_parallel(cfg)
    check_inputs(cfg)
    check_logger(cfg)
    out = Path(cfg.output_dir)
    rank0 = rank_zero_only.rank == 0
    if not rank0:  # DDP replicas repeat rank 0's work; only rank 0 reports
        logging.getLogger("melanoma_mil").setLevel(logging.WARNING)
    if cfg.trainer.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    external = external_ranks(cfg)
    cohort = build_cohort(cfg.data)
    if rank0:
        _warn_topk_order(cfg, cohort.classes)
    started: list[tuple[RunSelection, BagStore]] = []

    def make() -> Plan:
        if rank0:
            cleanup(out, cfg.overwrite)
        plan = plan_fit(cfg, cohort, _feature_ids(cohort, cfg), rank0)
        if plan.todo:
            started.append(_start(plan, cfg, cohort, rank0))
        return plan

    plan = rank0_plan(make, rank0, external)
    try:
        if plan.todo:
            chosen, store = started[0] if started else _start(plan, cfg, cohort, rank0)
            _train(plan, cfg, cohort, store, chosen, rank0)
        return _finish(plan, cfg, cohort.classes) if rank0 else 0
    finally:
        plan.release_all()
        if rank0:
            os.environ.pop(PLAN_ENV, None)


def _start(
    plan: Plan, cfg: FitConfig, cohort: Cohort, rank0: bool
) -> tuple[RunSelection, BagStore]:
    """The run's selection and bag store; rank 0 then claims the run and locks its folds (which
    drops folds other processes train: ``plan.todo`` may shrink)."""
    # one mode and ensemble size for every fold, from all splits (before any work)
    chosen = run_selection(cfg, plan.splits, _labels(cohort), cohort.classes)
    store = open_store(cohort.members, cfg, chosen.members)  # checks memory, then maps
    if rank0:
        start_fit(plan, cfg, _provenance(store, cohort, cfg, plan.splits_doc["sha256"]))
    log.info(
        "fit: %d bags (D=%d), training %d of %d splits -> %s; every fold: selection %s, "
        "%d member(s)",
        len(cohort.bags),
        store.dim,
        len(plan.todo),
        len(plan.splits),
        plan.out,
        chosen.mode,
        chosen.members,
    )
    return chosen, store


def _finish(plan: Plan, cfg: FitConfig, classes: list[str]) -> int:
    """Rank 0: when every fold is done, write (or show) the run's results."""
    out = plan.out
    write, written = results_writer(plan, cfg, classes)
    result = finish(plan, write)
    if result is None:
        return 0
    summary, wrote = result
    if wrote:
        log_summary(cfg, out, summary, written[0])
    elif not plan.todo:
        note_finished(cfg, out)
    print(table(summary))
    print(f"outputs in {out}: cv_summary.json, predictions.csv, roc.png, splits.json, folds/")
    # one report: by the process that wrote the results (a fold process finishing beside it
    # would write the same files at the same time), or by a rerun of the finished run
    report = cfg.clinical_csv and (wrote or not plan.todo)
    return write_report(cfg, out, out / "predictions.csv", out) if report else 0
