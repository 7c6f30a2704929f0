"""One plan for every DDP rank that torchrun or SLURM started.

Such ranks start together, so each could plan from the run folder while rank 0 changes it
(cleanup, locking its folds, leaving folds that other processes train). Only rank 0 plans; the
others wait for its plan, or its error, over the process group that fit's Trainers then reuse.
Replicas that Lightning's own launcher starts replay rank 0's plan from ``PLAN_ENV`` instead.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import lightning as L
import torch.distributed as dist
from lightning.fabric.plugins.environments import LightningEnvironment

from melanoma_mil.config import FitConfig
from melanoma_mil.errors import UserError
from melanoma_mil.training.orchestrate import PLAN_ENV, Plan

# LOCAL_RANK as this process started: torchrun sets it for every rank and Lightning's launcher
# for its replicas, but Lightning also sets it in its own rank 0 once it has launched them, so a
# later fit in that process would otherwise take itself for a rank torchrun started.
_LOCAL_RANK_AT_START = "LOCAL_RANK" in os.environ


def external_ranks(cfg: FitConfig) -> bool:
    """Whether torchrun or SLURM started this process as one of several DDP ranks; if so, the
    process group is set up here (Lightning's Trainers find it and keep it)."""
    if cfg.trainer.devices * cfg.trainer.num_nodes == 1 or os.environ.get(PLAN_ENV):
        return False  # one process, or a replica Lightning launched (rank 0's plan is in env)
    strategy = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    ).strategy
    env = getattr(strategy, "cluster_environment", None)
    lightnings = isinstance(env, LightningEnvironment) and not _LOCAL_RANK_AT_START
    if env is None or not env.creates_processes_externally or lightnings:
        return False  # rank 0 of Lightning's launcher: its replicas start at the first fit
    if not dist.is_initialized():
        strategy.setup_environment()
    return True


def rank0_plan(make: Callable[[], Plan], rank0: bool, external: bool) -> Plan:
    """``make()`` on rank 0, shared with ranks that torchrun or SLURM started; any other process
    makes its own. Rank 0's error is raised on every rank, so none waits for the others."""
    if not external:
        return make()
    box: list[Any] = [None]
    if rank0:
        try:
            plan = make()
        except Exception as e:
            box[0] = (type(e) is UserError, str(e))
            dist.broadcast_object_list(box, src=0)
            raise
        box[0] = dataclasses.replace(plan, locks={})  # the fold locks stay with rank 0
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], tuple):
        user, message = box[0]
        raise UserError(message) if user else RuntimeError(f"rank 0 failed: {message}")
    return plan if rank0 else box[0]
