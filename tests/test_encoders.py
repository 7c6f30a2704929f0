"""Encoder registry: every entry's dim, strict local-weights loading, no silent random weights."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import CMU
from safetensors.torch import save_file

from melanoma_mil.config import EncoderConfig
from melanoma_mil.encoders import (
    REGISTRY,
    RandomEncoderWarning,
    build_encoder,
    get_spec,
    warn_if_random,
)
from melanoma_mil.encoders.build import _pooled, load_trunk
from melanoma_mil.errors import UserError
from melanoma_mil.io import sha256_file

# Above this size, random init + a CPU forward costs seconds to minutes per model (Phikon 86M,
# UNI 0.3B, UNI2-h / Virchow2 ~0.65B, H-optimus-0 / GigaPath 1.1B params).
REAL_BUILD_MAX_PARAMS = 50e6


def _quick_random(arch: str, seed: int) -> torch.nn.Module:
    """A timm model with N(0, 0.02) weights: skips timm's slow truncated-normal init."""
    with torch.device("meta"):
        model = timm.create_model(arch, num_classes=0)
    model = model.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.normal_(0, 0.02, generator=gen)
    return model


def _tile() -> torch.Tensor:
    """One real H&E tile (uint8 [1, 3, 256, 256]) from the CMU slide, else a synthetic one."""
    if CMU.is_file():
        import openslide

        with openslide.OpenSlide(str(CMU)) as s:
            rgb = np.asarray(s.read_region((800, 1200), 0, (256, 256)).convert("RGB"))
    else:
        rgb = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_entry_builds_with_random_weights_and_yields_its_dim(name: str) -> None:
    """Small entries run a real forward on a real tile. Entries over 50M params are built on the
    meta device (same code path: architecture, kwargs, pooling wrapper, transform) and run on a
    meta tensor of the transformed tile's shape, which checks the output dim without spending a
    minute and ~5 GB on random init; their real forward is the extract path the GPU lead times.
    """
    cfg = EncoderConfig(name=name, pretrained=False)
    meta = build_encoder(cfg, device="meta")
    tile = _tile()
    x = meta.transform(tile.to("meta"), 256)
    side = meta.transform.input_size(256)
    assert tuple(x.shape) == (1, 3, side, side)
    n_params = sum(p.numel() for p in meta.module.parameters())
    if n_params > REAL_BUILD_MAX_PARAMS:
        out = meta.module(x)
        assert tuple(out.shape) == (1, REGISTRY[name].dim)
        return
    enc = build_encoder(cfg)
    feats = enc.encode(tile, 256, "fp32")
    assert feats.shape == (1, REGISTRY[name].dim) == (1, enc.dim)
    assert torch.isfinite(feats).all() and feats.std() > 0
    assert enc.provenance["encoder_weights"] == "random"
    assert enc.provenance["encoder_pretrained"] is False


def test_random_init_is_reproducible_and_timm_names_work() -> None:
    a = build_encoder(EncoderConfig(name="timm:resnet10t", pretrained=False))
    b = build_encoder(EncoderConfig(name="timm:resnet10t", pretrained=False))
    tile = _tile()
    assert a.dim == timm.create_model("resnet10t", num_classes=0).num_features
    assert torch.equal(a.encode(tile, 256), b.encode(tile, 256))
    with pytest.raises(UserError, match="timm:resnet18"):
        get_spec("timm:resnet18x")
    with pytest.raises(UserError, match="resnet18_imagenet"):
        get_spec("resnet18_imagenet_")


def _ciga_layout(model: torch.nn.Module) -> dict[str, object]:
    """A Lightning checkpoint as Ciga et al. released it: backbone under model.resnet., plus the
    SimCLR projection head (fc.1 / fc.3) and training state the encoder must ignore."""
    sd = {f"model.resnet.{k}": v for k, v in model.state_dict().items()}
    sd["model.resnet.fc.1.weight"] = torch.randn(512, 512)
    sd["model.resnet.fc.1.bias"] = torch.zeros(512)
    sd["model.resnet.fc.3.weight"] = torch.randn(128, 512)
    sd["model.resnet.fc.3.bias"] = torch.zeros(128)
    return {"epoch": 9, "global_step": 1000, "state_dict": sd, "optimizer_states": []}


