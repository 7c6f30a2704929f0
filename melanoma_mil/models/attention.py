"""Attention-based MIL (Ilse et al. 2018): `abmil` (tanh attention) and `gated_attention`.

Tile embedding h = ReLU(W x) (CLAM-small dims by default: D -> 512), attention score per tile,
softmax over the bag, bag embedding = attention-weighted mean of h, linear classifier.
attention: the softmax attention weight of each tile in the bag embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from melanoma_mil.config import ModelConfig
from melanoma_mil.models.common import Dropout, MILOutput, embed, embed_tiles, softmax_scores


class TanhAttention(nn.Module):
    """a(h) = w^T tanh(V h) (Ilse et al. eq. 8)."""

    def __init__(self, hidden: int, attention: int, dropout: float, branches: int = 1) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(hidden, attention), nn.Tanh(), Dropout(dropout))
        self.c = nn.Linear(attention, branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(h))  # [N, branches]


class GatedAttention(nn.Module):
    """a(h) = w^T (tanh(V h) * sigmoid(U h)) (Ilse et al. eq. 9)."""

    def __init__(self, hidden: int, attention: int, dropout: float, branches: int = 1) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(hidden, attention), nn.Tanh(), Dropout(dropout))
        self.b = nn.Sequential(nn.Linear(hidden, attention), nn.Sigmoid(), Dropout(dropout))
        self.c = nn.Linear(attention, branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(h) * self.b(h))  # [N, branches]


class AttentionMIL(nn.Module):
    """Embedding, (gated) attention pooling, linear bag classifier."""

    def __init__(self, in_dim: int, n_classes: int, cfg: ModelConfig, gated: bool = True) -> None:
        super().__init__()
        self.embed = embed(in_dim, cfg.hidden_dim, cfg.dropout)
        scorer = GatedAttention if gated else TanhAttention
        self.attention = scorer(cfg.hidden_dim, cfg.attention_dim, cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden_dim, n_classes)

    def pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h [N, H], attention [N] float32, bag embedding [H])."""
        h = embed_tiles(self.embed, x)
        a = softmax_scores(self.attention(h)[:, 0])
        return h, a, a.to(h.dtype) @ h

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> MILOutput:
        _, a, m = self.pool(x)
        return MILOutput(self.classifier(m), a)
