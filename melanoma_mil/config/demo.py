"""`demo`'s config: one small end-to-end run on a synthetic cohort."""

from __future__ import annotations

from dataclasses import dataclass, field

from melanoma_mil.config.fit import SEED_MAX
from melanoma_mil.config.slides import MAX_TILE, MAX_TILE_WHY, EncoderConfig
from melanoma_mil.config.tools import bounded, positive


@dataclass
class DemoConfig:
    """`demo`: synthetic cohort -> tile -> extract -> fit -> heatmaps -> evaluate, end to end."""

    output_dir: str = "demo_output"
    n_slides: int = bounded(24, 2)
    slide_size: int = bounded(5632, 1024)  # level-0 px (0.5 um/px) of each synthetic slide
    seed: int = bounded(0, 0, SEED_MAX)  # also fit's seed
    overwrite: bool = False
    mpp: float = positive(1.0)  # tiling resolution (10x, the follow-up paper's best)
    tile_size: int = bounded(224, 8, MAX_TILE, why=MAX_TILE_WHY.replace("tiling.mpp", "mpp"))
    # no weights can be bundled: the demo uses a randomly initialised encoder, recorded as such
    encoder: EncoderConfig = field(
        default_factory=lambda: EncoderConfig(name="resnet18_imagenet", pretrained=False)
    )
    batch_size: int = bounded(32, 1)
    folds: int = bounded(3, 2)
    max_epochs: int = bounded(30, 1)
    lr: float = positive(1e-3)
