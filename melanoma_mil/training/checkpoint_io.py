"""Lightning checkpoints written in their own folder, as every other file of a run is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.strategies import Strategy

from melanoma_mil.rundir.folds import save_torch


class FolderCheckpointIO(TorchCheckpointIO):
    """Lightning's own save writes each checkpoint to the system temp folder ($TMPDIR, often
    small) and copies it over: a full /tmp failed a fit whose output_dir had room, and a full
    output_dir was reported as a file in /tmp. Here it goes to a temp name beside its final
    name, then is renamed (`rundir.folds.save_torch`)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"storage_options are not supported by {type(self).__name__}")
        save_torch(Path(path), checkpoint)


def own_checkpoint_io(strategy: Strategy) -> None:
    """Write ``strategy``'s checkpoints with `FolderCheckpointIO` where it would use Lightning's
    plain torch writer. Strategies with a writer of their own keep it: XLA's refuses any other
    (a plugin passed to the Trainer made every TPU fit fail), DeepSpeed writes folders."""
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = FolderCheckpointIO()
