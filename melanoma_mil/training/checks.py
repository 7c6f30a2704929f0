"""What `fit` refuses before any work: key combinations fold-parallel and multi-device runs
cannot honour, and an accelerator this machine lacks (`sweep` checks each run's keys alike)."""

from __future__ import annotations

from pathlib import Path

from melanoma_mil import rundir
from melanoma_mil.config import FitConfig
from melanoma_mil.errors import UserError


def check_parallel(cfg: FitConfig) -> None:
    """Fold-parallel and multi-device keys, checked before any work."""
    if cfg.cv.run_folds and cfg.overwrite:
        raise UserError(
            "cv.run_folds with overwrite=true: fold processes cannot agree which run to replace; "
            "remove the old run folder (or choose a new output_dir) and start them without "
            "overwrite."
        )
    real, here = rundir.run_path(Path(cfg.output_dir)), Path.cwd().resolve()
    if cfg.overwrite and (here == real or real in here.parents):
        raise UserError(
            f"output_dir '{cfg.output_dir}' with overwrite=true is this shell's working folder "
            f"(or holds it): the old run is deleted once replaced; cd out of '{real}' and pass "
            "its path."
        )
    if any(i < 0 for i in cfg.cv.run_folds):
        raise UserError(f"cv.run_folds={list(cfg.cv.run_folds)}: split indices are >= 0.")
    check_accelerator(cfg.trainer.accelerator)
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    if cfg.trainer.accumulate_grad_batches % world:
        raise UserError(
            f"trainer.accumulate_grad_batches={cfg.trainer.accumulate_grad_batches} bags per "
            f"optimizer step cannot be shared by {world} devices (trainer.devices x "
            "trainer.num_nodes; DDP puts one bag per device per step): set it to a multiple of "
            f"{world}, which matches a 1-device run with the same value, or train folds in "
            "parallel with cv.run_folds instead."
        )


def check_accelerator(name: str) -> None:
    """An accelerator this machine lacks fails here, before any work: Lightning would refuse it
    only once the run folder exists, and a corrected rerun is then refused as other settings."""
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator, XLAAccelerator

    has = {"cuda": CUDAAccelerator.is_available(), "mps": MPSAccelerator.is_available()}
    has |= {"gpu": has["cuda"] or has["mps"], "tpu": XLAAccelerator.is_available()}
    if not has.get(name, True):
        raise UserError(
            f"trainer.accelerator={name}: this machine has no such device; use "
            "trainer.accelerator=auto (or cpu), or run on a machine that has one."
        )
