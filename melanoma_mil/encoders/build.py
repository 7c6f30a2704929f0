"""Build an encoder from its registry entry: module (eval), batched transform, dim, provenance.

Weights come from exactly one declared source: a local file (``encoder.weights``), the hub /
HF cache (``encoder.pretrained=true``), or a seeded random init (``pretrained=false``, recorded
as "random"). Nothing ever falls back silently from pretrained to random.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from melanoma_mil.config import EncoderConfig
from melanoma_mil.encoders.hub import create, hub_id, hub_model, hub_snapshot, refuse_hubless
from melanoma_mil.encoders.registry import EncoderSpec, get_spec
from melanoma_mil.encoders.weights import check_weights_path, load_into, read_weights_file
from melanoma_mil.errors import UserError
from melanoma_mil.io import sha256_file

log = logging.getLogger(__name__)

RANDOM = "random"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class RandomEncoderWarning(UserWarning):
    """Features came from an encoder with random weights: fine for tests, not for results."""


@dataclass(frozen=True)
class TileTransform:
    """Batched uint8 [B, 3, H, W] -> normalised float32 [B, 3, h, w] (channels_last storage).

    One interpolation goes straight from the pixels read to the encoder's input size, so a tile
    read at a finer pyramid level is not resized twice. Normalisation runs on [B, h, w*3] rows
    (per-channel constants tiled along the row) so it vectorises over contiguous NHWC memory,
    and may write into a reused ``out`` buffer: on CPU, fresh 50 MB batches cost more in page
    faults than the arithmetic itself.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int | None = None  # None: keep the tile size (CNNs)
    crop: int | None = None
    interpolation: str = "bilinear"

    def input_size(self, tile_size: int) -> int:
        side = self.resize or tile_size
        return min(self.crop, side) if self.crop else side

    def __call__(
        self, x: torch.Tensor, tile_size: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        side = self.resize or tile_size
        if x.shape[-1] != side or x.shape[-2] != side:
            x = F.interpolate(  # antialiased resampling has no reduced-precision CPU kernels
                x.float(), size=(side, side), mode=self.interpolation, antialias=True
            )
        if self.crop and self.crop < side:
            o = (side - self.crop) // 2
            x = x[..., o : o + self.crop, o : o + self.crop]
        b, _, h, w = x.shape
        rows = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        if out is None or out.shape != x.shape or out.device != x.device:
            out = torch.empty(x.shape, device=x.device, memory_format=torch.channels_last)
        std = torch.tensor(self.std, device=out.device) * 255
        mean = torch.tensor(self.mean, device=out.device) * 255
        out_rows = out.permute(0, 2, 3, 1).view(b, h, w * 3)
        out_rows.copy_(rows.reshape(b, h, w * 3))
        out_rows.mul_((1.0 / std).repeat(w)).sub_((mean / std).repeat(w))
        return out

    def to_json(self) -> str:
        return json.dumps(
            {
                "resize": self.resize,
                "crop": self.crop,
                "interpolation": self.interpolation,
                "mean": list(self.mean),
                "std": list(self.std),
            },
            sort_keys=True,
        )


class _ClsToken(nn.Module):
    """Class token of a ViT that returns its whole token sequence (Virchow2: global_pool=''),
    with ``patch_mean`` joined by the mean of its patch tokens (register tokens left out)."""

    def __init__(self, vit: nn.Module, patch_mean: bool = False) -> None:
        super().__init__()
        self.vit = vit
        self.patch_mean = patch_mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit(x)
        if not self.patch_mean:
            return tokens[:, 0]
        patches = tokens[:, int(getattr(self.vit, "num_prefix_tokens", 1)) :]
        return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)


