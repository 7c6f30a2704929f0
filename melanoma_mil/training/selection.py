"""Model selection inside a training fold: early stopping on the validation split, or none.

Early stopping and checkpoint choice on a validation split carved from the training fold is
sound when that split is large; on a small cohort it is a handful of bags per class, whose loss
is noise, and it costs a fifth of the training patients. ``trainer.selection``:
- early_stopping: train on split.train, stop when ``trainer.monitor`` on split.val has not
  improved for ``trainer.patience`` epochs (and not before that many past a warm-up), test
  the best epoch's weights;
- last: train on split.train + split.val for ``trainer.max_epochs`` and test the mean of the
  weights of the last ``trainer.average_fraction`` of the epochs (stochastic weight
  averaging), or the last weights when that is 0; never a warm-up epoch's
  (`models.warmup_epochs`: topk's first epochs train another pooling than the one tested);
- auto (default): early_stopping when every class has at least ``trainer.min_val_bags`` bags
  in every fold's validation split, else last.
``trainer.max_epochs`` left at None is 50, except with selection=last on a small cohort: there
50 epochs are few optimizer steps (92 bags: 4,600), so the epochs are raised to make at least
MIN_STEPS (MUSK2, 3 seeds: 100 epochs instead of 50 raised accuracy / AUC from 0.885 / 0.929 to
0.901 / 0.944). A number set there is taken as given. A small cohort also trains ensembles of
SMALL_COHORT_MEMBERS members (``model.members`` left at None; `models.ensemble`): there a model
costs little and its seed moves accuracy most.
The mode and the members are decided once per run, over every split (`run_selection`): a
cohort whose folds straddle a threshold would otherwise mix early stopping with averaged
weights, or ensembles with single models. Every process (resumed, fold-parallel, DDP rank)
decides from the same splits.json, so they agree. The epochs stay per fold (each makes at least
MIN_STEPS steps when raised), so a cohort whose folds all fall on one side trains as before.
splits.json always holds the validation split, so runs that select differently stay paired
(same splits, same digest). The test fold takes part in neither choice.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn

from melanoma_mil import rundir
from melanoma_mil.config import FitConfig
from melanoma_mil.data.splits import Split
from melanoma_mil.errors import UserError
from melanoma_mil.models import warmup_epochs

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = 50
MIN_STEPS = 10_000  # optimizer steps of a selection=last run when max_epochs is None
SMALL_COHORT_MEMBERS = 3  # model.members of a fold whose epochs were raised


def resolve_selection(cfg: FitConfig, splits: list[Split], labels: dict[str, int]) -> str:
    """``trainer.selection`` with auto decided from the smallest class count of any split's
    validation bags: one mode for every fold."""
    if cfg.trainer.selection != "auto":
        return cfg.trainer.selection
    classes = set(labels.values())
    counts = [Counter(labels[b] for b in s.val) for s in splits]
    smallest = min(c.get(k, 0) for c in counts for k in classes)
    return "early_stopping" if smallest >= cfg.trainer.min_val_bags else "last"


class LastEpochsAverage(WeightAveraging):
    """Equal-weight average of the weights at the end of each epoch from ``first`` on."""

    def __init__(self, first: int) -> None:
        super().__init__()
        self.first = first

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return epoch_idx is not None and epoch_idx >= self.first

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Testing keeps the checkpoint's weights, the average (Lightning's callback would put
        the last epoch's back)."""
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


@dataclass
class FoldSelection:
    """What a fold trains on, for how many epochs, and how its tested weights are chosen."""

    mode: str  # early_stopping | last
    train: list[str]
    val: list[str]
    epochs: int
    members: int

    def averaged(self, cfg: FitConfig) -> int:
        """How many final epochs' weights selection=last averages (1: the last epoch alone),
        never a warm-up epoch (topk's: its weights were trained for another pooling)."""
        wanted = math.ceil(round(cfg.trainer.average_fraction * self.epochs, 6))
        return max(1, min(wanted, self.epochs - warmup_epochs(cfg.model, self.epochs)))

    def tested_weights(self, cfg: FitConfig) -> str:
        """Which weights selection=last tests, for log lines."""
        n = self.averaged(cfg)
        weights = (
            f"last of {self.epochs} epochs"
            if n == 1
            else f"mean of the last {n} of {self.epochs} epochs' weights"
        )
        return self._with_members(weights)

    def _with_members(self, text: str) -> str:
        return text if self.members == 1 else f"{text}, {self.members} members"

    def callbacks(
        self, cfg: FitConfig, fold_dir: Path
    ) -> tuple[ModelCheckpoint, list[Callback], dict[str, Any]]:
        """(checkpoint whose "best" is tested, all callbacks, extra Trainer keyword arguments)."""
        if self.mode == "last":  # a checkpoint without a monitor keeps the last epoch
            ckpt = ModelCheckpoint(
                dirpath=fold_dir,
                filename=Path(rundir.CHECKPOINT).stem,
                save_top_k=1,
                enable_version_counter=False,
            )
            callbacks: list[Callback] = [ckpt]
            n = self.averaged(cfg)
            if n > 1:  # saved checkpoints hold the average (Lightning runs checkpoints last)
                callbacks.append(LastEpochsAverage(self.epochs - n))
            return ckpt, callbacks, {"limit_val_batches": 0, "min_epochs": None}
        mode = "max" if cfg.trainer.monitor == "val_auc" else "min"
        ckpt = ModelCheckpoint(
            dirpath=fold_dir,
            filename=Path(rundir.CHECKPOINT).stem,
            monitor=cfg.trainer.monitor,
            mode=mode,
            save_top_k=1,
            enable_version_counter=False,
        )
        stop = EarlyStopping(monitor=cfg.trainer.monitor, mode=mode, patience=cfg.trainer.patience)
        min_epochs = min(self._min_epochs(cfg), self.epochs)
        return ckpt, [ckpt, stop], {"min_epochs": min_epochs}

    def _min_epochs(self, cfg: FitConfig) -> int:
        """``trainer.min_epochs``, or after a warm-up at least ``trainer.patience`` epochs past
        it: otherwise a run could stop before it trained the way it is tested."""
        warmup = warmup_epochs(cfg.model, self.epochs)
        if warmup == 0:
            return cfg.trainer.min_epochs
        return max(cfg.trainer.min_epochs, warmup + cfg.trainer.patience)

    def describe(self, cfg: FitConfig, ckpt: ModelCheckpoint) -> str:
        """How the tested weights were chosen, for the fold's log line."""
        if self.mode == "last":
            return f"{self.tested_weights(cfg)}, no model selection"
        score = float(ckpt.best_model_score) if ckpt.best_model_score is not None else math.nan
        return self._with_members(f"selected by best {cfg.trainer.monitor}={score:.4f}")


