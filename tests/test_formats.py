"""Every slide format we can produce here: opened, tiled at a target mpp and extracted.

Files come from real writers (tests/slide_writers.py): tifffile with each vendor's headers
(generic TIFF, Aperio SVS, Hamamatsu NDPI, Philips TIFF, Ventana BIF, Leica SCN), OME-TIFF
(tifffile), CZI (Zeiss's pylibCZIrw) and a DICOM WSI series (wsidicomizer). MIRAX is not
covered: no library writes it (README, "Slide formats").
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import tissue_image
from PIL import Image
from slide_writers import SCN_OFFSET, WRITERS, dicom_wsi, write_slide

from melanoma_mil.config import EncoderConfig, ExtractConfig, TileConfig, TilingConfig
from melanoma_mil.errors import UserError
from melanoma_mil.features.run import run_extract
from melanoma_mil.tiling.find import find_slides
from melanoma_mil.tiling.run import run_tile
from melanoma_mil.tiling.slides import find_mpp, open_slide

BACKENDS = {"ome-tiff": "tifffile", "zeiss-czi": "pylibczirw"}
OFFSETS = {"leica": SCN_OFFSET}  # level-0 px between the slide's origin and the image's


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    pytest.importorskip("pylibCZIrw")
    pytest.importorskip("wsidicomizer")
    folder = tmp_path_factory.mktemp("formats") / "slides"
    folder.mkdir()
    img = tissue_image(1100)[:770, :1030]
    for fmt in WRITERS:
        write_slide(fmt, folder, img)
    return folder, img


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_each_format_opens_with_its_resolution_and_pixels(
    cohort: tuple[Path, np.ndarray], fmt: str
) -> None:
    folder, img = cohort
    slides = find_slides(folder, None, TileConfig().extensions, folder)
    slide = open_slide(slides[fmt])
    try:
        assert slide.properties["openslide.vendor"] == fmt
        assert slide.backend == BACKENDS.get(fmt, "openslide")
        assert find_mpp(slide) == (pytest.approx(0.5), "file")
        off = OFFSETS.get(fmt, 0)
        for x, y in ((300, 200), (640, 448)):
            tile = np.asarray(slide.read_region((x + off, y + off), 0, (64, 64)))[..., :3]
            tile = tile.astype(int)
            assert np.abs(tile - img[y : y + 64, x : x + 64]).mean() < 3  # JPEG noise only
        level = slide.get_best_level_for_downsample(4.1)  # the reduced level the writer made
        ds = slide.level_downsamples[level]
        x, y, n = 400, 300, 32
        small = np.asarray(slide.read_region((x + off, y + off), level, (n, n)))[..., :3]
        small = small.astype(int)
        h, w = img.shape[:2]
        ref = np.asarray(Image.fromarray(img).resize((round(w / ds), round(h / ds)),
                                                     Image.BILINEAR), int)  # fmt: skip
        lx, ly = round(x / ds), round(y / ds)
        err = min(  # within a pixel: vendors round level offsets their own way
            np.abs(small - ref[ly + dy : ly + dy + n, lx + dx : lx + dx + n]).mean()
            for dx in (-1, 0, 1)
            for dy in (-1, 0, 1)
        )
        assert err < 14  # JPEG at 1/4 scale
    finally:
        slide.close()


def test_every_format_is_tiled_at_a_target_mpp_and_extracted(
    cohort: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    folder, _ = cohort
    tiling = TilingConfig(mpp=2.0, tile_size=32)  # 4x level 0: each format's reduced level
    tile = TileConfig(slides_dir=str(folder), output_dir=str(tmp_path / "tiles"), workers=1,
                      tiling=tiling)  # fmt: skip
    assert run_tile(tile) == 0
    tiled = pd.read_csv(tmp_path / "tiles" / "tiling.csv").set_index("slide_id")
    assert sorted(tiled.index) == sorted(WRITERS)
    assert (tiled["status"] == "ok").all() and (tiled["mpp_source"] == "file").all()
    extract = ExtractConfig(
        coords_dir=str(tmp_path / "tiles"), output_dir=str(tmp_path / "features"),
        slides_dir=str(folder), batch_size=64, num_workers=0, device="cpu", reader="fast",
        encoder=EncoderConfig(name="resnet18_imagenet", pretrained=False),
    )  # fmt: skip
    assert run_extract(extract) == 0
    (csv,) = (tmp_path / "features").glob("*/extract.csv")
    table = pd.read_csv(csv).set_index("slide_id")
    assert (table["status"] == "ok").all()
    assert table.loc["aperio", "reader"] == "tiff-jpeg-subpx"  # level downsample 4.009
    assert table.loc["ome-tiff", "reader"] == "tifffile"
    bags = {}
    for sid in WRITERS:
        with h5py.File(csv.parent / f"{sid}.h5", "r") as f:
            bags[sid] = (f["coords"][:] - OFFSETS.get(sid, 0), f["features"][:].astype(np.float32))
    ref_xy, ref = bags["generic-tiff"]
    for sid, (xy, feats) in bags.items():  # the same tissue gives the same features everywhere
        dist = np.abs(ref_xy[:, None, :] - xy[None, :, :]).max(2)  # grids of non-integer
        near = dist.argmin(1)  # downsamples are shifted by rounding: pair within 2 px
        pair = dist[np.arange(len(ref_xy)), near] <= 2
        assert pair.mean() >= 0.8, sid
        a, b = ref[pair], feats[near[pair]]
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        # Leica: OpenSlide places the image on the reduced level 1 px off the others (its level
        # downsample, 3.9992, comes from the collection area around the image)
        assert cos.mean() > (0.9 if sid == "leica" else 0.98), (sid, cos.mean())


def test_a_truncated_ome_tiff_is_reported_as_truncated(tmp_path: Path) -> None:
    """A cut-off OME-TIFF copy loses its XML (so its mpp) and its last tiles: it fails as
    truncated, not as 'records no resolution' (whose fix, an mpp_csv row, then failed with
    'Jpeg8Error: Empty input file')."""
    slide = write_slide("ome-tiff", tmp_path, tissue_image(1024))
    cut = tmp_path / "cut.ome.tiff"
    cut.write_bytes(slide.read_bytes()[: slide.stat().st_size // 2])
    with pytest.raises(UserError, match=r"cut.ome.tiff' is truncated .*copy or re-export"):
        open_slide(cut)
    assert find_mpp(open_slide(slide))[0] == pytest.approx(0.5)


def test_a_single_level_ome_tif_keeps_the_mpp_of_its_xml(tmp_path: Path) -> None:
    """An OME-TIFF of one level named .tif went to OpenSlide, which reads no OME XML: 'records
    no resolution'. Its XML's size, also in the Greek mu some writers use, gives the mpp."""
    img = tissue_image(512)
    for name, unit in (("plain.tif", "\u00b5m"), ("greek.tif", "\u03bcm")):
        meta = {"PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25, "axes": "YXS",
                "PhysicalSizeXUnit": unit, "PhysicalSizeYUnit": unit}  # fmt: skip
        with tifffile.TiffWriter(tmp_path / name, ome=True) as tif:
            tif.write(img, tile=(256, 256), photometric="rgb", compression="jpeg", metadata=meta)
        slide = open_slide(tmp_path / name)
        assert slide.backend == "tifffile"
        assert find_mpp(slide) == (pytest.approx(0.25), "file")
        region = np.asarray(slide.read_region((192, 192), 0, (64, 64)))[..., :3]
        assert np.abs(region.astype(int) - img[192:256, 192:256]).mean() < 8  # JPEG noise


def test_an_ome_size_written_with_a_comma_or_blank_opens(tmp_path: Path) -> None:
    """PhysicalSizeX="0,5" (a comma-decimal locale) or "" failed the slide with 'ValueError:
    could not convert string to float', an mpp_csv row for it too: it could not be opened."""
    slide = write_slide("ome-tiff", tmp_path, tissue_image(1024))
    xml = tifffile.tiffcomment(slide)
    assert 'PhysicalSizeX="0.5"' in xml
    for size, mpp in (("0,5", 0.5), ("", None)):
        tifffile.tiffcomment(slide, xml.replace('PhysicalSizeX="0.5"', f'PhysicalSizeX="{size}"'))
        with open_slide(slide) as reader:
            assert find_mpp(reader)[0] == (pytest.approx(mpp) if mpp else None)


