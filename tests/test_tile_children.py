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
    """A mask over Pillow's pixel limit makes Pillow warn in the child that tiles the slide.
    The limit is lowered in every process (a sitecustomize), so the mask is small to write."""
    slides, masks, inject = _slide(tmp_path), tmp_path / "masks", tmp_path / "inject"
    masks.mkdir()
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "from PIL import Image\nImage.MAX_IMAGE_PIXELS = 10**6\n"
    )
    side = int(1e6**0.5) + 10  # over the limit, under twice it (an error)
    Image.new("L", (side, side), 255).save(masks / "s0.png")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(inject), str(ROOT)])}
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
        env=env,
    )
    assert done.returncode == 0, done.stderr
    warned = [ln for ln in done.stderr.splitlines() if "decompression bomb" in ln]
    assert len(warned) == 1 and warned[0].startswith("warning (DecompressionBombWarning): Image")
    assert "warnings.warn(" not in done.stderr and "PIL" not in done.stderr, done.stderr


SCRIPT = """\
from melanoma_mil.config import TileConfig, TilingConfig
from melanoma_mil.tiling.run import run_tile

print("script body ran")
cfg = TileConfig(slides_dir={slides!r}, output_dir={out!r}, workers=2,
                 tiling=TilingConfig(mpp=1.0, tile_size=64))
{call}
"""


def test_a_script_without_a_main_guard_is_refused_and_one_with_it_tiles(tmp_path: Path) -> None:
    """Each spawned worker runs the script again (as `__mp_main__`): unguarded, it called tile
    again there, each worker died, and every slide failed as if its file crashed the reader."""
    slides = _slide(tmp_path)
    guarded = 'if __name__ == "__main__":\n    raise SystemExit(run_tile(cfg))'
    for name, call in [("bare", "run_tile(cfg)"), ("guarded", guarded)]:
        script, out = tmp_path / f"{name}.py", tmp_path / f"tiles_{name}"
        script.write_text(SCRIPT.format(slides=str(slides), out=str(out), call=call))
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              env=ENV, cwd=tmp_path)  # fmt: skip
        if name == "guarded":  # its top level runs again in each worker: its business
            assert done.returncode == 0, done.stderr
            assert (out / "coords" / "s0.h5").is_file()
            continue
        assert done.returncode == 1 and "RuntimeError" not in done.stderr, done.stderr
        assert done.stdout.count("script body ran") == 1  # in no worker
        last = done.stderr.strip().splitlines()[-1]
        assert str(script) in last and 'if __name__ == "__main__":' in last, done.stderr
        assert not out.exists()  # refused before any work
