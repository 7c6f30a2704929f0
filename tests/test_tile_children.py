"""`tile` tiles slides in child processes (spawned: a fresh interpreter each): what they print
reads as the `tile` process's own lines, and a script that would be re-run in each is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import tissue_image
from PIL import Image

from melanoma_mil.demo.pyramid import write_pyramid

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _slide(tmp_path: Path) -> Path:
    slides = tmp_path / "slides"
    slides.mkdir()
    write_pyramid(slides / "s0.tiff", tissue_image(512, 0), mpp=0.5, n_levels=1)
    return slides


def test_a_warning_in_a_tile_process_prints_as_one_line(tmp_path: Path) -> None:
    """A mask over Pillow's pixel limit makes Pillow warn in the child that tiles the slide."""
    slides, masks = _slide(tmp_path), tmp_path / "masks"
    masks.mkdir()
    side = int(Image.MAX_IMAGE_PIXELS**0.5) + 10  # over the limit, under twice it (an error)
    Image.new("L", (side, side), 255).save(masks / "s0.png")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "melanoma_mil",
            "tile",
            f"slides_dir={slides}",
            f"output_dir={tmp_path / 'tiles'}",
            f"tiling.mask_dir={masks}",
            "tiling.mpp=1.0",
            "tiling.tile_size=64",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr
    warned = [ln for ln in done.stderr.splitlines() if "decompression bomb" in ln]
    assert len(warned) == 1 and warned[0].startswith("warning (DecompressionBombWarning): Image")
    assert "warnings.warn(" not in done.stderr and "PIL" not in done.stderr, done.stderr