def fold_epochs(cfg: FitConfig, mode: str, n_train: int) -> int:
    """``trainer.max_epochs``, or where None: DEFAULT_EPOCHS, raised with selection=last to
    reach MIN_STEPS optimizer steps (trainer.accumulate_grad_batches bags each)."""
    if cfg.trainer.max_epochs is not None:
        return cfg.trainer.max_epochs
    if mode != "last":
        return DEFAULT_EPOCHS
    return max(DEFAULT_EPOCHS, math.ceil(MIN_STEPS / steps_per_epoch(cfg, n_train)))


def steps_per_epoch(cfg: FitConfig, n_train: int) -> int:
    """Optimizer steps one epoch makes: the epoch order (`datamodule.EpochOrder`) drops the bags
    short of a full step, unless there are fewer than one step's; the balanced sampler draws
    ``n_train`` bags and Lightning steps on the last partial accumulation too."""
    acc = cfg.trainer.accumulate_grad_batches
    if cfg.data.balance == "sampler" or n_train < acc:
        return max(1, math.ceil(n_train / acc))
    return n_train // acc


def fold_members(cfg: FitConfig, most_epochs: int) -> int:
    """``model.members``, or where None: SMALL_COHORT_MEMBERS if the run's epochs were raised
    (max_epochs None, more than DEFAULT_EPOCHS in its smallest fold), else 1."""
    if cfg.model.members is not None:
        return cfg.model.members
    raised = cfg.trainer.max_epochs is None and most_epochs > DEFAULT_EPOCHS
    return SMALL_COHORT_MEMBERS if raised else 1


@dataclass(frozen=True)
class RunSelection:
    """What every fold of a run shares: the selection mode and the ensemble members."""

    mode: str  # early_stopping | last
    members: int


def _bags(mode: str, split: Split) -> tuple[list[str], list[str]]:
    """(training bags, validation bags): selection=last trains on the validation split too."""
    return (sorted(split.train + split.val), []) if mode == "last" else (split.train, split.val)


def run_selection(
    cfg: FitConfig, splits: list[Split], labels: dict[str, int], classes: list[str]
) -> RunSelection:
    """The run's mode and members, decided over all its splits; early stopping on an empty
    validation split, or with val_auc on one lacking a class (NaN every epoch), is refused."""
    mode = resolve_selection(cfg, splits, labels)
    if mode == "early_stopping":
        _check_validation_splits(cfg, splits, labels, classes)
    most = max(fold_epochs(cfg, mode, len(_bags(mode, s)[0])) for s in splits)
    return RunSelection(mode, fold_members(cfg, most))


def _check_validation_splits(
    cfg: FitConfig, splits: list[Split], labels: dict[str, int], classes: list[str]
) -> None:
    """Early stopping needs validation bags in every fold (a user's splits file may have none),
    and with val_auc every class among them."""
    for name, split in zip(rundir.fold_names(splits), splits, strict=True):
        if not split.val:
            raise UserError(
                f"{name}: its validation split is empty (cv.splits_file), so early stopping "
                "cannot select on it; use trainer.selection=last (trains on its training "
                "bags), or a splits file with validation bags."
            )
        if cfg.trainer.monitor == "val_auc":
            missing = sorted(set(range(len(classes))) - {labels[b] for b in split.val})
            if missing:
                raise UserError(
                    f"{name}: its validation split has no '{classes[missing[0]]}' bag, so "
                    "val_auc is undefined and early stopping cannot select on it; use "
                    "trainer.selection=last, trainer.monitor=val_loss, or a larger "
                    "cv.val_fraction."
                )


def fold_selection(run: RunSelection, cfg: FitConfig, split: Split) -> FoldSelection:
    """The fold's training bags, validation bags and epochs under the run's mode and members."""
    train, val = _bags(run.mode, split)
    return FoldSelection(run.mode, train, val, fold_epochs(cfg, run.mode, len(train)), run.members)


def plan_selection(run: RunSelection, cfg: FitConfig, split: Split) -> FoldSelection:
    """`fold_selection`, logged for the fold about to train."""
    sel = fold_selection(run, cfg, split)
    if sel.mode == "early_stopping":
        how = f"by early stopping on {len(sel.val)} validation bags"
    else:  # the validation split is trained on: saying "N validation bags" would mislead
        how = f"none, {sel.tested_weights(cfg)}; {len(sel.train)} training bags"
    log.info("repeat %d fold %d: model selection %s", split.repeat, split.fold, how)
    return sel