@dataclass
class Encoder:
    """A ready encoder: ``module(transform(tiles))`` -> [B, dim] features."""

    name: str
    module: nn.Module
    transform: TileTransform
    dim: int
    spec: EncoderSpec
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    _buffer: torch.Tensor | None = field(default=None, init=False, repr=False)

    @torch.inference_mode()
    def encode(self, tiles: torch.Tensor, tile_size: int, precision: str = "fp32") -> torch.Tensor:
        """uint8 tiles [B, 3, H, W] -> float32 features [B, dim] (the extraction forward path)."""
        x = tiles.to(self.device, non_blocking=True)
        self._buffer = x = self.transform(x, tile_size, out=self._buffer)
        with autocast(self.device, precision):
            return self.module(x).float()

    def low_precision_weights(self, precision: str, tile_size: int) -> bool:
        """Store the Linear/Conv weights in ``precision`` (bf16/fp16) once, instead of autocast
        casting them at every batch, where the encoder allows it: kept only if two probe tiles
        give bit-identical features (autocast casts these weights to that dtype anyway)."""
        if precision not in ("bf16", "fp16") or self.device.type == "meta":
            return False
        gen = torch.Generator().manual_seed(0)
        shape = (2, 3, tile_size, tile_size)
        probe = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        probe = probe.contiguous(memory_format=torch.channels_last)
        before = self.encode(probe, tile_size, precision)
        layers = [m for m in self.module.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
        saved = [(m.weight.data, None if m.bias is None else m.bias.data) for m in layers]
        for m in layers:
            m.to(_DTYPES[precision])
        if torch.equal(before, self.encode(probe, tile_size, precision)):
            return True
        for m, (w, b) in zip(layers, saved, strict=True):
            m.weight.data = w
            if b is not None:
                m.bias.data = b
        return False


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Mixed-precision context for ``precision`` (no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def cpu_has_bf16() -> bool:
    """Native bf16 matmul on this CPU (AVX512-BF16 / AMX); without it bf16 is slower than fp32."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(torch.backends.mkldnn.is_available() and check is not None and check())
    except RuntimeError:
        return False


def resolve_precision(requested: str, spec: EncoderSpec, device: torch.device) -> str:
    """'auto' -> the encoder's preferred dtype where the hardware runs it fast, else fp32."""
    if requested != "auto":
        if requested not in _DTYPES:
            raise UserError(f"precision '{requested}' unknown; use auto, fp32, bf16 or fp16.")
        return requested
    if spec.precision == "fp32":
        return "fp32"
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        return spec.precision if spec.precision == "fp16" or bf16_ok else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


@contextlib.contextmanager
def _seeded(seed: int = 0) -> Iterator[None]:
    """Random init identical in every process (ranks, reruns): a 'random' cache is reproducible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _trunk(model: nn.Module, spec: EncoderSpec) -> nn.Module:
    """The backbone whose keys a checkpoint holds (CLAM's net drops the ResNet's last stage)."""
    if spec.trunk == "layer3":
        model.layer4 = nn.Identity()  # type: ignore[assignment]
    return model


def _pooled(model: nn.Module, spec: EncoderSpec) -> nn.Module:
    """Add the pooling wrapper after any load: it renames keys, so weights go in before it."""
    if spec.pooling in ("cls", "cls_mean") and spec.kwargs.get("global_pool") == "":
        return _ClsToken(model, patch_mean=spec.pooling == "cls_mean")
    return model


def _cut(model: nn.Module, spec: EncoderSpec) -> nn.Module:
    """Trunk and pooling for models that carry no local weights (random, meta, hub)."""
    return _pooled(_trunk(model, spec), spec)


def _uninitialised(spec: EncoderSpec) -> nn.Module:
    """The trunk with allocated but uninitialised tensors, for a strict full load.

    Skips the random init (tens of seconds for 1B-param ViTs). Only safe when every buffer is
    persistent, i.e. comes from the checkpoint; otherwise the module is initialised normally.
    """
    with torch.device("meta"):
        model = _trunk(create(spec, pretrained_hub=False), spec)
    persistent = set(model.state_dict())
    if all(name in persistent for name, _ in model.named_buffers()):
        return model.to_empty(device="cpu")
    with _seeded():
        return _trunk(create(spec, pretrained_hub=False), spec)


def load_trunk(
    spec: EncoderSpec, trunk: nn.Module, sd: Mapping[str, torch.Tensor], path: Path
) -> tuple[nn.Module, str]:
    """Load ``sd`` strictly into the bare ``trunk``, then pool; return it and the prefix cut."""
    prefix = load_into(trunk, sd, path, spec.name, spec.ignore_keys)
    return _pooled(trunk, spec), prefix


@functools.lru_cache(maxsize=4)
def _weights_sha256(path: Path, size: int, mtime_ns: int) -> str:
    """`sha256_file` once per process and file version: `encoder_identity`, then the build."""
    return sha256_file(path)


def _transform(spec: EncoderSpec) -> TileTransform:
    return TileTransform(spec.mean, spec.std, spec.resize, spec.crop, spec.interpolation)


def encoder_identity(cfg: EncoderConfig) -> dict[str, Any]:
    """The provenance fields that name ``cfg``'s features (their cache key), without building
    the encoder (no weights loaded or downloaded): a command refuses its folders before that.
    A bad name, weights path or hub-less pretrained encoder is refused here."""
    spec = get_spec(cfg.name)
    weights_id = RANDOM
    if cfg.weights:
        path = check_weights_path(Path(cfg.weights).expanduser())
        stat = path.stat()
        weights_id = _weights_sha256(path.resolve(), stat.st_size, stat.st_mtime_ns)
    elif cfg.pretrained:
        refuse_hubless(spec)
        weights_id = f"hub:{hub_id(spec)}"
    return {
        "encoder": spec.name,
        "encoder_weights": weights_id,
        "encoder_pretrained": weights_id != RANDOM,
        "embed_dim": spec.dim,
        "transform": _transform(spec).to_json(),
        "encoder_arch": spec.arch,
        "encoder_pooling": spec.pooling,
    }


def build_encoder(cfg: EncoderConfig, device: str | torch.device = "cpu") -> Encoder:
    """Build ``cfg.name`` with its declared weights; ``device='meta'`` builds shapes only."""
    spec = get_spec(cfg.name)
    device = torch.device(device)
    if device.type == "meta" and (cfg.weights or cfg.pretrained):
        raise UserError("a meta-device encoder has no weights: use pretrained=false.")
    identity = encoder_identity(cfg)
    snapshot: dict[str, str] = {}
    if device.type == "meta":
        with torch.device("meta"):
            model = _cut(create(spec, pretrained_hub=False), spec)
    elif cfg.weights:
        path = Path(cfg.weights).expanduser()
        sd = read_weights_file(path, cfg.trust_weights)
        model, prefix = load_trunk(spec, _uninitialised(spec), sd, path)
        log.info("encoder %s: weights %s (prefix '%s' stripped)", spec.name, path, prefix)
    elif cfg.pretrained:
        raw = hub_model(spec)
        snapshot = hub_snapshot(spec)
        model = _cut(raw, spec)
    else:
        with _seeded():
            model = _cut(create(spec, pretrained_hub=False), spec)
        log.warning(
            "encoder %s has RANDOM weights (pretrained=false): features are for tests and "
            "demos only.",
            spec.name,
        )
    model = model.eval().requires_grad_(False)
    if device.type != "meta":
        model = model.to(device=device, memory_format=torch.channels_last)
    provenance: dict[str, Any] = {**identity, "encoder_license": spec.license, **snapshot}
    if cfg.weights:
        provenance["encoder_weights_file"] = str(Path(cfg.weights).expanduser().resolve())
    return Encoder(spec.name, model, _transform(spec), spec.dim, spec, provenance)


def warn_if_random(attrs: Mapping[str, Any], where: str = "the feature cache") -> bool:
    """Warn (RandomEncoderWarning) when ``attrs`` say the features came from random weights.

    ``fit`` calls this with a feature file's attrs, so a model trained on a random-encoder cache
    (e.g. a forgotten pretrained=false) is flagged in the log instead of passing silently.
    """
    weights = attrs.get("encoder_weights")
    if isinstance(weights, bytes):
        weights = weights.decode()
    if weights != RANDOM:
        return False
    warnings.warn(
        f"{where} was extracted with a randomly initialised encoder "
        f"('{attrs.get('encoder', '?')}', encoder.pretrained=false): results do not reflect a "
        "pretrained representation. Re-run `extract` with pretrained weights for real experiments.",
        RandomEncoderWarning,
        stacklevel=2,
    )
    return True
