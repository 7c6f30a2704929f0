"""Pieces every MIL model shares: the output contract, input standardisation, the tile embedding.

Every model maps one bag [N, D] to ``MILOutput``: bag logits [C], one score per tile [N]
(non-negative, sums to 1: what `heatmap` draws and `predict` stores; what it means differs per
model and is documented on each) and, in training with a label, an optional auxiliary
instance-level loss that `training.module` mixes in with ``model.bag_weight``. Models with one
attention map per class (`clam_mb`, `dsmil`) also return all of them [N, C]: their ``attention``
is the column of their own predicted class, and an ensemble (members, folds) draws every
model's column of the ensemble's predicted class (`class_scores`), not a mix of classes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from melanoma_mil.config import ModelConfig


class MILOutput(NamedTuple):
    logits: torch.Tensor  # [C]
    attention: torch.Tensor  # [N], float32, >= 0, sums to 1
    instance_loss: torch.Tensor | None = None
    class_attention: torch.Tensor | None = None  # [N, C], float32, each column as attention


def class_column(a: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """Column ``cls`` (a 0-d index tensor) of ``a`` [N, C]; picked on the device, so a training
    step never waits for the host to read the predicted class."""
    return a.index_select(1, cls.view(1)).squeeze(1)


def class_scores(out: MILOutput, cls: torch.Tensor) -> torch.Tensor:
    """The tile scores [N] an ensemble predicting class ``cls`` averages: the model's attention
    map of ``cls`` where it has one per class, otherwise its only map."""
    if out.class_attention is None:
        return out.attention
    return class_column(out.class_attention, cls)


# the std of a dimension that never varied in training: finite, not inf, because weight
# averaging updates buffers as p + (q - p) / n, and inf - inf is NaN
IGNORED_STD = 1e30


class FeatureNorm(nn.Module):
    """Per-dimension standardisation; identity until `fit_stats`. Buffers travel with the
    weights, so exported models standardise new bags exactly as in training."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.identity = True  # no statistics: skip a pass over every bag that changes nothing

    @torch.no_grad()
    def fit_stats(self, bags: list[torch.Tensor]) -> None:
        """Mean/std over every instance of ``bags`` (the training fold only), in float64.

        A dimension constant over the fold (std at rounding level of its own mean) taught the
        model nothing, and its first-layer weights never left their init: its std is set to
        ``IGNORED_STD``, so it standardises to ~0 for every new bag too. (The floor that varying
        dimensions keep, 1e-6 of the largest std, sent a new bag's small deviation there to ~1e4
        and through those untrained weights.)"""
        total = sum(b.shape[0] for b in bags)
        s = sum(b.double().sum(0) for b in bags)
        sq = sum(b.double().pow(2).sum(0) for b in bags)
        mean = s / total
        std = (sq / total - mean.pow(2)).clamp_min(0).sqrt()
        constant = std <= 1e-6 * mean.abs() + 1e-12  # sq/total - mean^2 cancels to ~1e-8 |mean|
        floor = std.clamp_min(1e-6 * float(std.max()) + 1e-12)
        self.mean.copy_(mean)
        self.std.copy_(torch.where(constant, torch.full_like(std, IGNORED_STD), floor))
        self.identity = False

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self.identity = bool((self.mean == 0).all() and (self.std == 1).all())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        inv = 1.0 / self.std
        return torch.addcmul(-self.mean * inv, x, inv)  # one pass over the bag, not two


class Dropout(nn.Dropout):
    """nn.Dropout whose CPU mask comes from a uniform draw and a compare.

    torch's CPU dropout draws a Bernoulli per element at ~12 ns each, 3x a uniform draw; with
    three dropouts on [N, 512] activations it was ~30% of a CPU training step (profiled on
    6k-instance bags). Same distribution and scaling; GPUs keep torch's fused kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p in (0.0, 1.0) or x.device.type != "cpu":
            return super().forward(x)
        keep = torch.rand_like(x) >= self.p
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))


def head_dims(cfg: ModelConfig, in_dim: int) -> ModelConfig:
    """``cfg`` with hidden_dim / attention_dim filled in where None (`ModelConfig.head_widths`)."""
    hidden, attention = cfg.head_widths(in_dim)
    return replace(cfg, hidden_dim=hidden, attention_dim=attention)


def embed(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    """The tile embedding of every model: FeatureNorm, Linear(D -> hidden), ReLU, Dropout.

    ``embed[0]`` is the FeatureNorm that `fit` fills with training-fold statistics."""
    return nn.Sequential(
        FeatureNorm(in_dim), nn.Linear(in_dim, hidden), nn.ReLU(), Dropout(dropout)
    )


CHUNK = 16384  # tiles embedded at a time where no graph is kept


def embed_tiles(embed: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``embed(x)``; without autograd in chunks, so inference on a 100,000 x 1536 bag never
    holds the whole standardised bag (another 586 MB) next to the raw one."""
    if torch.is_grad_enabled() or x.shape[0] <= CHUNK:
        return embed(x)
    return torch.cat([embed(c) for c in x.split(CHUNK)])


def softmax_scores(scores: torch.Tensor) -> torch.Tensor:
    """Tile scores [N] -> attention [N] in float32 (softmax over the bag's tiles)."""
    return torch.softmax(scores.float(), dim=0)


def probability_share(evidence: torch.Tensor) -> torch.Tensor:
    """Tile evidence [N] -> each tile's share of the bag's summed tile probabilities
    P(not the first class) = sigmoid(evidence), in float32, computed in log space."""
    return torch.softmax(F.logsigmoid(evidence.float()), dim=0)


def evidence(logits: torch.Tensor) -> torch.Tensor:
    """Per-tile evidence against the first class, [N, C] -> [N] in float32.

    Binary: logit(positive) - logit(negative), monotone in P(positive); multi-class:
    logsumexp of the other classes' logits minus the first's."""
    z = logits.float()
    return torch.logsumexp(z[:, 1:], dim=1) - z[:, 0]


def touch(*modules: nn.Module) -> torch.Tensor:
    """A zero that depends on every parameter of ``modules``.

    Added to a loss when a branch sat out this step (e.g. a 1-tile bag has no top/bottom-k
    tiles for an instance loss): DDP then still sees a gradient for every parameter."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return sum((p.sum() * 0.0 for p in params), torch.zeros((), device=params[0].device))


def set_progress(model: nn.Module, epoch: int, epochs: int) -> None:
    """Tell each part of ``model`` whose training changes over a run (topk's warm-up) which of
    the run's ``epochs`` starts (0-based); the others have no ``set_progress``."""
    for module in model.modules():
        if hasattr(module, "set_progress"):
            module.set_progress(epoch, epochs)