def test_ciga_checkpoint_loads_and_changes_the_features(tmp_path: Path) -> None:
    torch.manual_seed(123)
    trained = timm.create_model("resnet18", num_classes=0).eval()
    ckpt = tmp_path / "tenpercent_resnet18.ckpt"
    torch.save(_ciga_layout(trained), ckpt)

    loaded = build_encoder(EncoderConfig(name="ciga_simclr_resnet18", weights=str(ckpt)))
    random = build_encoder(EncoderConfig(name="ciga_simclr_resnet18", pretrained=False))
    tile = _tile()
    f_loaded, f_random = loaded.encode(tile, 256), random.encode(tile, 256)
    with torch.no_grad():
        expected = trained(loaded.transform(tile, 256))
    torch.testing.assert_close(f_loaded, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(f_loaded, f_random, atol=1e-3)
    assert loaded.provenance["encoder_weights"] == sha256_file(ckpt)
    assert loaded.provenance["encoder_pretrained"] is True


class _Hostile:
    """Unpickling this runs code: it writes the file named in its state."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({str(self.target)!r}, 'w').write('ran')",))


def test_a_checkpoint_holding_pickled_objects_loads_only_when_trusted(tmp_path: Path) -> None:
    """A Lightning checkpoint pickles hyper-parameter objects; unpickling runs code the file
    names, so a weights file from a stranger is refused unless the user says it is trusted."""
    torch.manual_seed(123)
    trained = timm.create_model("resnet18", num_classes=0).eval()
    ran = tmp_path / "ran.txt"
    ckpt = tmp_path / "downloaded.ckpt"
    torch.save(_ciga_layout(trained) | {"hyper_parameters": _Hostile(ran)}, ckpt)
    cfg = EncoderConfig(name="ciga_simclr_resnet18", weights=str(ckpt))
    with pytest.raises(UserError) as err:
        build_encoder(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "encoder.trust_weights=true" in msg and str(ckpt) in msg, msg
    assert not ran.exists()  # nothing of the file ran
    trusted = build_encoder(replace(cfg, trust_weights=True))
    assert ran.read_text() == "ran"  # the user's call: the file is loaded fully
    assert trusted.provenance["encoder_weights"] == sha256_file(ckpt)


def test_safetensors_with_module_prefix_loads(tmp_path: Path) -> None:
    torch.manual_seed(7)
    src = timm.create_model("resnet18", num_classes=0).eval()
    path = tmp_path / "w.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in src.state_dict().items()}, path)
    enc = build_encoder(EncoderConfig(name="resnet18_imagenet", weights=str(path)))
    tile = _tile()
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(tile, 256), src(enc.transform(tile, 256)))


def test_hf_transformers_vit_layout_loads_into_phikon(tmp_path: Path) -> None:
    """owkin/phikon ships HF-transformers ViT keys; they map onto the timm ViT-B/16."""
    src = _quick_random("vit_base_patch16_224", seed=3)
    s = src.state_dict()
    hf = {
        "embeddings.cls_token": s["cls_token"],
        "embeddings.position_embeddings": s["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": s["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": s["patch_embed.proj.bias"],
        "layernorm.weight": s["norm.weight"],
        "layernorm.bias": s["norm.bias"],
    }
    parts = {
        "layernorm_before": "norm1",
        "attention.output.dense": "attn.proj",
        "layernorm_after": "norm2",
        "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2",
    }
    for i in range(12):
        for p in ("weight", "bias"):
            q, k, v = s[f"blocks.{i}.attn.qkv.{p}"].chunk(3)
            for n, t in (("query", q), ("key", k), ("value", v)):
                hf[f"encoder.layer.{i}.attention.attention.{n}.{p}"] = t
            for a, b in parts.items():
                hf[f"encoder.layer.{i}.{a}.{p}"] = s[f"blocks.{i}.{b}.{p}"]
    path = tmp_path / "phikon.bin"
    torch.save(hf, path)
    enc = build_encoder(EncoderConfig(name="phikon", weights=str(path)))
    tile = _tile()
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(tile, 256), src(enc.transform(tile, 256)))


def test_mismatched_checkpoint_fails_clearly(tmp_path: Path) -> None:
    wrong = tmp_path / "resnet50.pth"
    torch.save(timm.create_model("resnet50", num_classes=0).state_dict(), wrong)
    with pytest.raises(UserError) as err:
        build_encoder(EncoderConfig(name="ciga_simclr_resnet18", weights=str(wrong)))
    msg = str(err.value)
    assert str(wrong) in msg and "shape mismatches" in msg and "encoder.name" in msg
    assert "\n" not in msg

    partial = timm.create_model("resnet18", num_classes=0).state_dict()
    partial = {f"backbone.{k}": v for k, v in partial.items() if not k.startswith("layer4.")}
    cut = tmp_path / "partial.pt"
    torch.save({"model": partial}, cut)
    with pytest.raises(UserError, match=r"model keys missing \(layer4\.0"):
        build_encoder(EncoderConfig(name="resnet18_imagenet", weights=str(cut)))

    garbage = tmp_path / "garbage.pt"
    for junk in (b"not a checkpoint", bytes(range(256)) * 4, b""):
        garbage.write_bytes(junk)
        with pytest.raises(UserError, match="not a readable weights file") as err:
            build_encoder(EncoderConfig(name="resnet18_imagenet", weights=str(garbage)))
        assert "\n" not in str(err.value) and "weights_only" not in str(err.value), err.value
    with pytest.raises(UserError, match="not found"):
        build_encoder(EncoderConfig(name="resnet18_imagenet", weights=str(tmp_path / "no.pt")))
    (tmp_path / "uni").mkdir()  # a downloaded model repository, not its weights file
    with pytest.raises(UserError, match=r"is a folder: pass the weights file in it"):
        build_encoder(EncoderConfig(name="resnet18_imagenet", weights=str(tmp_path / "uni")))


def test_pretrained_without_a_hub_copy_asks_for_weights() -> None:
    with pytest.raises(UserError, match=r"encoder\.weights=PATH"):
        build_encoder(EncoderConfig(name="retccl_resnet50", pretrained=True))


def test_warn_if_random_flags_only_random_caches() -> None:
    with pytest.warns(RandomEncoderWarning, match="resnet18_imagenet"):
        assert warn_if_random({"encoder_weights": b"random", "encoder": "resnet18_imagenet"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_random({"encoder_weights": "hub:timm/resnet18.tv_in1k"})
        assert not warn_if_random({"encoder_weights": "ab" * 32})


def test_extract_help_lists_every_registry_name() -> None:
    from melanoma_mil.config import ExtractConfig

    assert all(name in (ExtractConfig.__doc__ or "") for name in REGISTRY)


def test_a_virchow2_checkpoint_loads_before_its_class_token_wrapper() -> None:
    """The hub layout (plain timm ViT keys) of the 632M-param model, on the meta device."""
    spec = get_spec("virchow2")
    with torch.device("meta"):
        hub_layout = timm.create_model(spec.arch, **spec.kwargs).state_dict()
        trunk = timm.create_model(spec.arch, **spec.kwargs)
    model, prefix = load_trunk(spec, trunk, hub_layout, Path("virchow2.bin"))
    assert prefix == ""
    out = model(torch.empty(1, 3, 224, 224, device="meta"))
    assert tuple(out.shape) == (1, spec.dim)


def test_virchow2_concat_joins_the_class_token_and_the_mean_patch_token() -> None:
    """The card's 2560-d embedding, register tokens left out of the mean; checked on the meta
    device at full size and with numbers on a small ViT of the same layout."""
    spec = get_spec("virchow2_concat")
    with torch.device("meta"):
        hub_layout = timm.create_model(spec.arch, **spec.kwargs).state_dict()
        trunk = timm.create_model(spec.arch, **spec.kwargs)
    model, _ = load_trunk(spec, trunk, hub_layout, Path("virchow2.bin"))
    assert tuple(model(torch.empty(1, 3, 224, 224, device="meta")).shape) == (1, 2560)

    small = {**spec.kwargs, "img_size": 32, "embed_dim": 16, "depth": 1, "num_heads": 2,
             "mlp_ratio": 4}  # fmt: skip
    vit = timm.create_model("vit_tiny_patch16_224", patch_size=8, **small).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = vit(x)  # [2, 1 class + 4 register + 16 patch tokens, 16]
        out = _pooled(vit, spec)(x)
    assert tokens.shape[1] == 21
    want = torch.cat([tokens[:, 0], tokens[:, 5:].mean(dim=1)], dim=-1)
    assert torch.equal(out, want)
    assert torch.equal(_pooled(vit, get_spec("virchow2"))(x), tokens[:, 0])


def test_a_timm_model_with_a_pre_logits_layer_records_its_output_width() -> None:
    """mobilenetv3_large_100: 960 trunk features, 1280 after its conv_head (what it outputs)."""
    enc = build_encoder(EncoderConfig(name="timm:mobilenetv3_large_100", pretrained=False))
    feats = enc.encode(_tile(), 256)
    assert feats.shape[1] == enc.dim == enc.provenance["embed_dim"] == 1280


def test_a_dino_checkpoint_loads_its_teacher_and_other_ties_are_refused(tmp_path: Path) -> None:
    """student.backbone.* and teacher.backbone.* both hold a full ResNet-18: the teacher loads."""
    own = timm.create_model("resnet18", num_classes=0).state_dict()
    copies = {"student.backbone.": 1.0, "teacher.backbone.": 2.0}
    sd = {
        prefix + k: torch.full_like(v, fill) if v.is_floating_point() else v
        for prefix, fill in copies.items()
        for k, v in own.items()
    }
    path = tmp_path / "dino.pth"
    torch.save({"model": sd, "iteration": 5}, path)
    enc = build_encoder(EncoderConfig(name="resnet18_imagenet", weights=str(path)))
    assert enc.module.conv1.weight.unique().tolist() == [2.0]
    twins = {f"{p}{k}": v for p in ("ema_a.", "ema_b.") for k, v in own.items()}
    torch.save(twins, path)
    with pytest.raises(UserError, match=r"\['ema_a\.', 'ema_b\.'\]: export the state dict"):
        build_encoder(EncoderConfig(name="resnet18_imagenet", weights=str(path)))


def test_an_hf_dinov2_checkpoint_is_refused_naming_the_layout(tmp_path: Path) -> None:
    """transformers' Dinov2Model keys (layer_scale, norm1, ...) are not the ViT layout converted."""
    shapes = {
        "embeddings.cls_token": (1, 1, 8),
        "embeddings.position_embeddings": (1, 5, 8),
        "embeddings.patch_embeddings.projection.weight": (8, 3, 14, 14),
        "embeddings.patch_embeddings.projection.bias": (8,),
        "encoder.layer.0.norm1.weight": (8,),
        "encoder.layer.0.layer_scale1.lambda1": (8,),
        "encoder.layer.0.attention.attention.query.weight": (8, 8),
        "encoder.layer.0.attention.attention.query.bias": (8,),
        "layernorm.weight": (8,),
        "layernorm.bias": (8,),
    }
    dinov2 = {k: torch.zeros(shape) for k, shape in shapes.items()}
    path = tmp_path / "dinov2.safetensors"
    save_file(dinov2, path)
    with pytest.raises(UserError) as err:
        build_encoder(EncoderConfig(name="phikon", weights=str(path)))
    msg = str(err.value)
    assert str(path) in msg and "ViTModel layout" in msg and "timm state dict" in msg


def test_the_hub_probe_dials_the_endpoints_own_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF_ENDPOINT may name a mirror on its own port: probing 443 there would call it down."""
    import socket

    from huggingface_hub import constants

    from melanoma_mil.encoders.hub import _hub_unreachable
    from melanoma_mil.encoders.registry import get_spec

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing cached
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with socket.create_server(("127.0.0.1", 0)) as mirror:
        port = mirror.getsockname()[1]
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        assert _hub_unreachable(get_spec("uni")) == ""
    why = _hub_unreachable(get_spec("uni"))  # the same port, now closed
    assert "127.0.0.1 cannot be reached" in why and "MahmoodLab/uni" in why