def _open_fds(path: Path) -> int:
    """How many of this process's file descriptors point at ``path`` (Linux /proc)."""
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == str(path.resolve()))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc")
def test_a_refused_czi_is_closed(tmp_path: Path) -> None:
    """A grey (not Bgr24) CZI is refused, and closed: the refusal held the file open for as
    long as its error was kept (its traceback keeps the half-made reader)."""
    czi = pytest.importorskip("pylibCZIrw.czi")
    path = tmp_path / "grey.czi"
    with czi.create_czi(str(path), exist_ok=True) as w:
        w.write(data=np.full((600, 700), 128, np.uint8), location=(0, 0))
    with pytest.raises(UserError, match=r"grey.czi': CZI pixel type\(s\) \['Gray8'\]") as refused:
        open_slide(path)
    assert refused.value is not None  # the error, and the reader's frame with it, still held
    assert _open_fds(path) == 0


def _two_series_in_one_folder(root: Path) -> tuple[Path, list[Path], list[Path]]:
    """Folder ``root/two`` holding two DICOM WSI series (wsidicomizer), and each one's files."""
    pytest.importorskip("wsidicomizer")
    img = tissue_image(600)[:512, :512]
    one, other = dicom_wsi(root / "two", img, 0.5), dicom_wsi(root / "other", img[::-1], 0.5)
    first, second = sorted(one.glob("*.dcm")), sorted(other.glob("*.dcm"))
    for f in second:
        f.rename(one / f.name)
    other.rmdir()
    return one, first, [one / f.name for f in second]


