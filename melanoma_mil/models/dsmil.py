"""DSMIL (Li et al. 2021): an instance stream and a critical-instance attention stream.

Instance stream: a linear tile classifier; per class, its max over the tiles is the stream's
bag score, and the critical tile is that argmax. Bag stream: queries q_i = tanh-MLP(h_i)
(128-d), attention of class c over tiles = softmax_i(<q_i, q_crit(c)> / sqrt(128)), class
embedding b_c = sum_i a_ic h_i, and the bag logits come from a Conv1d(C, C, kernel H) over all
class embeddings (as the official fcc layer). Training loss = bag_weight * CE(bag logits) +
(1 - bag_weight) * CE(max-pooled tile logits) (DSMIL weighs them 0.5/0.5; here
``model.bag_weight``, shared with CLAM, sets it: 0.7/0.3 by default).
attention: the bag stream's attention of the predicted class (binary, typically the positive
class: similarity to the most positive tile), softmax over the tiles; every class's as
``class_attention``.

Deviations from binli123/dsmil-wsi: both streams act on the shared tile embedding
(FeatureNorm, Linear D -> hidden_dim, ReLU, Dropout) rather than the raw features, so every
model sees tiles alike; multi-class softmax cross-entropy instead of per-class BCE; default
(not orthogonal) initialisation; the value projection is the identity (the official default).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from melanoma_mil.config import ModelConfig
from melanoma_mil.models.common import MILOutput, class_column, embed, embed_tiles

QUERY_DIM = 128


class DSMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = cfg.hidden_dim
        self.embed = embed(in_dim, hidden, cfg.dropout)
        self.instance_classifier = nn.Linear(hidden, n_classes)
        self.query = nn.Sequential(
            nn.Linear(hidden, QUERY_DIM), nn.ReLU(), nn.Linear(QUERY_DIM, QUERY_DIM), nn.Tanh()
        )
        self.fcc = nn.Conv1d(n_classes, n_classes, kernel_size=hidden)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> MILOutput:
        h = embed_tiles(self.embed, x)  # [N, H]
        inst = self.instance_classifier(h)  # [N, C]
        critical = inst.detach().argmax(0)  # [C]: the top tile of each class
        q = self.query(h)  # [N, Q]
        with torch.autocast(h.device.type, enabled=False):  # attention in float32
            q = q.float()
            a = torch.softmax(q @ q[critical].T / math.sqrt(QUERY_DIM), dim=0)  # [N, C]
        b = a.to(h.dtype).T @ h  # [C, H]
        logits = self.fcc(b[None])[0, :, 0]  # [C]
        loss = None
        if label is not None:
            loss = F.cross_entropy(inst.max(0).values.float()[None], label.view(1).long())
        return MILOutput(logits, class_column(a, logits.detach().argmax()), loss, a)
