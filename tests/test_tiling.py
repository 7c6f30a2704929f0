"""`tile` on the real Aperio slide and on generated pyramidal TIFFs (real OpenSlide, real h5)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import CMU, tissue_image
from PIL import Image

from melanoma_mil.config import TileConfig, TilingConfig
from melanoma_mil.demo.pyramid import write_pyramid
from melanoma_mil.errors import UserError
from melanoma_mil.tiling.coords import read_coords
from melanoma_mil.tiling.find import find_slides, slide_id_of
from melanoma_mil.tiling.grid import tile_slide
from melanoma_mil.tiling.run import run_tile
from melanoma_mil.tiling.slides import choose_level, open_slide, read_tile, slide_mpp
from melanoma_mil.tiling.tissue import saturation


def _best_shift(tile: np.ndarray, level_img: np.ndarray, x: int, y: int) -> tuple[int, int]:
    """Offset (level px) of the region of ``level_img`` at (x, y) that best matches ``tile``."""
    size = tile.shape[0]
    errors = {}
    for dy in (-2, -1, 0, 1, 2):
        for dx in (-2, -1, 0, 1, 2):
            ref = level_img[y + dy : y + dy + size, x + dx : x + dx + size].astype(np.float32)
            errors[(dx, dy)] = np.abs(ref - tile.astype(np.float32)).mean()
    first, second = sorted(errors.values())[:2]
    assert first < 0.75 * second, errors  # a clear winner, not JPEG noise
    return min(errors, key=errors.__getitem__)


@pytest.mark.parametrize(
    ("target", "level", "read_size"),
    [(0.25, 0, 64), (0.3, 0, 77), (0.5, 1, 64), (0.9, 1, 115), (1.0, 2, 64), (4.0, 2, 256)],
)
def test_level_closest_without_being_coarser(target: float, level: int, read_size: int) -> None:
    choice = choose_level([1.0, 2.0, 4.0003], 0.25, target, 64)
    assert (choice.level, choice.read_size) == (level, read_size)
    assert choice.level0_size == pytest.approx(64 * target / 0.25, rel=0.01)


@pytest.mark.parametrize(("mpp", "level", "read_size"), [(0.2520, 1, 222), (0.2527, 1, 222),
                                                          (0.2575, 0, 870)])  # fmt: skip
def test_10x_of_aperio_scans_reads_their_4x_level(mpp: float, level: int, read_size: int) -> None:
    """AT2 scans (0.2520-0.2527 um/px) read 10x from their 4x level, 1.1% coarser at most; a
    level 3% coarser than the target is not used."""
    choice = choose_level([1.0, 4.0001, 16.002], mpp, 1.0, 224)
    assert (choice.level, choice.read_size) == (level, read_size)
    assert choice.level0_size == pytest.approx(224 / mpp, rel=0.01)


@pytest.mark.parametrize(("target", "level", "step"), [(0.25, 0, 1), (1.0, 2, 4)])
def test_tiles_at_right_level_and_pixel_exact(
    pyramid: tuple[Path, np.ndarray], target: float, level: int, step: int
) -> None:
    path, src = pyramid
    slide = open_slide(path)
    tiles = tile_slide(slide, path, "syn", TilingConfig(mpp=target, tile_size=64))
    grid = tiles.grid
    assert (grid.patch_level, grid.downsample, grid.read_size) == (level, step, 64)
    assert grid.level0_mpp == pytest.approx(0.25)
    assert len(grid.coords) >= 12
    x_max, y_max = (np.array(slide.dimensions) - grid.level0_size).tolist()
    assert (grid.coords >= 0).all() and (grid.coords <= [x_max, y_max]).all()
    rng = np.random.default_rng(1)
    level_img = src
    for _ in range(level):  # the pyramid's own construction of this level
        h, w = level_img.shape[:2]
        level_img = np.asarray(Image.fromarray(level_img).resize((w // 2, h // 2), Image.BILINEAR))
    for x, y in grid.coords[rng.choice(len(grid.coords), 4, replace=False)]:
        if min(x, y) < 2 * step or max(x, y) > min(x_max, y_max) - 2 * step:
            continue
        tile = np.asarray(read_tile(slide, grid, x, y))
        assert tile.shape == (64, 64, 3)
        assert _best_shift(tile, level_img, int(x) // step, int(y) // step) == (0, 0)


def test_mpp_sources_and_missing_resolution(tmp_path: Path) -> None:
    tagged, bare = tmp_path / "tagged.tiff", tmp_path / "bare.tiff"
    img = np.full((512, 512, 3), 200, np.uint8)
    tifffile.imwrite(tagged, img, tile=(256, 256), photometric="rgb",
                     resolution=(25400 / 0.5, 25400 / 0.5), resolutionunit="INCH")  # fmt: skip
    tifffile.imwrite(bare, img, tile=(256, 256), photometric="rgb")
    assert slide_mpp(open_slide(tagged)) == pytest.approx(0.5)
    assert slide_mpp(open_slide(bare), default_mpp=0.25) == 0.25
    with pytest.raises(UserError, match="bare.tiff.*tiling.default_mpp"):
        slide_mpp(open_slide(bare), name=str(bare))


def test_objective_power_fallback_on_aperio_svs_without_mpp(tmp_path: Path) -> None:
    """An Aperio header with AppMag but no MPP: OpenSlide reports 40x only -> 0.25 um/px."""
    svs = tmp_path / "appmag_only.svs"
    desc = "Aperio Image Library v12.0.15 \r\n1024x1024 (256x256) JPEG/RGB Q=70|AppMag = 40"
    img = np.full((1024, 1024, 3), 210, np.uint8)
    tifffile.imwrite(svs, img, tile=(256, 256), photometric="rgb", compression="jpeg",
                     description=desc, metadata=None)  # fmt: skip
    slide = open_slide(svs)
    assert slide.properties["openslide.vendor"] == "aperio"
    assert "openslide.mpp-x" not in slide.properties
    assert slide_mpp(slide) == pytest.approx(0.25)
    grid = tile_slide(slide, svs, "appmag_only", TilingConfig(mpp=1.0, tile_size=64)).grid
    assert grid.level0_mpp == pytest.approx(0.25) and grid.read_size == 256  # 64 px at 4x


def test_find_slides(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/s1.svs", "a/b/s2.ome.tiff", "a/notes.txt", "a/.s3.svs.tmp"):
        (tmp_path / name).write_bytes(b"x")
    found = find_slides(tmp_path, None, [".svs", ".tiff"], tmp_path)
    assert list(found) == ["s1", "s2"] and slide_id_of("x/s2.ome.tiff") == "s2"
    (tmp_path / ".snapshot" / "hourly").mkdir(parents=True)  # a file server's copies: skipped
    (tmp_path / ".snapshot" / "hourly" / "s1.svs").write_bytes(b"x")
    assert list(find_slides(tmp_path, None, [".svs", ".tiff"], tmp_path)) == ["s1", "s2"]
    (tmp_path / "a" / "b" / "s1.tiff").write_bytes(b"x")
    with pytest.raises(UserError, match=r"duplicate slide id 's1'.*s1\.tiff and .*s1\.svs"):
        find_slides(tmp_path, None, [".svs", ".tiff"], tmp_path)
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,file\nx,a/s1.svs\n")
    with pytest.raises(UserError, match="lacks column"):
        find_slides(None, manifest, [], tmp_path)
    manifest.write_text("slide_id,path\nx,a/s1.svs\nx,a/b/s1.tiff\n")  # the ids are the CSV's
    with pytest.raises(UserError, match=r"'x'.*give one of them another slide_id"):
        find_slides(None, manifest, [], tmp_path)
    manifest.write_text("slide_id,path\nx,a/s1.svs\n,\n")  # a blank row is spacing
    assert find_slides(None, manifest, [], tmp_path) == {"x": tmp_path / "a" / "s1.svs"}
    manifest.write_text("slide_id,path\nx,a/s1.svs\ny, \n")  # a slide left out by mistake
    with pytest.raises(UserError, match=r"m\.csv' row 3 has a slide_id or a path but not both"):
        find_slides(None, manifest, [], tmp_path)
    with pytest.raises(UserError, match="not a folder"):
        find_slides(tmp_path / "nope", None, [".svs"], tmp_path)


def test_a_mask_dir_that_is_no_folder_is_refused_before_any_slide(tmp_path: Path) -> None:
    out = tmp_path / "tiles"
    tiling = TilingConfig(mask_dir=str(tmp_path / "masks"))
    with pytest.raises(UserError, match=r"tiling.mask_dir '.*masks' is not a folder"):
        run_tile(TileConfig(slides_dir=str(tmp_path), output_dir=str(out), tiling=tiling))
    assert not out.exists()


@pytest.mark.parametrize(("key", "value"), [("mpp", 0.0005), ("default_mpp", 500.0)])
def test_an_implausible_mpp_setting_is_refused_before_any_slide(
    tmp_path: Path, pyramid: tuple[Path, np.ndarray], key: str, value: float
) -> None:
    """As mpp_csv rows are: default_mpp=500 was taken as a slide's level-0 mpp, and mpp=0.0005
    tiled every slide into 1-px reads (2000x finer than a scanner's) before any check."""
    out = tmp_path / "tiles"
    tiling = TilingConfig(**{key: value})
    with pytest.raises(UserError, match=rf"tiling.{key}={value!r} must be in \[0.05, 50\]"):
        run_tile(TileConfig(slides_dir=str(pyramid[0].parent), output_dir=str(out), tiling=tiling))
    assert not out.exists()


def test_real_aperio_slide(tmp_path: Path) -> None:
    if not CMU.is_file():
        pytest.skip(f"real test slide {CMU} not present (CI clones the repo beside shared/)")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide_id,path\ncmu,{CMU}\n")
    counts = {}
    for mpp in (0.5, 1.0):
        out = tmp_path / f"out_{mpp}"
        cfg = TileConfig(manifest=str(manifest), output_dir=str(out), workers=1,
                         tiling=TilingConfig(mpp=mpp, tile_size=128))  # fmt: skip
        assert run_tile(cfg) == 0
        table = pd.read_csv(out / "tiling.csv")
        assert table.loc[0, "status"] == "ok" and table.loc[0, "mpp"] == pytest.approx(0.499)
        grid = read_coords(out / "coords" / "cmu.h5")
        counts[mpp] = len(grid.coords)
        with Image.open(out / "qc" / "cmu.png") as qc:
            assert qc.format == "PNG" and max(qc.size) <= 2048
    assert 0.15 < counts[1.0] / counts[0.5] < 0.35, counts
    # tiles within tissue: stained pixels dominate every kept tile
    grid = read_coords(tmp_path / "out_0.5" / "coords" / "cmu.h5")
    assert grid.level0_mpp == pytest.approx(0.499) and counts[0.5] > 50
    slide = open_slide(CMU)
    stained = [(saturation(np.asarray(read_tile(slide, grid, x, y))) > 0.15).mean()
               for x, y in grid.coords]  # fmt: skip
    assert min(stained) > 0.2 and np.median(stained) > 0.7


def _mixed_folder(root: Path, pyramid: Path) -> Path:
    slides = root / "slides"
    slides.mkdir()
    (slides / "good.tiff").symlink_to(pyramid)
    write_pyramid(slides / "blank.tiff", np.full((1024, 1024, 3), 243, np.uint8), 0.25, 2)
    (slides / "corrupt.svs").write_bytes(np.random.default_rng(0).bytes(5000))
    data = pyramid.read_bytes()
    (slides / "truncated.tiff").write_bytes(data[: len(data) // 3])
    return slides


def test_cohort_blank_corrupt_resume(
    tmp_path: Path, pyramid: tuple[Path, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    slides = _mixed_folder(tmp_path, pyramid[0])
    out = tmp_path / "out"
    cfg = TileConfig(slides_dir=str(slides), output_dir=str(out), workers=2,
                     tiling=TilingConfig(mpp=1.0, tile_size=64))  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert run_tile(cfg) == 1  # the others finish, then non-zero
    table = pd.read_csv(out / "tiling.csv").set_index("slide_id")
    assert table.loc["good", "status"] == "ok" and table.loc["good", "n_tiles"] >= 12
    assert table.loc["blank", "status"] == "empty" and table.loc["blank", "n_tiles"] == 0
    assert "blank: zero tiles" in caplog.text
    for bad in ("corrupt", "truncated"):
        assert table.loc[bad, "status"] == "failed" and table.loc[bad, "reason"]
    assert "not a format OpenSlide reads" in table.loc["corrupt", "reason"]
    assert read_coords(out / "coords" / "blank.h5").coords.shape == (0, 2)
    assert sorted(p.name for p in (out / "coords").iterdir()) == ["blank.h5", "good.h5"]
    assert sorted(p.name for p in (out / "qc").iterdir()) == ["blank.png", "good.png"]
    assert not list(out.rglob("*.tmp"))  # no partial files

    mtime = (out / "coords" / "good.h5").stat().st_mtime_ns
    cfg.workers = 1
    assert run_tile(cfg) == 1
    table = pd.read_csv(out / "tiling.csv").set_index("slide_id")
    assert table.loc["good", "status"] == "skipped" and table.loc["good", "n_tiles"] >= 12
    assert table.loc["blank", "status"] == "skipped"
    assert (out / "coords" / "good.h5").stat().st_mtime_ns == mtime

    cfg.tiling.min_tissue = 0.9  # other settings: refused before any slide, unless overwrite
    with pytest.raises(UserError, match=r"tiling.min_tissue: 0.5 in the folder, 0.9 now"):
        run_tile(cfg)
    cfg.overwrite = True
    run_tile(cfg)
    assert read_coords(out / "coords" / "good.h5").tiling["min_tissue"] == 0.9


def test_user_masks_replace_automatic(tmp_path: Path, pyramid: tuple[Path, np.ndarray]) -> None:
    path, _ = pyramid
    masks = tmp_path / "masks"
    masks.mkdir()
    left = np.zeros((10, 20), np.uint8)
    left[:, :10] = 255  # left half, at an arbitrary size
    Image.fromarray(left).save(masks / "syn.png")
    slide = open_slide(path)
    cfg = TilingConfig(mpp=1.0, tile_size=64, mask_dir=str(masks))
    png = tile_slide(slide, path, "syn", cfg)
    assert png.mask_source.startswith("user mask")
    # the whole left half, glass included (the user's mask wins), and nothing right of it
    assert len(png.grid.coords) == 4 * 8
    assert (png.grid.coords[:, 0] + png.grid.level0_size <= 1024).all()
    (masks / "syn.png").unlink()
    square = [[[1024, 1024], [1536, 1024], [1536, 1536], [1024, 1536], [1024, 1024]]]
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square}}
    (masks / "syn.geojson").write_text(
        json.dumps({"type": "FeatureCollection", "features": [feature]})
    )
    geo = tile_slide(slide, path, "syn", cfg).grid.coords
    assert len(geo) == 4 and set(map(tuple, geo)) == {
        (1024, 1024),
        (1280, 1024),
        (1024, 1280),
        (1280, 1280),
    }


def test_a_mask_of_another_aspect_ratio_is_named_as_stretched(
    tmp_path: Path, pyramid: tuple[Path, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    """A crop or a rotated export of a mask would mark the wrong tissue without an error."""
    path, _ = pyramid  # a square slide
    masks = tmp_path / "masks"
    masks.mkdir()
    cfg = TilingConfig(mpp=1.0, tile_size=64, mask_dir=str(masks))
    warned = []
    for w, h in [(37, 37), (300, 299), (60, 30), (100, 90)]:
        Image.fromarray(np.full((h, w), 255, np.uint8)).save(masks / "syn.png")
        caplog.clear()
        tile_slide(open_slide(path), path, "syn", cfg)
        warned += [(w, h)] if "is stretched over the whole slide" in caplog.text else []
    assert warned == [(60, 30), (100, 90)]
    assert f"mask '{masks / 'syn.png'}' is 100x90 px, aspect 1.11, but its slide's aspect is 1" in (
        caplog.text
    )


def test_an_edited_added_or_removed_mask_tiles_the_slide_again(
    tmp_path: Path, pyramid: tuple[Path, np.ndarray]
) -> None:
    path, _ = pyramid
    masks = tmp_path / "masks"
    masks.mkdir()
    out = tmp_path / "tiles"
    cfg = TileConfig(slides_dir=str(path.parent), output_dir=str(out), workers=1,
                     tiling=TilingConfig(mpp=1.0, tile_size=64, mask_dir=str(masks)))  # fmt: skip

    def tiled() -> tuple[str, int]:
        assert run_tile(cfg) == 0
        status = pd.read_csv(out / "tiling.csv").set_index("slide_id").loc["syn", "status"]
        return status, len(read_coords(out / "coords" / "syn.h5").coords)

    auto = tiled()[1]  # no mask yet: tissue detected
    half = np.zeros((10, 20), np.uint8)
    half[:, :10] = 255
    Image.fromarray(half).save(masks / "syn.png")  # added
    assert tiled() == ("ok", 4 * 8)
    assert tiled() == ("skipped", 4 * 8)
    half[:, :5] = 0
    Image.fromarray(half).save(masks / "syn.png")  # edited
    assert tiled() == ("ok", 2 * 8)
    (masks / "syn.png").unlink()  # removed
    assert tiled() == ("ok", auto)


def test_cli_tile_and_user_error(tmp_path: Path, pyramid: tuple[Path, np.ndarray]) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "melanoma_mil", "tile"]
    ok = subprocess.run(
        [*cmd, f"slides_dir={pyramid[0].parent}", f"output_dir={out}", "workers=1",
         "tiling.mpp=1.0", "tiling.tile_size=64"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "1 ok, 0 empty, 0 failed" in ok.stdout and (out / "coords" / "syn.h5").is_file()
    bad = subprocess.run([*cmd, f"slides_dir={tmp_path / 'missing'}"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "missing" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_target_finer_than_the_slide_fails_that_slide_only(
    tmp_path: Path, pyramid: tuple[Path, np.ndarray]
) -> None:
    """A 0.5 um/px scan in a cohort tiled at 0.25 um/px would be upsampled 2x (blur posing as
    detail): that slide fails with the fix, the 0.25 um/px one is tiled."""
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "fine.tiff").symlink_to(pyramid[0])
    write_pyramid(slides / "coarse.tiff", pyramid[1][::2, ::2].copy(), mpp=0.5, n_levels=2)
    out = tmp_path / "out"
    cfg = TileConfig(slides_dir=str(slides), output_dir=str(out), workers=1,
                     tiling=TilingConfig(mpp=0.25, tile_size=64))  # fmt: skip
    assert run_tile(cfg) == 1
    table = pd.read_csv(out / "tiling.csv").set_index("slide_id")
    assert table.loc["fine", "status"] == "ok"
    assert table.loc["coarse", "status"] == "failed"
    assert "scanned at 0.5 um/px, coarser than the target 0.25" in table.loc["coarse", "reason"]
    assert not (out / "coords" / "coarse.h5").exists()
    # a few percent finer (0.263 um/px 40x scans tiled at 0.25) is still tiled
    slide = open_slide(pyramid[0])
    grid = tile_slide(slide, pyramid[0], "fine", TilingConfig(mpp=0.23, tile_size=64)).grid
    assert grid.patch_level == 0 and grid.read_size == 59


@pytest.mark.parametrize(("target", "level"), [(0.735, 1), (1.74, 2)])
def test_edge_tiles_at_a_reduced_level_end_inside_the_slide(
    tmp_path: Path, target: float, level: int
) -> None:
    """Odd-sized slides have reduced levels with non-integer downsamples (768 x 641 of
    1537 x 1283: 2.0014) whose sizes are rounded down; the last row of tiles ended up to 0.3
    level px past the level's edge, a line of white (transparent) pixels in each such tile."""
    path = tmp_path / "odd.tiff"
    write_pyramid(path, tissue_image(1537)[:1283], mpp=0.25, n_levels=3)
    slide = open_slide(path)
    cfg = TilingConfig(mpp=target, tile_size=100, overlap=16, min_tissue=0.0)
    grid = tile_slide(slide, path, "odd", cfg).grid
    assert grid.patch_level == level and grid.downsample % 1 != 0
    stride = 84 * grid.read_size * grid.downsample / 100
    n = [int((side - grid.read_size * grid.downsample) // stride) + 1 for side in (1537, 1283)]
    assert len(grid.coords) == n[0] * n[1]  # moved back to fit, none dropped
    lw, lh = slide.level_dimensions[level]
    assert (grid.coords / grid.downsample + grid.read_size <= [lw, lh]).all()
    assert (grid.coords + grid.read_size * grid.downsample <= slide.dimensions).all()
    last = (grid.coords == grid.coords.max(0)).any(1)  # the last column and row of tiles
    for x, y in grid.coords[last]:
        region = slide.read_region((int(x), int(y)), level, (grid.read_size,) * 2)
        # 254 where four TIFF tiles meet: OpenSlide blends them at a fractional offset
        assert np.asarray(region)[..., 3].min() >= 254


def test_a_palette_or_transparent_mask_reads_its_labels(
    tmp_path: Path, pyramid: tuple[Path, np.ndarray]
) -> None:
    path, _ = pyramid
    masks = tmp_path / "masks"
    masks.mkdir()
    labels = np.zeros((10, 20), np.uint8)
    labels[:, :10] = 1  # tissue (label 1) on the left half, shown black on white (inverted LUT)
    mask = Image.fromarray(labels, "L").convert("P")
    mask.putpalette([255, 255, 255, 0, 0, 0])
    mask.save(masks / "syn.png")
    cfg = TilingConfig(mpp=1.0, tile_size=64, mask_dir=str(masks))
    with open_slide(path) as slide:
        coords = tile_slide(slide, path, "syn", cfg).grid.coords
        assert len(coords) == 4 * 8 and (coords[:, 0] < 1024).all()
        painted = np.full((10, 20, 4), (255, 255, 255, 0), np.uint8)  # transparent: not tissue
        painted[:, :10] = (200, 0, 0, 255)  # tissue painted red on the left half
        Image.fromarray(painted, "RGBA").save(masks / "syn.png")
        coords = tile_slide(slide, path, "syn", cfg).grid.coords
        assert len(coords) == 4 * 8 and (coords[:, 0] < 1024).all()


def test_a_user_mask_outside_the_slide_is_named_as_the_reason(tmp_path: Path) -> None:
    """A GeoJSON in microns (or another slide's) marks nothing: the reason said 'no tissue
    found ... lower tiling.tissue.min_saturation', a setting no user mask listens to."""
    slides, masks = tmp_path / "slides", tmp_path / "masks"
    slides.mkdir()
    masks.mkdir()
    write_pyramid(slides / "s.tiff", tissue_image(1024), mpp=0.5, n_levels=1)
    far = [[[5000, 5000], [6000, 5000], [6000, 6000], [5000, 5000]]]
    (masks / "s.geojson").write_text(json.dumps({"type": "Polygon", "coordinates": far}))
    cfg = TileConfig(slides_dir=str(slides), output_dir=str(tmp_path / "tiles"), workers=1,
                     tiling=TilingConfig(mpp=1.0, tile_size=64, mask_dir=str(masks)))  # fmt: skip
    assert run_tile(cfg) == 0
    reason = pd.read_csv(tmp_path / "tiles" / "tiling.csv")["reason"][0]
    assert "min_saturation" not in reason
    assert f"user mask in {masks} marks no tissue inside the slide's 1024x1024 px" in reason


def test_a_mask_too_large_for_pillow_is_one_line_saying_to_downsample_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full-resolution mask PNG (over ~179 Mpx) failed with Pillow's DecompressionBombError;
    Pillow's limit is lowered here so that a 40x40 mask stands for one."""
    from PIL import Image

    from melanoma_mil.tiling.tissue import load_user_mask

    (tmp_path / "masks").mkdir()
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(tmp_path / "masks" / "s.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(UserError, match=r"too large for Pillow to open safely; save it down"):
        load_user_mask(tmp_path / "masks", "s", (10, 10), 4.0)
