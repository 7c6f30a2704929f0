"""Load a local weights file into an encoder, strictly: every backbone tensor must come from it.

Checkpoints arrive as plain state dicts, Lightning / SimCLR / DINO checkpoints (``state_dict``,
``model``, ``teacher`` ...), safetensors, or HF-transformers ViTs. The key prefix (``module.``,
``model.resnet.``, ``backbone.`` ...) is found by matching against the model's own keys rather
than from a fixed list, so new wrappers work too. A silent partial load would give features from
a half-random network, so any missing, unexpected or mis-shaped key is a UserError.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from melanoma_mil.errors import UserError

log = logging.getLogger(__name__)

_NESTED = ("state_dict", "model", "teacher", "model_state_dict", "module", "net", "encoder")
_EXTRA_BUFFERS = ("num_batches_tracked",)  # absent from some checkpoints, harmless at eval


def check_weights_path(path: Path) -> Path:
    """``path``, refused unless it is a file (a folder: e.g. a downloaded model repository)."""
    if path.is_dir():
        raise UserError(
            f"encoder.weights '{path}' is a folder: pass the weights file in it (e.g. its "
            "model.safetensors or pytorch_model.bin)."
        )
    if not path.is_file():
        raise UserError(f"encoder.weights '{path}' not found: check the path.")
    return path


def read_weights_file(path: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """The tensor dict inside a weights file (safetensors, torch state dict or checkpoint).
    Pickled objects beside the tensors are loaded only when ``trust``: unpickling a file runs
    code it names, and weights are often downloaded from strangers."""
    check_weights_path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                # Lightning checkpoints pickle hyper-parameter objects next to the tensors.
                if not re.search(r"GLOBAL \S+", str(e)):
                    raise  # not a refused object: a damaged or foreign file (below)
                if not trust:
                    raise UserError(
                        f"encoder.weights '{path}' stores pickled Python objects besides tensors "
                        f"({_pickled(e)}); loading them runs code from the file: pass "
                        "encoder.trust_weights=true if you trust it, or save its state dict "
                        "alone (or as .safetensors) and pass that."
                    ) from None
                log.warning("%s stores pickled objects; loading it fully (trusted).", path)
                obj = torch.load(path, map_location="cpu", weights_only=False)
    except UserError:
        raise
    except Exception as e:  # corrupt zip, truncated file, unknown pickle class...
        raise UserError(
            f"encoder.weights '{path}' is not a readable weights file ({type(e).__name__}: "
            f"{_reason(e)}); pass a .pt/.pth/.ckpt/.bin state dict or a .safetensors file."
        ) from None
    sd = _unwrap(obj)
    if not sd:
        raise UserError(
            f"encoder.weights '{path}' holds no tensors (top-level keys: "
            f"{list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__}); "
            "pass a state dict or a checkpoint with a 'state_dict' entry."
        )
    try:
        return _from_hf_vit(sd)
    except KeyError as e:  # transformers' Dinov2Model, ViTMAE, ... name their tensors otherwise
        raise UserError(
            f"encoder.weights '{path}' has HF-transformers keys but not the ViT layout (no "
            f"{e}): only transformers' ViTModel layout (e.g. owkin/phikon) is converted; export "
            "a timm state dict of the model instead."
        ) from None


def _reason(e: Exception) -> str:
    """One line of a load error: torch's weights-only messages put the cause among advice."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    cause = [x for x in lines if x.startswith("Unsupported")]
    return (cause or lines or ["empty or truncated file"])[0][:200]


def _pickled(e: Exception) -> str:
    """The object torch's weights-only load refused (its message is pages of advice)."""
    found = re.search(r"GLOBAL (\S+)", str(e))
    return f"e.g. {found[1] if found else '?'}"


def _tensors(d: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}


