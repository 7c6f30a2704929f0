"""LightningModule around a plain-torch MIL model.

Validation and test metrics are computed on predictions gathered from every rank and
de-duplicated by bag index, so DistributedSampler's padding never counts a bag twice.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from melanoma_mil.config import ModelConfig, OptimConfig
from melanoma_mil.metrics import bag_metrics
from melanoma_mil.models import MILOutput, build_model, set_progress
from melanoma_mil.models.ensemble import member_outputs

Batch = tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]  # bags [N, D], labels, indices


def seed_step(device: torch.device, seed: int) -> None:
    """Seed the generators a training step draws from: the CPU's and, off CPU, the device's.

    Not torch.manual_seed: it also queues a lazy seed for every uninitialised backend (CUDA,
    XPU, MTIA), capturing a stack trace for each, ~2 ms a call on CPU, a third of a small-bag
    step (benchmarks/README.md, train_throughput.py).
    """
    torch.default_generator.manual_seed(seed)
    if device.type != "cpu":
        torch.get_device_module(device.type).manual_seed(seed)


class MILModule(L.LightningModule):
    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        model: dict[str, Any],
        optim: dict[str, Any],
        class_weights: list[float] | None = None,
        max_epochs: int = 50,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_cfg = ModelConfig(**model)
        self.optim_cfg = OptimConfig(**optim)
        self.model = build_model(self.model_cfg, in_dim, n_classes)
        weights = torch.tensor(class_weights) if class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)
        self._outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._loss_sum, self._steps = torch.zeros(()), 0
        self.test_output: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @classmethod
    def create(
        cls,
        in_dim: int,
        n_classes: int,
        model: ModelConfig,
        optim: OptimConfig,
        class_weights: list[float] | None,
        max_epochs: int,
        seed: int = 0,
    ) -> MILModule:
        return cls(in_dim, n_classes, asdict(model), asdict(optim), class_weights, max_epochs, seed)

    def forward(self, bag: torch.Tensor, label: torch.Tensor | None = None) -> MILOutput:
        return self.model(bag, label)

    def _loss(self, out: MILOutput, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(out.logits.float().unsqueeze(0), y)
        if out.instance_loss is not None:
            w = self.model_cfg.bag_weight
            loss = w * loss + (1 - w) * out.instance_loss
        if self.class_weights is not None:  # data.balance=loss
            # a weight multiplies the bag's whole loss (CLAM's / DSMIL's instance term too): with
            # one bag per step, cross_entropy's own weighted *mean* would divide it back out
            loss = loss * self.class_weights[y[0]]
        return loss

    def on_train_epoch_start(self) -> None:
        set_progress(self.model, self.current_epoch, self.hparams.max_epochs)
        self._loss_sum = torch.zeros((), device=self.device)
        self._steps = 0

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        bags, y, _ = batch
        # dropout masks depend on (seed, epoch, position in the epoch's order) only, so N DDP
        # ranks draw for each bag what one process accumulating N bags per step draws
        position = batch_idx * self.trainer.world_size + self.global_rank
        seed_step(self.device, self.hparams.seed + 1_000_003 * self.current_epoch + position)
        outs = member_outputs(self.model, bags[0].float(), y)  # .float(): float16 store
        losses = torch.stack([self._loss(o, y) for o in outs])
        # summed on the device and logged once an epoch: per-step self.log costs more than a
        # small bag's forward, and the value equals Lightning's on_epoch mean (of a member's loss)
        self._loss_sum += losses.detach().mean()
        self._steps += 1
        return losses.sum()  # summed: each member trains as it would alone (L2 term included)

    def on_train_epoch_end(self) -> None:
        if self._steps:
            self.log("train_loss", self._loss_sum / self._steps, batch_size=1, sync_dist=True)

    def _eval_step(self, batch: Batch) -> None:
        bags, y, index = batch
        probs = [torch.softmax(self.model(b.float()).logits.float(), dim=-1) for b in bags]
        self._outputs.append((torch.stack(probs).detach(), y.detach(), index.detach()))

    def _gathered(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(index, label, probs) over all ranks, each bag exactly once, sorted by index."""
        probs = torch.cat([p for p, _, _ in self._outputs])
        y = torch.cat([t for _, t, _ in self._outputs])
        index = torch.cat([i for _, _, i in self._outputs])
        self._outputs = []
        if self.trainer.world_size > 1:
            probs, y, index = (self.all_gather(t).flatten(0, 1) for t in (probs, y, index))
        index_np = index.cpu().numpy()
        _, first = np.unique(index_np, return_index=True)
        return index_np[first], y.cpu().numpy()[first], probs.float().cpu().numpy()[first]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        if not self._outputs:
            return
        _, y, probs = self._gathered()
        metrics = bag_metrics(y, probs)
        nll = F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-7)), torch.from_numpy(y))
        self.log("val_loss", nll.item(), sync_dist=True)
        self.log("val_auc", metrics["auc"], sync_dist=True)
        self.log("val_balanced_accuracy", metrics["balanced_accuracy"], sync_dist=True)

    def on_test_epoch_end(self) -> None:
        self.test_output = self._gathered()

    def configure_optimizers(self) -> Any:
        adam = torch.optim.AdamW if self.optim_cfg.optimizer == "adamw" else torch.optim.Adam
        opt = adam(
            self.parameters(),
            lr=self.optim_cfg.lr,
            weight_decay=self.optim_cfg.weight_decay,
            foreach=True,  # one fused op per step, not one per parameter: MIL steps are tiny
        )
        if self.optim_cfg.scheduler == "none":
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.hparams.max_epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
