"""CLAM (Lu et al. 2021): gated attention plus instance-level clustering on attended tiles.

`clam_sb`: one attention branch. `clam_mb`: one attention branch and one bag classifier per
class (logit c = w_c^T (sum_i a_ic h_i)). The instance loss trains, per class, a 2-way tile
classifier: the k most attended tiles of the bag's class branch are positives and its k least
attended negatives; for every other class its k most attended tiles are negatives (CLAM's
``subtyping=True`` behaviour, which suits two classes that both have their own morphology, such
as immune-high vs immune-low), averaged over classes as CLAM does.
attention: clam_sb, the softmax attention weight of each tile; clam_mb, that of the predicted
class's branch (as CLAM's heatmaps draw it), and every branch's as ``class_attention``.

Deviations from mahmoodlab/CLAM: bags with fewer than 2k tiles use k = N // 2 (CLAM fails on
them); a bag too small for any (k = 0) adds a zero that touches the instance classifiers, so DDP
sees a gradient for every parameter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from melanoma_mil.config import ModelConfig
from melanoma_mil.models.attention import AttentionMIL, GatedAttention
from melanoma_mil.models.common import MILOutput, class_column, embed, embed_tiles, touch


def clam_instance_loss(
    h: torch.Tensor,
    a: torch.Tensor,
    label: torch.Tensor | int,
    classifiers: nn.ModuleList,
    k_sample: int,
) -> torch.Tensor:
    """CLAM's clustering loss. h [N, H]; a [N, B] attention (B = 1 branch or one per class)."""
    k = min(k_sample, h.shape[0] // 2)  # bags smaller than 2k use what they have
    if k == 0:
        return touch(classifiers)
    target = torch.cat([h.new_ones(k), h.new_zeros(k)]).long()
    label = torch.as_tensor(label, device=h.device)
    losses = []
    for c, clf in enumerate(classifiers):
        branch = a[:, c if a.shape[1] > 1 else 0]
        top = h[torch.topk(branch, k).indices]
        # in-class: top-k positive, bottom-k negative; out-of-class: top-k negative. Both are
        # computed and one is selected on the device, so a step never waits for the label on
        # the host (the other gets exact zero gradients: results equal a branching version's)
        inside = F.cross_entropy(
            clf(torch.cat([top, h[torch.topk(-branch, k).indices]])).float(), target
        )
        outside = F.cross_entropy(clf(top).float(), target[k:])
        losses.append(torch.where(label == c, inside, outside))
    return torch.stack(losses).mean()


class ClamSB(AttentionMIL):
    """CLAM single-branch: gated attention plus the instance clustering loss."""

    def __init__(self, in_dim: int, n_classes: int, cfg: ModelConfig) -> None:
        super().__init__(in_dim, n_classes, cfg, gated=True)
        self.k_sample = cfg.k_sample
        self.instance_classifiers = nn.ModuleList(
            nn.Linear(cfg.hidden_dim, 2) for _ in range(n_classes)
        )

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> MILOutput:
        h, a, m = self.pool(x)
        inst = None
        if label is not None:
            inst = clam_instance_loss(
                h, a.detach()[:, None], label, self.instance_classifiers, self.k_sample
            )
        return MILOutput(self.classifier(m), a, inst)


class ClamMB(nn.Module):
    """CLAM multi-branch: one gated-attention branch and one bag classifier per class."""

    def __init__(self, in_dim: int, n_classes: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.k_sample = cfg.k_sample
        self.embed = embed(in_dim, cfg.hidden_dim, cfg.dropout)
        self.attention = GatedAttention(cfg.hidden_dim, cfg.attention_dim, cfg.dropout, n_classes)
        self.classifiers = nn.ModuleList(nn.Linear(cfg.hidden_dim, 1) for _ in range(n_classes))
        self.instance_classifiers = nn.ModuleList(
            nn.Linear(cfg.hidden_dim, 2) for _ in range(n_classes)
        )

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> MILOutput:
        h = embed_tiles(self.embed, x)
        a = torch.softmax(self.attention(h).float(), dim=0)  # [N, C]: softmax per branch
        m = a.to(h.dtype).T @ h  # [C, H]
        logits = torch.cat([clf(m[c]) for c, clf in enumerate(self.classifiers)])
        inst = None
        if label is not None:
            inst = clam_instance_loss(
                h, a.detach(), label, self.instance_classifiers, self.k_sample
            )
        return MILOutput(logits, class_column(a, logits.detach().argmax()), inst, a)
