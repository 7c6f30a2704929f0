"""The demo cohort: both classes, masks consistent with labels, readable pyramids, reuse."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from melanoma_mil.demo.synth import MASK_DOWNSAMPLE, generate_cohort
from melanoma_mil.errors import UserError
from melanoma_mil.tiling.slides import open_slide, read_thumbnail, slide_mpp
from melanoma_mil.tiling.tissue import saturation


def test_cohort_classes_masks_and_reuse(tmp_path: Path) -> None:
    size = 1536
    table = generate_cohort(tmp_path, n_slides=6, seed=3, size=size, workers=1)
    assert list(table.columns) == [
        "slide_id", "patient_id", "label", "path", "mask_path", "mask_downsample"
    ]  # fmt: skip
    assert (table["label"] == "immune_high").sum() == 3  # balanced
    assert table["patient_id"].nunique() == 5  # one patient with two slides, same label
    pair = table[table["patient_id"].duplicated(keep=False)]
    assert len(pair) == 2 and pair["label"].nunique() == 1
    labels = pd.read_csv(tmp_path / "labels.csv")
    assert list(labels.columns) == ["slide_id", "patient_id", "label"]
    assert pd.read_csv(tmp_path / "cohort.csv")["slide_id"].tolist() == table["slide_id"].tolist()

    for row in table.itertuples():
        with Image.open(row.mask_path) as im:
            mask = np.asarray(im) > 0
        assert mask.shape == (math.ceil(size / MASK_DOWNSAMPLE),) * 2
        assert row.mask_downsample == MASK_DOWNSAMPLE
        assert mask.any() == (row.label == "immune_high")
        slide = open_slide(row.path)
        assert slide.dimensions == (size, size) and slide.level_count >= 3
        assert slide_mpp(slide) == pytest.approx(0.5)
        thumb = read_thumbnail(slide, MASK_DOWNSAMPLE)
        stained = saturation(thumb) > 0.15
        assert 0.1 < stained.mean() < 0.9  # tissue on white glass
        if mask.any():  # planted clusters lie on tissue and are dark
            assert stained[mask].mean() > 0.8
            assert thumb[mask].mean() < thumb[stained & ~mask].mean() - 10

    before = Path(table.loc[0, "path"]).stat().st_mtime_ns
    again = generate_cohort(tmp_path, n_slides=6, seed=3, size=size, workers=1)
    assert again.equals(table) and Path(table.loc[0, "path"]).stat().st_mtime_ns == before
    with pytest.raises(UserError, match="other settings"):
        generate_cohort(tmp_path, n_slides=6, seed=4, size=size, workers=1)
    (tmp_path / "synth.json").write_text("{cut short")  # damaged: named, not a traceback
    with pytest.raises(UserError, match="other settings"):
        generate_cohort(tmp_path, n_slides=6, seed=3, size=size, workers=1)
