"""Named tile encoders: architecture, weights source, transform, dim, licence and citation.

Every entry builds from a timm architecture plus kwargs, so random init, local weight files and
hub weights all share one module definition. Foundation-model kwargs follow the model cards
(UNI, UNI2-h, H-optimus-0, Virchow2, Prov-GigaPath); `timm:<name>` covers any other timm model.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.layers import SwiGLUPacked

from melanoma_mil.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
# Keys a checkpoint may hold beyond the backbone: classifier / projection heads.
HEAD_KEYS = ("fc.", "head.", "classifier.", "projection", "projector", "prototypes")


@dataclass(frozen=True)
class EncoderSpec:
    """How to build one encoder and read its tiles; the registry's unit."""

    name: str
    arch: str  # timm architecture (with tag for ImageNet weights)
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    license: str
    citation: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    hub: str | None = None  # "timm" (the arch's own weights), "hf-hub:org/repo", None: no hub
    weights_url: str = ""  # where to download weights when there is no hub copy
    resize: int | None = None  # None: the tile at its own size (CNNs); else square side
    crop: int | None = None  # center crop after resize
    interpolation: str = "bilinear"
    pooling: str = "avg"  # avg (global average) | cls (class token) | cls_mean (CLS + patch mean)
    precision: str = "bf16"  # preferred autocast dtype on accelerators: bf16 | fp16 | fp32
    gated: bool = False  # hub access needs an approved account + HF token
    trunk: str | None = None  # "layer3": drop the ResNet's last stage (CLAM's truncated net)
    ignore_keys: tuple[str, ...] = HEAD_KEYS  # checkpoint keys that may go unused


def _cnn(name: str, arch: str, dim: int, **kw: Any) -> EncoderSpec:
    kw.setdefault("mean", IMAGENET_MEAN)
    kw.setdefault("std", IMAGENET_STD)
    kw.setdefault("kwargs", {"num_classes": 0})
    return EncoderSpec(name=name, arch=arch, dim=dim, **kw)


def _vit(name: str, arch: str, dim: int, **kw: Any) -> EncoderSpec:
    kw.setdefault("mean", IMAGENET_MEAN)
    kw.setdefault("std", IMAGENET_STD)
    kw.setdefault("resize", 224)
    kw.setdefault("pooling", "cls")
    return EncoderSpec(name=name, arch=arch, dim=dim, **kw)


def _virchow2(name: str, dim: int, pooling: str, which: str) -> EncoderSpec:
    """Virchow2, whose card embeds a tile as its CLS token joined with its patch tokens' mean
    (register tokens left out); CLS alone is the card's lighter option."""
    return _vit(
        name,
        "vit_huge_patch14_224",
        dim,
        kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "num_classes": 0,
            "mlp_ratio": 5.3375,
            "reg_tokens": 4,
            "global_pool": "",
            "dynamic_img_size": True,
            "mlp_layer": SwiGLUPacked,
            "act_layer": torch.nn.SiLU,
        },
        pooling=pooling,
        interpolation="bicubic",
        crop=224,
        precision="fp16",
        hub="hf-hub:paige-ai/Virchow2",
        gated=True,
        license=_NC_ND,
        citation="Zimmermann E et al. Virchow2: scaling self-supervised mixed magnification "
        f"models in pathology. arXiv:2408.00738, 2024. ({which})",
    )


_UNI_CITE = (
    "Chen RJ et al. Towards a general-purpose foundation model for computational pathology. "
    "Nat Med 2024;30:850-862."
)
_NC_ND = "CC-BY-NC-ND-4.0 (non-commercial, no derivatives)"

