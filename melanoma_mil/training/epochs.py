"""A fold's epochs in a log. Lightning's bar is for a terminal only (off one its redraws make
one unreadable line of a SLURM log or `tee` file), so off a terminal a fold said nothing between
its plan and its test line, however many epochs it trained (a small cohort's default is
thousands). There, `EpochLines` writes a plain line at most every LOG_INTERVAL_S seconds and
at the last epoch, as `tile` and `extract` do (`melanoma_mil.progress`)."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import lightning as L
from lightning.pytorch.callbacks import Callback

from melanoma_mil.progress import LOG_INTERVAL_S

log = logging.getLogger(__name__)


class EpochLines(Callback):
    """`<fold>: epoch E/N (elapsed)` on rank 0; no state, so checkpoints are unchanged."""

    def __init__(self, name: str, interval_s: float = LOG_INTERVAL_S) -> None:
        self.name, self.interval_s = name, interval_s
        self._start = self._last = time.monotonic()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now, epoch, total = time.monotonic(), trainer.current_epoch + 1, trainer.max_epochs
        if not trainer.is_global_zero or (now - self._last < self.interval_s and epoch != total):
            return
        self._last = now
        elapsed = timedelta(seconds=round(now - self._start))
        log.info("%s: epoch %d/%d (%s elapsed)", self.name, epoch, total, elapsed)
