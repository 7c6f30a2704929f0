"""TransMIL (Shao et al. 2021): two Nystrom self-attention layers with a class token and a
pyramid position encoding generator (PPEG) between them.

Tiles are embedded (D -> hidden_dim), padded to a square by repeating the first tiles, prefixed
with a class token, passed through attention layer 1, PPEG (7/5/3 depthwise convolutions over
the tiles laid out row by row on the square), attention layer 2, LayerNorm; the class token's
output is classified. Heads = 8, landmarks = hidden_dim / 2, 6 pseudo-inverse iterations and a
33-tap depthwise residual convolution over the values, as the official model.

Memory is linear in the number of tiles: each Nystrom product softmax(Q K~^T) W is computed
as a scaled-dot-product attention (a fused kernel: no [N, landmarks] matrix is materialised),
so a 100,000-tile bag needs a few [N, hidden_dim] activations (see benchmarks/README.md).
Attention math (landmarks, softmax, pseudo-inverse) runs in float32 under autocast.
attention: the exact softmax attention of the class token over the tiles in layer 2 (mean over
heads), a padding copy's share added to its tile; sums to 1.

Deviations from szc19990412/TransMIL (which uses lucidrains' nystrom-attention): landmarks are
means of m contiguous groups of nearly equal size, without zero-padding the sequence to a
multiple of m (the zero tokens took part in the softmax there); bags with at most m tokens use
exact softmax attention (what Nystrom gives with one token per landmark); the pseudo-inverse is
initialised per head; the tile embedding has FeatureNorm and ``model.dropout`` like every
model here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from melanoma_mil.config import ModelConfig
from melanoma_mil.models.common import Dropout, MILOutput, embed, embed_tiles

HEADS = 8
PINV_ITERATIONS = 6
RESIDUAL_KERNEL = 33
ATTENTION_DROPOUT = 0.1


def pinv(a: torch.Tensor, iterations: int = PINV_ITERATIONS) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of [..., m, m] by Newton-Schulz iterations (Nystromformer)."""
    scale = a.abs().sum(-1).amax(-1, keepdim=True) * a.abs().sum(-2).amax(-1, keepdim=True)
    z = a.transpose(-1, -2) / scale[..., None]
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def landmarks(t: torch.Tensor, m: int) -> torch.Tensor:
    """Means of m contiguous, nearly equal groups of the sequence: [h, n, d] -> [h, m, d]."""
    n = t.shape[1]
    group = torch.arange(n, device=t.device) * m // n
    sums = t.new_zeros(t.shape[0], m, t.shape[2]).index_add_(1, group, t)
    return sums / torch.bincount(group, minlength=m).to(t.dtype)[None, :, None]


class NystromAttention(nn.Module):
    def __init__(self, dim: int, n_landmarks: int) -> None:
        super().__init__()
        self.m = max(1, n_landmarks)
        self.pinv_iterations = PINV_ITERATIONS
        self.inner = HEADS * max(1, dim // HEADS)  # heads x dim_head, dim_head = dim // 8
        self.to_qkv = nn.Linear(dim, 3 * self.inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(self.inner, dim), Dropout(ATTENTION_DROPOUT))
        pad = RESIDUAL_KERNEL // 2
        self.res_conv = nn.Conv2d(
            HEADS, HEADS, (RESIDUAL_KERNEL, 1), padding=(pad, 0), groups=HEADS, bias=False
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, dim] -> (output [n, dim], the first token's exact attention [n], float32)."""
        n = x.shape[0]
        q, k, v = self.to_qkv(x).view(n, 3, HEADS, -1).permute(1, 2, 0, 3)
        with torch.autocast(x.device.type, enabled=False):
            q, k, v = q.float(), k.float(), v.float()
            if n <= self.m:  # one token per landmark: Nystrom is exact attention
                out = F.scaled_dot_product_attention(q, k, v)
            else:
                q_l, k_l = landmarks(q, self.m), landmarks(k, self.m)
                scale = 1.0 / math.sqrt(q.shape[-1])
                kernel = torch.softmax(q_l @ k_l.transpose(-1, -2) * scale, dim=-1)  # [h, m, m]
                kv = F.scaled_dot_product_attention(q_l, k, v)  # [h, m, d]
                values = pinv(kernel, self.pinv_iterations) @ kv
                out = F.scaled_dot_product_attention(q, k_l, values)  # [h, n, d]
            out = out + self.res_conv(v[None])[0]
            with torch.no_grad():
                first = torch.softmax(q[:, :1] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
        out = out.transpose(0, 1).reshape(n, self.inner).to(x.dtype)
        return self.to_out(out), first[:, 0].mean(0)


class TransLayer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, dim // 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, first = self.attn(self.norm(x))
        return x + out, first


class PPEG(nn.Module):
    """Depthwise 7/5/3 convolutions over the tiles on a side x side grid, plus identity."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        cls, tiles = x[:1], x[1:]
        grid = tiles.T.reshape(1, -1, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.flatten(2)[0].T])


class TransMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, cfg: ModelConfig) -> None:
        super().__init__()
        dim = cfg.hidden_dim
        self.embed = embed(in_dim, dim, cfg.dropout)
        self.cls_token = nn.Parameter(torch.randn(1, dim))
        self.layer1 = TransLayer(dim)
        self.ppeg = PPEG(dim)
        self.layer2 = TransLayer(dim)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> MILOutput:
        h = embed_tiles(self.embed, x)
        n = h.shape[0]
        side = math.ceil(math.sqrt(n))
        pad = side * side - n  # <= n for every n >= 1
        tokens = torch.cat([self.cls_token.to(h.dtype), h, h[:pad]])
        tokens, _ = self.layer1(tokens)
        tokens, first = self.layer2(self.ppeg(tokens, side))
        logits = self.classifier(self.norm(tokens[0]))
        a = first[1:]  # the class token's attention over the tiles and their padding copies
        a = torch.cat([a[:pad] + a[n:], a[pad:n]]) if pad else a
        return MILOutput(logits, a / a.sum())