REGISTRY: dict[str, EncoderSpec] = {
    s.name: s
    for s in [
        _cnn(
            "resnet50_trunc",
            "resnet50.tv_in1k",
            1024,
            hub="timm",
            trunk="layer3",
            ignore_keys=(*HEAD_KEYS, "layer4."),
            license="BSD-3-Clause (torchvision weights)",
            citation="He K et al. Deep residual learning, CVPR 2016; truncated as in Lu MY et al. "
            "CLAM, Nat Biomed Eng 2021;5:555-570.",
        ),
        _cnn(
            "resnet18_imagenet",
            "resnet18.tv_in1k",
            512,
            hub="timm",
            license="BSD-3-Clause (torchvision weights)",
            citation="He K et al. Deep residual learning for image recognition. CVPR 2016.",
        ),
        _vit(
            "vit_s16_imagenet",
            "vit_small_patch16_224.augreg_in21k_ft_in1k",
            384,
            kwargs={"num_classes": 0},
            mean=HALF,
            std=HALF,
            interpolation="bicubic",
            hub="timm",
            license="Apache-2.0",
            citation="Steiner A et al. How to train your ViT? TMLR 2022.",
        ),
        _cnn(
            "ciga_simclr_resnet18",
            "resnet18",
            512,
            mean=HALF,
            std=HALF,
            weights_url="https://github.com/ozanciga/self-supervised-histopathology/releases"
            " (tenpercent_resnet18.ckpt; keys under model.resnet.)",
            license="MIT (LICENSE of github.com/ozanciga/self-supervised-histopathology)",
            citation="Ciga O, Xu T, Martel AL. Self supervised contrastive learning for digital "
            "histopathology. Mach Learn Appl 2022;7:100198 (arXiv:2011.13971).",
        ),
        _cnn(
            "retccl_resnet50",
            "resnet50",
            2048,
            weights_url="https://github.com/Xiyue-Wang/RetCCL (best_ckpt.pth)",
            license="GPLv3, non-commercial academic use (RetCCL README)",
            citation="Wang X et al. RetCCL: clustering-guided contrastive learning for whole-slide "
            "image retrieval. Med Image Anal 2023;83:102645.",
        ),
        _vit(
            "lunit_dino_vits16",
            "vit_small_patch16_224",
            384,
            kwargs={"num_classes": 0},
            mean=LUNIT_MEAN,
            std=LUNIT_STD,
            hub="hf-hub:1aurent/vit_small_patch16_224.lunit_dino",
            weights_url="https://github.com/lunit-io/benchmark-ssl-pathology/releases"
            " (dino_vit_small_patch16_ep200.torch)",
            license="Lunit non-commercial",
            citation="Kang M et al. Benchmarking self-supervised learning on diverse pathology "
            "datasets. CVPR 2023.",
        ),
        _vit(
            "uni",
            "vit_large_patch16_224",
            1024,
            kwargs={
                "img_size": 224,
                "patch_size": 16,
                "init_values": 1e-5,
                "num_classes": 0,
                "dynamic_img_size": True,
            },
            hub="hf-hub:MahmoodLab/uni",
            gated=True,
            license=_NC_ND,
            citation=_UNI_CITE,
        ),
        _vit(
            "uni2_h",
            "vit_giant_patch14_224",
            1536,
            kwargs={
                "img_size": 224,
                "patch_size": 14,
                "depth": 24,
                "num_heads": 24,
                "init_values": 1e-5,
                "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2,
                "num_classes": 0,
                "no_embed_class": True,
                "mlp_layer": SwiGLUPacked,
                "act_layer": torch.nn.SiLU,
                "reg_tokens": 8,
                "dynamic_img_size": True,
            },
            hub="hf-hub:MahmoodLab/UNI2-h",
            gated=True,
            license=_NC_ND,
            citation=_UNI_CITE,
        ),
        _vit(
            "h_optimus_0",
            "vit_giant_patch14_reg4_dinov2",
            1536,
            kwargs={
                "img_size": 224,
                "init_values": 1e-5,
                "num_classes": 0,
                "global_pool": "token",
                "dynamic_img_size": False,
            },
            mean=HOPTIMUS_MEAN,
            std=HOPTIMUS_STD,
            interpolation="bicubic",
            precision="fp16",
            hub="hf-hub:bioptimus/H-optimus-0",
            gated=True,
            license="Apache-2.0",
            citation="Saillard C et al. H-optimus-0. Bioptimus, 2024. "
            "https://github.com/bioptimus/releases",
        ),
        _virchow2("virchow2", 1280, "cls", "CLS token only, 1280-d"),
        _virchow2(
            "virchow2_concat",
            2560,
            "cls_mean",
            "the model card's embedding: CLS token and mean patch token, 2560-d",
        ),
        _vit(
            "phikon",
            "vit_base_patch16_224",
            768,
            kwargs={"num_classes": 0},
            hub="hf-hub:1aurent/vit_base_patch16_224.owkin_pancancer",
            weights_url="https://huggingface.co/owkin/phikon (HF transformers ViT layout)",
            license="Owkin non-commercial",
            citation="Filiot A et al. Scaling self-supervised learning for histopathology with "
            "masked image modeling. medRxiv 2023.07.21.23292757.",
        ),
        _vit(
            "gigapath",
            "vit_giant_patch14_dinov2",
            1536,
            kwargs={
                "img_size": 224,
                "in_chans": 3,
                "patch_size": 16,
                "embed_dim": 1536,
                "depth": 40,
                "num_heads": 24,
                "init_values": 1e-5,
                "mlp_ratio": 5.33334,
                "num_classes": 0,
            },
            resize=256,
            crop=224,
            interpolation="bicubic",
            hub="hf-hub:prov-gigapath/prov-gigapath",
            gated=True,
            license="Apache-2.0 (gated, research use)",
            citation="Xu H et al. A whole-slide foundation model for digital pathology from "
            "real-world data. Nature 2024;630:181-188.",
        ),
    ]
}


def _timm_spec(name: str) -> EncoderSpec:
    """A spec for any timm model, read from its pretrained config (built on meta: no init)."""
    import timm

    arch = name.split(":", 1)[1]
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, num_classes=0)
    except Exception as e:  # timm raises RuntimeError / ValueError for unknown names
        close = difflib.get_close_matches(arch, timm.list_models(), n=1)
        hint = f" Did you mean 'timm:{close[0]}'?" if close else ""
        raise UserError(f"encoder.name '{name}': timm cannot build '{arch}' ({e}).{hint}") from None
    cfg = dict(model.pretrained_cfg or {})
    fixed = bool(cfg.get("fixed_input_size"))
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    return EncoderSpec(
        name=name,
        arch=arch,
        # Models with a pre-logits layer (MobileNetV3, ...) output its width, not num_features.
        dim=int(getattr(model, "head_hidden_size", None) or model.num_features),
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
        std=tuple(cfg.get("std", IMAGENET_STD)),  # type: ignore[arg-type]
        license=str(cfg.get("license", "see the timm model card")),
        citation=f"timm model '{arch}' (see its model card)",
        kwargs={"num_classes": 0},
        hub="timm",
        resize=size if fixed else None,
        interpolation=str(cfg.get("interpolation", "bilinear")),
        pooling="cls" if getattr(model, "global_pool", "") == "token" else "avg",
    )


def get_spec(name: str) -> EncoderSpec:
    """Registry entry by name, or a spec for `timm:<model>`; a clear error for unknown names."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith("timm:"):
        return _timm_spec(name)
    close = difflib.get_close_matches(name, REGISTRY, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise UserError(
        f"unknown encoder.name '{name}'.{hint} Known: {', '.join(REGISTRY)}, or timm:<model>."
    )
