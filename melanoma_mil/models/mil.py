"""Gated-attention MIL (Ilse et al. 2018), CLAM-SB (Lu et al. 2021) and pooling baselines.

Every model maps one bag [N, D] to ``MILOutput``: logits [C] and attention [N] (sums to 1), so
heatmaps and predictions treat them alike.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from melanoma_mil.config import ModelConfig
from melanoma_mil.errors import UserError


class MILOutput(NamedTuple):
    logits: torch.Tensor  # [C]
    attention: torch.Tensor  # [N], softmax-normalised
    instance_loss: torch.Tensor | None = None


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
        """Mean/std over every instance of ``bags`` (the training fold only), in float64."""
        total = sum(b.shape[0] for b in bags)
        s = sum(b.double().sum(0) for b in bags)
        sq = sum(b.double().pow(2).sum(0) for b in bags)
        mean = s / total
        std = (sq / total - mean.pow(2)).clamp_min(0).sqrt()
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(1e-6 * float(std.max()) + 1e-12))
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


def _embed(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        FeatureNorm(in_dim), nn.Linear(in_dim, hidden), nn.ReLU(), Dropout(dropout)
    )


class GatedAttention(nn.Module):
    """a(h) = w^T (tanh(V h) * sigmoid(U h)): one unnormalised score per instance."""

    def __init__(self, hidden: int, attention: int, dropout: float) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(hidden, attention), nn.Tanh(), Dropout(dropout))
        self.b = nn.Sequential(nn.Linear(hidden, attention), nn.Sigmoid(), Dropout(dropout))
        self.c = nn.Linear(attention, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(h) * self.b(h)).squeeze(-1)


class GatedAttentionMIL(nn.Module):
    """CLAM-small dims: Linear(D->512)+ReLU+Dropout, gated attention 512->256->1, classifier."""

    def __init__(self, in_dim: int, n_classes: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed = _embed(in_dim, cfg.hidden_dim, cfg.dropout)
        self.attention = GatedAttention(cfg.hidden_dim, cfg.attention_dim, cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden_dim, n_classes)

    def pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.embed(x)
        a = torch.softmax(self.attention(h).float(), dim=0)
        return h, a, a.to(h.dtype) @ h

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> MILOutput:
        _, a, m = self.pool(x)
        return MILOutput(self.classifier(m), a)


class ClamSB(GatedAttentionMIL):
    """CLAM single-branch: gated attention plus instance-level clustering loss on top/bottom-k."""

    def __init__(self, in_dim: int, n_classes: int, cfg: ModelConfig) -> None:
        super().__init__(in_dim, n_classes, cfg)
        self.k_sample = cfg.k_sample
        self.n_classes = n_classes
        self.instance_classifiers = nn.ModuleList(
            nn.Linear(cfg.hidden_dim, 2) for _ in range(n_classes)
        )

    def _instance_loss(self, h: torch.Tensor, a: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        k = min(self.k_sample, h.shape[0] // 2)  # bags smaller than 2k use what they have
        if k == 0:
            return h.new_zeros(())
        top_i, bottom_i = torch.topk(a, k).indices, torch.topk(-a, k).indices
        target = torch.cat([h.new_ones(k), h.new_zeros(k)]).long()
        label = torch.as_tensor(label, device=h.device)
        losses = []
        for c, clf in enumerate(self.instance_classifiers):
            # in-class: top-k positive, bottom-k negative; out-of-class (CLAM's
            # subtyping=False default for binary): top-k negative. Both are computed and one is
            # selected on the device, so a step never waits for the label on the host (the
            # other gets exact zero gradients: results equal the branching version's).
            top = h[top_i]
            inside = F.cross_entropy(clf(torch.cat([top, h[bottom_i]])).float(), target)
            outside = F.cross_entropy(clf(top).float(), target[k:])
            losses.append(torch.where(label == c, inside, outside))
        return torch.stack(losses).mean()

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> MILOutput:
        h, a, m = self.pool(x)
        inst = None if label is None else self._instance_loss(h, a.detach(), label)
        return MILOutput(self.classifier(m), a, inst)


class PoolMIL(nn.Module):
    """Mean- or max-pooling baselines; attention is uniform (mean) or one-hot at the max tile."""

    def __init__(self, in_dim: int, n_classes: int, cfg: ModelConfig, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.embed = _embed(in_dim, cfg.hidden_dim, cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden_dim, n_classes)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> MILOutput:
        h = self.embed(x)
        n = h.shape[0]
        if self.mode == "mean":
            return MILOutput(self.classifier(h.mean(0)), h.new_full((n,), 1.0 / n).float())
        scores = self.classifier(h)  # [N, C]: the bag logit per class is its max instance
        logits = scores.max(0).values
        # one-hot by comparison: indexing with a device tensor would wait for it on the host
        a = (torch.arange(n, device=h.device) == scores[:, -1].argmax()).float()
        return MILOutput(logits, a)


MODELS = ("gated_attention", "clam_sb", "mean", "max")


def feature_norm(model: nn.Module) -> FeatureNorm:
    """The input standardisation layer of any model built here."""
    return model.embed[0]


def build_model(cfg: ModelConfig, in_dim: int, n_classes: int) -> nn.Module:
    """Model by name (model.name)."""
    if cfg.name == "gated_attention":
        return GatedAttentionMIL(in_dim, n_classes, cfg)
    if cfg.name == "clam_sb":
        return ClamSB(in_dim, n_classes, cfg)
    if cfg.name in ("mean", "max"):
        return PoolMIL(in_dim, n_classes, cfg, cfg.name)
    raise UserError(f"model.name={cfg.name!r} is not one of {MODELS}.")
