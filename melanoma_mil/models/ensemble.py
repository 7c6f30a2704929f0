"""`model.members`: several independently initialised copies of one model, trained side by side.

On a small cohort the model's init and dropout draws move accuracy by 0.01-0.02 from one seed
to the next; the mean of a few members' probabilities has less of that variance (README
"Defaults, and why"). Each member is trained on its own loss (`member_outputs`): a loss on the
averaged prediction would couple them and make them less diverse. Predictions (`forward`) are
the mean of the members' probabilities, returned as log-probabilities so that a softmax, as
every reader applies, gives that mean; the tile scores are the mean of theirs, for models with
one map per class each member's map of the ensemble's predicted class (`class_scores`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from melanoma_mil.models.common import MILOutput, class_scores


class Ensemble(nn.Module):
    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def member_outputs(self, x: torch.Tensor, label: torch.Tensor | None = None) -> list[MILOutput]:
        """Each member's output, for one loss per member."""
        return [m(x, label) for m in self.members]

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> MILOutput:
        outs = self.member_outputs(x, label)
        logp = torch.stack([torch.log_softmax(o.logits.float(), -1) for o in outs])
        mean_logp = torch.logsumexp(logp, 0) - math.log(len(outs))
        cls = mean_logp.detach().argmax()
        attention = torch.stack([class_scores(o, cls) for o in outs]).mean(0)
        per_class = None
        if outs[0].class_attention is not None:
            per_class = torch.stack([o.class_attention for o in outs]).mean(0)
        return MILOutput(mean_logp, attention, None, per_class)


def member_outputs(model: nn.Module, x: torch.Tensor, label: torch.Tensor) -> list[MILOutput]:
    """One output per member to train on: an `Ensemble`'s members', or the model's own."""
    return model.member_outputs(x, label) if isinstance(model, Ensemble) else [model(x, label)]