def test_a_slide_folder_of_two_dicom_series_fails_alone(tmp_path: Path) -> None:
    """OpenSlide opens the series of the file it is given: a folder of two series was one of
    them tiled under the folder's name, the other silently dropped."""
    slides = tmp_path / "slides"
    _two_series_in_one_folder(slides)
    write_slide("generic-tiff", slides, tissue_image(600)[:512, :512])
    tile = TileConfig(slides_dir=str(slides), output_dir=str(tmp_path / "tiles"), workers=1,
                      slide_timeout_s=0, tiling=TilingConfig(mpp=2.0, tile_size=32))  # fmt: skip
    assert run_tile(tile) == 1
    table = pd.read_csv(tmp_path / "tiles" / "tiling.csv").set_index("slide_id")
    assert table.loc["generic-tiff", "status"] == "ok"
    assert table.loc["two", "status"] == "failed"
    assert "holds 2 DICOM series" in table.loc["two", "reason"]
    assert not (tmp_path / "tiles" / "two.h5").exists()


def test_a_manifest_naming_one_dicom_series_twice_is_refused(tmp_path: Path) -> None:
    _, first, second = _two_series_in_one_folder(tmp_path / "slides")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"slide_id,path\ns1,{first[0]}\ns2,{first[-1]}\n")
    with pytest.raises(UserError, match=r"'s1' and 's2' .* are one DICOM WSI series"):
        find_slides(None, manifest, TileConfig().extensions, tmp_path / "out")
    single = dicom_wsi(tmp_path / "single", tissue_image(600)[:512, :512], 0.5)
    last = sorted(single.glob("*.dcm"))[-1]
    manifest.write_text(f"slide_id,path\ns1,{single}\ns2,{last}\n")  # a folder and its file
    with pytest.raises(UserError, match="are one DICOM WSI series"):
        find_slides(None, manifest, TileConfig().extensions, tmp_path / "out")
    manifest.write_text(f"slide_id,path\ns1,{first[0]}\ns2,{second[0]}\n")  # two series: two
    found = find_slides(None, manifest, TileConfig().extensions, tmp_path / "out")
    assert found == {"s1": first[0], "s2": second[0]}