def _unwrap(obj: Any) -> dict[str, torch.Tensor]:
    """Descend into checkpoint wrappers until the mapping is mostly tensors."""
    while isinstance(obj, Mapping):
        tensors = _tensors(obj)
        if len(tensors) >= max(1, len(obj) // 2):
            return tensors
        inner = next((obj[k] for k in _NESTED if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            return tensors
        obj = inner
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    return {}


def _from_hf_vit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF-transformers ViT keys (e.g. owkin/phikon) -> timm VisionTransformer keys; KeyError
    for another HF layout (the caller names the file)."""
    anchor = "embeddings.patch_embeddings.projection.weight"
    base = next((k[: -len(anchor)] for k in sd if k.endswith(anchor)), None)
    if base is None:
        return sd
    g = {k[len(base) :]: v for k, v in sd.items() if k.startswith(base)}
    out = {
        "cls_token": g["embeddings.cls_token"],
        "pos_embed": g["embeddings.position_embeddings"],
        "patch_embed.proj.weight": g[anchor],
        "patch_embed.proj.bias": g["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": g["layernorm.weight"],
        "norm.bias": g["layernorm.bias"],
    }
    names = {
        "layernorm_before": "norm1",
        "attention.output.dense": "attn.proj",
        "layernorm_after": "norm2",
        "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2",
    }
    n_layers = 1 + max(int(k.split(".")[2]) for k in g if k.startswith("encoder.layer."))
    for i in range(n_layers):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            qkv = [g[f"{src}attention.attention.{n}.{p}"] for n in ("query", "key", "value")]
            out[f"{dst}attn.qkv.{p}"] = torch.cat(qkv)
            for a, b in names.items():
                out[f"{dst}{b}.{p}"] = g[f"{src}{a}.{p}"]
    return out


def _best_prefix(keys: Iterable[str], targets: set[str], path: Path) -> str:
    """The wrapper prefix under which most of the model's keys appear ('' if none needed).

    A tie between full copies (DINO's ``student.backbone.`` and ``teacher.backbone.``) goes to
    the one under ``teacher``, the network DINO-style training evaluates and releases; any other
    tie is a UserError listing the prefixes, since picking one would be a guess.
    """
    votes: Counter[str] = Counter()
    for k in keys:
        for i in [0] + [j + 1 for j, c in enumerate(k) if c == "."]:
            if k[i:] in targets:
                votes[k[:i]] += 1
                break
    if not votes:
        return ""
    best = max(votes.values())
    tied = sorted(p for p, n in votes.items() if n == best)
    teacher = [p for p in tied if "teacher" in p.split(".")]
    if len(tied) == 1:
        return tied[0]
    if len(teacher) == 1:
        return teacher[0]
    raise UserError(
        f"encoder.weights '{path}' holds the whole backbone under each of {tied}: export the "
        "state dict of the copy you mean (its keys without the prefix)."
    )


def _sample(keys: Iterable[str], n: int = 4) -> str:
    ks = sorted(keys)
    return ", ".join(ks[:n]) + (f" (+{len(ks) - n} more)" if len(ks) > n else "")


def load_into(
    model: nn.Module, sd: Mapping[str, torch.Tensor], path: Path, name: str, ignore: Iterable[str]
) -> str:
    """Load ``sd`` into ``model`` strictly (after prefix stripping); return the stripped prefix."""
    own = model.state_dict()
    targets = set(own)
    prefix = _best_prefix(sd, targets, path)
    stripped = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    ignore = tuple(ignore)
    unexpected = [k for k in stripped if k not in targets and not k.startswith(ignore)]
    missing = [k for k in targets if k not in stripped and not k.endswith(_EXTRA_BUFFERS)]
    shapes = [
        f"{k} {tuple(stripped[k].shape)} vs {tuple(own[k].shape)}"
        for k in targets & set(stripped)
        if stripped[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)}/{len(targets)} model keys missing ({_sample(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_sample(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches ({_sample(shapes, 2)})")
        raise UserError(
            f"encoder.weights '{path}' does not fit encoder '{name}' (key prefix "
            f"'{prefix}' stripped): {'; '.join(parts)}. Pick the encoder.name this checkpoint "
            "was trained as, or export its backbone state dict."
        )
    model.load_state_dict({k: v for k, v in stripped.items() if k in targets}, strict=False)
    for k in targets - set(stripped):  # only counters such as BatchNorm's num_batches_tracked
        own[k].zero_()
    return prefix
