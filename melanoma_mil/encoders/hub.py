"""Where an encoder's model comes from: timm's architecture, with its pretrained weights from
the Hugging Face hub (or its HF cache) when asked; which hub revision and weight blob they were;
and, before any download, whether they can come at all (refused in one line with the fix)."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from torch import nn

from melanoma_mil.encoders.registry import EncoderSpec
from melanoma_mil.errors import UserError


def create(spec: EncoderSpec, pretrained_hub: bool) -> nn.Module:
    """timm's model of ``spec``, randomly initialised, or with its hub weights (downloaded into
    the HF cache, or read from it)."""
    import timm

    kwargs = dict(spec.kwargs)
    if not pretrained_hub:
        return timm.create_model(spec.arch, pretrained=False, **kwargs)
    source = spec.hub if spec.hub and spec.hub != "timm" else spec.arch
    return timm.create_model(source, pretrained=True, **kwargs)


def hub_id(spec: EncoderSpec) -> str:
    """The hub weights' id, from timm's pretrained config of the model `create` builds (the
    one that model records), so it is known before they are downloaded."""
    if spec.hub and spec.hub.startswith("hf-hub:"):
        return spec.hub.split(":", 1)[1]
    import timm

    cfg = timm.models.get_pretrained_cfg(spec.hub if spec.hub and spec.hub != "timm" else spec.arch)
    return str(getattr(cfg, "hf_hub_id", None) or getattr(cfg, "url", None) or spec.arch)


_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
_WEIGHT_BLOBS = ("model.safetensors", "pytorch_model.bin")  # timm's order of preference
_WEIGHT_FILES = ("config.json", *_WEIGHT_BLOBS)


def _hub_repo(spec: EncoderSpec) -> str | None:
    if spec.hub and spec.hub.startswith("hf-hub:"):
        return spec.hub.split(":", 1)[1]
    import timm

    cfg = timm.models.get_pretrained_cfg(spec.arch)
    return getattr(cfg, "hf_hub_id", None) or None


def hub_snapshot(spec: EncoderSpec) -> dict[str, str]:
    """The HF-cache revision (commit) and weight blob (sha256) the hub weights were loaded from.

    A hub repository can be updated under the same name, so these record which weights made a
    cache's features. Provenance only: in the identity they would change every hub cache key.
    """
    from huggingface_hub import try_to_load_from_cache

    repo = _hub_repo(spec)
    for name in _WEIGHT_BLOBS if repo else ():
        path = try_to_load_from_cache(repo, name)
        if isinstance(path, str):
            blob = Path(os.path.realpath(path)).name  # an LFS blob is named by its sha256
            sha = {"encoder_weights_sha256": blob} if re.fullmatch("[0-9a-f]{64}", blob) else {}
            return {"encoder_hub_revision": Path(path).parent.name, **sha}
    return {}


def _hub_unreachable(spec: EncoderSpec) -> str:
    """Why the hub weights cannot come at all (none cached, hub host unreachable), or "".

    Offline (a cluster's compute node) huggingface_hub retries for ~30 s before failing the same
    way; a 3-s connection probe says so at once. Skipped behind a proxy, which a probe would miss.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    repo = _hub_repo(spec)
    if repo is None or constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in _PROXY_VARS):
        return ""
    if any(isinstance(try_to_load_from_cache(repo, f), str) for f in _WEIGHT_FILES):
        return ""
    url = urlparse(constants.ENDPOINT)  # HF_ENDPOINT may name a mirror on its own port
    host = url.hostname or "huggingface.co"
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
        socket.create_connection((host, port), timeout=3).close()
    except OSError as e:
        return f"{host} cannot be reached ({e}) and {repo} is not in the HF cache"
    return ""


def refuse_hubless(spec: EncoderSpec) -> None:
    """Refuse pretrained weights from the hub for an encoder that has none there."""
    if spec.hub is None:
        raise UserError(
            f"encoder '{spec.name}' has no hub copy of its weights: download them from "
            f"{spec.weights_url} and pass encoder.weights=PATH (or encoder.pretrained=false "
            "for random weights, tests only)."
        )


def hub_model(spec: EncoderSpec) -> nn.Module:
    refuse_hubless(spec)
    gated = " (gated: accept its terms on huggingface.co, set HF_TOKEN)" if spec.gated else ""
    offline = _hub_unreachable(spec)
    if offline:
        raise UserError(
            f"encoder '{spec.name}': could not get pretrained weights from {spec.hub}{gated}: "
            f"{offline}. Download them on a machine with internet (they land in the HF cache; "
            "copy it here and set HF_HOME), or pass encoder.weights=PATH to a local file."
        )
    try:
        return create(spec, pretrained_hub=True)
    except Exception as e:  # network, gated repo, offline cache miss, bad token...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"encoder '{spec.name}': could not get pretrained weights from {spec.hub}{gated}: "
            f"{reason[:200]}. Pass encoder.weights=PATH to a local file, or "
            "encoder.pretrained=false for random weights."
        ) from None
