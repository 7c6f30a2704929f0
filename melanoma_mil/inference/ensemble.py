"""The fold models of a trained run as one ensemble: probabilities and attention per fold."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from melanoma_mil.errors import UserError
from melanoma_mil.metrics import predicted
from melanoma_mil.models import class_scores
from melanoma_mil.rundir import TrainedRun


class Ensemble:
    """The run's fold models on one device; one forward per model gives probs and attention."""

    def __init__(self, run: TrainedRun, device: torch.device, threshold: float = 0.5) -> None:
        self.run = run
        self.device = device
        self.threshold = threshold  # binary: the positive class from this probability on
        self.models: list[nn.Module] = run.fold_models(device)
        self.fold_names = run.fold_names()
        self.classes = run.classes
        dim = run.provenance.get("feature_dim")
        self.in_dim = int(dim) if dim is not None else None

    @torch.inference_mode()
    def __call__(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """features [N, D] -> (probabilities [F, C], attention [F, N]), in fp32: `fit`'s test
        on CPU, within bf16 rounding of it where `fit` tested under GPU autocast."""
        if self.in_dim is not None and features.shape[1] != self.in_dim:
            raise UserError(
                f"features have dimension {features.shape[1]} but the run's models "
                f"expect {self.in_dim}: they come from another encoder."
            )
        x = torch.from_numpy(np.ascontiguousarray(features)).to(self.device).float()
        probs, attention = fold_outputs(self.models, x, self.threshold)
        return probs.cpu().numpy(), attention.cpu().numpy()


def fold_outputs(
    models: list[nn.Module], x: torch.Tensor, threshold: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] -> (probabilities [F, C], attention [F, N]). Each fold's attention is its map of
    the ensemble's class (`metrics.predicted` of the fold-mean probabilities) where the model has
    one map per class: averaging each fold's own predicted class would mix classes when folds
    disagree."""
    outs = [model(x) for model in models]
    probs = torch.stack([torch.softmax(o.logits.float(), dim=-1) for o in outs])
    mean = probs.mean(0)[None].cpu().numpy()
    cls = torch.as_tensor(predicted(mean, threshold)[0], device=probs.device)
    return probs, torch.stack([class_scores(o, cls).float() for o in outs])
