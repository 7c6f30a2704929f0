"""`tile` on a slide whose read never returns (a FIFO named .svs stands in for a dead network
mount): it is named while slow, fails alone at tile's time limit, and the cohort goes on."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd
import pytest
from conftest import tissue_image

from melanoma_mil import progress
from melanoma_mil.config import TileConfig, TilingConfig
from melanoma_mil.demo.pyramid import write_pyramid
from melanoma_mil.tiling.run import run_tile

TILING = TilingConfig(mpp=1.0, tile_size=64)


def _cohort(tmp_path: Path, n: int) -> Path:
    """A manifest: a FIFO slide first (its read blocks until a writer opens it), then ``n``
    real pyramids."""
    slides = tmp_path / "slides"
    slides.mkdir()
    os.mkfifo(slides / "hung.svs")
    rows = ["slide_id,path", f"hung,{slides / 'hung.svs'}"]
    for i in range(n):
        write_pyramid(slides / f"s{i}.tiff", tissue_image(768, i), mpp=0.5, n_levels=1)
        rows.append(f"s{i},{slides / f's{i}.tiff'}")
    manifest = tmp_path / "slides.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def test_a_hung_slide_fails_alone_at_the_time_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.5)
    manifest, out = _cohort(tmp_path, 3), tmp_path / "tiles"
    cfg = TileConfig(manifest=str(manifest), output_dir=str(out), workers=2,
                     slide_timeout_s=4, tiling=TILING)  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert run_tile(cfg) == 1  # as for any failed slide
    table = pd.read_csv(out / "tiling.csv").set_index("slide_id")
    assert (table.loc[["s0", "s1", "s2"], "status"] == "ok").all()
    reason = table.loc["hung", "reason"]
    assert table.loc["hung", "status"] == "failed"
    assert "slide_timeout_s=4 s" in reason and str(tmp_path / "slides" / "hung.svs") in reason
    assert "still tiling hung after" in caplog.text  # named while it was slow
    assert not (out / "coords" / "hung.lock").exists()  # its killed process's claim is cleared
