"""Shared test factories: the session's tiny real pipeline (synthetic slides -> tile ->
extract with a random ResNet18 -> 2-fold fit) and small builders used by several test files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from melanoma_mil.config import (
    EncoderConfig,
    ExtractConfig,
    FitConfig,
    TileConfig,
    TilingConfig,
    load_config,
)
from melanoma_mil.demo.synth import generate_cohort
from melanoma_mil.features.run import run_extract
from melanoma_mil.tiling.run import run_tile
from melanoma_mil.training.cv import run_fit

SLIDE_PX = 1024  # synthetic slides: 1024 px at 0.5 um/px
TILE = 64  # tiles: 64 px at 1.0 um/px = 128 level-0 px


@dataclass(frozen=True)
class Pipeline:
    root: Path

    @property
    def cohort(self) -> pd.DataFrame:
        return pd.read_csv(self.root / "cohort" / "cohort.csv")

    @property
    def slides(self) -> Path:
        return self.root / "cohort" / "slides"

    @property
    def features(self) -> Path:
        return next(p for p in (self.root / "features").iterdir() if p.is_dir())

    @property
    def run_dir(self) -> Path:
        return self.root / "run"


def tiny_pipeline(factory: pytest.TempPathFactory) -> Pipeline:
    """12 synthetic slides tiled, encoded and fitted (2 folds), once per test session."""
    root = factory.getbasetemp() / "viz_pipeline"
    pipe = Pipeline(root)
    if (pipe.run_dir / "cv_summary.json").is_file():
        return pipe
    generate_cohort(root / "cohort", n_slides=12, size=SLIDE_PX, workers=1)
    tiling = TilingConfig(mpp=1.0, tile_size=TILE)
    tiles = root / "tiles"
    assert (
        run_tile(
            TileConfig(slides_dir=str(pipe.slides), output_dir=str(tiles), workers=1, tiling=tiling)
        )
        == 0
    )
    encoder = EncoderConfig(name="resnet18_imagenet", pretrained=False)
    extract = ExtractConfig(
        coords_dir=str(tiles),
        output_dir=str(root / "features"),
        encoder=encoder,
        batch_size=32,
        num_workers=0,
        device="cpu",
    )
    assert run_extract(extract) == 0
    fit = load_config(
        FitConfig,
        [],
        [
            f"data.features_dir={pipe.features}",
            f"data.labels_csv={root / 'cohort/labels.csv'}",
            f"output_dir={pipe.run_dir}",
            "cv.folds=2",
            "trainer.max_epochs=2",
            "logger=none",
            "trainer.accelerator=cpu",
        ],
    )
    assert run_fit(fit) == 0
    return pipe


@pytest.fixture(scope="session")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """The tiny real pipeline, built once per session and shared (read-only) by every test."""
    return tiny_pipeline(tmp_path_factory)
