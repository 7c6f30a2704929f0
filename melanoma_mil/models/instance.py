"""Pooling baselines and instance-level MIL: `mean`, `max` and `topk` (Campanella et al. 2019).

All embed tiles like the attention models (FeatureNorm, Linear, ReLU, Dropout).
- mean: bag embedding = mean of the tile embeddings; attention is uniform (1/N).
- max: a linear tile classifier; the bag logit of each class is its largest tile logit
  (mi-net style max pooling).
- topk: a tile classifier trained on each bag's k tiles with the most evidence for a
  non-first class (binary: the highest P(positive)); the bag logits are the mean logits of
  those k tiles, so with k = 1 (the default) training is Campanella's "top-1 tile takes the
  slide label" and the slide score is its top tile's probability. The first
  `model.topk_warmup` of the epochs train on the mean of all tile logits instead: from a random
  init the deciding tiles are rarely on top, and a fold where they never got there learnt
  nothing about them (benchmarks/README.md, "topk through fit on planted cohorts").
For max and topk, attention is each tile's share of the bag's summed tile probabilities of a
non-first class (binary: P(positive) of the tile classifier, normalised to sum to 1).

topk deviations from MSKCC-Computational-Pathology/MIL-nature-medicine-2019: it trains a head on
frozen tile features instead of fine-tuning a ResNet-34 on pixels, and re-selects the top tiles
at every step (a bag at a time) instead of once per epoch for a tile mini-batch; selection scores
every tile without dropout, in chunks, without building a graph, so after the warm-up a
100,000-tile bag costs only its k tiles' activations in training (during it, as `max`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from melanoma_mil.config import ModelConfig
from melanoma_mil.models.common import (
    CHUNK,
    MILOutput,
    embed,
    embed_tiles,
    evidence,
    probability_share,
)


class MeanMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed = embed(in_dim, cfg.hidden_dim, cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden_dim, n_classes)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> MILOutput:
        h = embed_tiles(self.embed, x)
        n = h.shape[0]
        return MILOutput(self.classifier(h.mean(0)), torch.full((n,), 1.0 / n, device=h.device))


class MaxMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed = embed(in_dim, cfg.hidden_dim, cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden_dim, n_classes)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> MILOutput:
        scores = self.classifier(embed_tiles(self.embed, x))  # [N, C]
        return MILOutput(scores.max(0).values, probability_share(evidence(scores.detach())))


def _warmup_count(fraction: float, epochs: int) -> int:
    """floor(fraction x epochs): none in a run of under 1 / fraction epochs, so that a short
    run trains on top tiles too."""
    return math.floor(fraction * epochs + 1e-9)


class TopKMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.k = cfg.top_k
        self.warmup = cfg.topk_warmup
        self.warming = False  # set by set_progress; False outside `fit` (pure top-k)
        self.embed = embed(in_dim, cfg.hidden_dim, cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden_dim, n_classes)

    @staticmethod
    def warmup_epochs(cfg: ModelConfig, epochs: int) -> int:
        """How many of a run's first ``epochs`` warm up (`models.warmup_epochs`)."""
        return _warmup_count(cfg.topk_warmup, epochs)

    def set_progress(self, epoch: int, epochs: int) -> None:
        """At each training epoch's start: warm up in the first `warmup_epochs`."""
        self.warming = epoch < _warmup_count(self.warmup, epochs)

    @torch.no_grad()
    def tile_evidence(self, x: torch.Tensor) -> torch.Tensor:
        """[N] float32 evidence per tile, without dropout and without a graph."""
        score = nn.Sequential(*self.embed[:-1], self.classifier)  # the embedding minus Dropout
        return torch.cat([evidence(score(c)) for c in x.split(CHUNK)])

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> MILOutput:
        if self.training and self.warming:
            scores = self.classifier(embed_tiles(self.embed, x))
            return MILOutput(scores.mean(0), probability_share(evidence(scores.detach())))
        ev = self.tile_evidence(x)
        top = torch.topk(ev, min(self.k, x.shape[0])).indices
        logits = self.classifier(self.embed(x[top])).mean(0)
        return MILOutput(logits, probability_share(ev))
