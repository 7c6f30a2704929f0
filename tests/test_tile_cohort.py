"""`tile` on a cohort: mpp_csv and the source of each mpp, the run table, the contact sheet,
claims shared with other `tile` processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from conftest import tissue_image
from PIL import Image

from melanoma_mil import progress
from melanoma_mil.config import TileConfig, TilingConfig, TissueConfig
from melanoma_mil.demo.pyramid import write_pyramid
from melanoma_mil.tiling.coords import read_coords
from melanoma_mil.tiling.fingerprint import slide_fingerprint
from melanoma_mil.tiling.qc import CELL_PX, contact_sheet, write_qc
from melanoma_mil.tiling.run import run_tile
from melanoma_mil.workshare import me


def _cohort(root: Path) -> Path:
    slides = root / "slides"
    slides.mkdir(parents=True)
    img = tissue_image(768)
    write_pyramid(slides / "tagged.tiff", img, mpp=0.5, n_levels=1)  # resolution tags
    for name in ("bare", "unknown"):  # no resolution at all
        tifffile.imwrite(slides / f"{name}.tiff", img, tile=(256, 256), photometric="rgb",
                         compression="jpeg")  # fmt: skip
    write_pyramid(slides / "blank.tiff", np.full((512, 512, 3), 243, np.uint8), 0.5, 1)
    return slides


def test_mpp_csv_sources_zero_tiles_table_and_contact_sheet(tmp_path: Path, capsys) -> None:
    slides = _cohort(tmp_path)
    mpp_csv = tmp_path / "mpp.csv"
    mpp_csv.write_text("slide_id,mpp\nbare,0.5\nblank,0.5\n")
    out = tmp_path / "tiles"
    cfg = TileConfig(slides_dir=str(slides), output_dir=str(out), workers=1,
                     mpp_csv=str(mpp_csv), tiling=TilingConfig(mpp=1.0, tile_size=64))  # fmt: skip
    assert run_tile(cfg) == 1  # 'unknown' has no resolution anywhere
    table = pd.read_csv(out / "tiling.csv").set_index("slide_id")
    assert table.loc["tagged", "mpp_source"] in ("file", "tiff resolution")
    assert table.loc["bare", "mpp_source"] == "mpp_csv" and table.loc["bare", "status"] == "ok"
    assert table.loc["unknown", "status"] == "failed"
    assert "mpp_csv" in table.loc["unknown", "reason"]
    assert table.loc["blank", "status"] == "empty" and "no tissue" in table.loc["blank", "reason"]
    assert table.loc["tagged", "reader"] == "openslide (generic-tiff)"
    printed = capsys.readouterr().out
    assert "1 failed" in printed and "unknown" in printed and "qc_contact_sheet.png" in printed

    grid = read_coords(out / "coords" / "bare.h5")
    assert grid.mpp_source == "mpp_csv" and grid.level0_mpp == 0.5
    assert grid.slide_path == str((slides / "bare.tiff").resolve())
    assert grid.fingerprint == slide_fingerprint(slides / "bare.tiff")
    assert grid.fingerprint != slide_fingerprint(slides / "unknown.tiff")  # same pixels, no tag
    sheet = Image.open(out / "qc_contact_sheet.png")
    assert sheet.width == 2 * 256  # 4 slides: 2 x 2 cells

    mpp_csv.write_text("slide_id,mpp\nbare,0.25\n")  # a corrected resolution: never mixed in
    assert run_tile(cfg) == 1
    table = pd.read_csv(out / "tiling.csv").set_index("slide_id")
    assert table.loc["tagged", "status"] == "skipped"
    assert "level-0 mpp 0.5 -> 0.25 (mpp_csv)" in table.loc["bare", "reason"]
    mpp_csv.write_text("slide_id,mpp\nblank,0.5\n")  # bare's row gone: its coords stay its
    assert run_tile(cfg) == 1
    table = pd.read_csv(out / "tiling.csv").set_index("slide_id")
    assert table.loc["bare", "status"] == "failed"
    assert "from an mpp_csv row this run does not have" in table.loc["bare", "reason"]
    # and why it is empty, as when it was tiled, not a bare 'already tiled: empty'
    assert table.loc["blank", "status"] == "skipped"
    assert table.loc["blank", "reason"].startswith("already tiled: empty (no tissue found")

    bad = subprocess.run([sys.executable, "-m", "melanoma_mil", "tile",
                          f"slides_dir={slides}", f"output_dir={tmp_path / 'x'}",
                          f"mpp_csv={tmp_path / 'nope.csv'}"],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "nope.csv" in bad.stderr and "Traceback" not in bad.stderr


def test_a_dead_tile_process_claim_is_taken_over(tmp_path: Path) -> None:
    slides = _cohort(tmp_path)
    out = tmp_path / "tiles"
    (out / "coords").mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "coords" / "tagged.lock").write_text(json.dumps({**me(), "pid": dead.pid}))
    # drafts of claims, as left by processes killed while claiming: the dead owner's goes
    dead_draft = out / "coords" / f".tagged.lock.{dead.pid}.claiming"
    dead_draft.write_text(json.dumps({**me(), "pid": dead.pid}))
    live_draft = out / "coords" / f".other.lock.{os.getpid()}.claiming"
    live_draft.write_text(json.dumps(me()))
    (out / "qc").mkdir()  # and the half-written files of the slide it was writing
    halves = [out / "coords" / ".tagged.h5.k1ll3d.tmp", out / "qc" / ".tagged.png.k1ll3d.tmp"]
    for half in halves:
        half.write_bytes(b"\x89HDF")
    cfg = TileConfig(slides_dir=str(slides), output_dir=str(out), workers=1,
                     tiling=TilingConfig(mpp=1.0, tile_size=64, default_mpp=0.5))  # fmt: skip
    assert run_tile(cfg) == 0
    assert read_coords(out / "coords" / "tagged.h5").coords.shape[0] > 0
    assert not list((out / "coords").glob("*.lock"))
    assert not dead_draft.exists() and live_draft.exists()
    assert not any(half.exists() for half in halves)


def test_a_log_gets_no_progress_line_per_slide(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 1e6)  # no redraw falls due while it runs
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(8):
        write_pyramid(slides / f"s{i}.tiff", np.full((256, 256, 3), 243, np.uint8), 0.5, 1)
    cfg = TileConfig(slides_dir=str(slides), output_dir=str(tmp_path / "tiles"), workers=1,
                     tiling=TilingConfig(mpp=1.0, tile_size=64))  # fmt: skip
    assert run_tile(cfg) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("tile: ")]
    assert len(lines) <= 2 and "8/8" in lines[-1]  # the first and the last, not one per slide


def test_a_slide_smaller_than_one_tile_says_so(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    write_pyramid(slides / "crop.tiff", tissue_image(1024)[412:612, 360:560], 0.5, 1)  # all tissue
    cfg = TileConfig(slides_dir=str(slides), output_dir=str(tmp_path / "tiles"), workers=1,
                     tiling=TilingConfig(mpp=0.5, tile_size=256, tissue=TissueConfig(
                         min_area_um2=0)))  # fmt: skip
    assert run_tile(cfg) == 0
    row = pd.read_csv(tmp_path / "tiles" / "tiling.csv").iloc[0]
    assert row["status"] == "empty" and "min_tissue" not in row["reason"]  # lowering it: no use
    assert "(200x200 px) is smaller than one tile (256 level-0 px" in row["reason"]


def test_the_contact_sheet_reuses_each_slides_cell(tmp_path: Path) -> None:
    """A rerun's sheet decodes only new or changed QC images (each cell is kept in
    .qc_cells), and is pixel for pixel the sheet made from every QC image again."""
    out = tmp_path / "tiles"
    cfg = TileConfig(slides_dir=str(_cohort(tmp_path)), output_dir=str(out), workers=1,
                     tiling=TilingConfig(mpp=1.0, tile_size=64, default_mpp=0.5))  # fmt: skip
    sheet = out / "qc_contact_sheet.png"

    def uncached() -> np.ndarray:
        table = pd.read_csv(out / "tiling.csv")
        cells = [(r.slide_id, out / "qc" / f"{r.slide_id}.png", f"{r.n_tiles}")
                 for r in table.itertuples()]  # fmt: skip
        return np.asarray(contact_sheet(cells, tmp_path / "plain.png"))

    assert run_tile(cfg) == 0
    first = np.asarray(Image.open(sheet))
    assert np.array_equal(first, uncached())
    assert len(list((out / ".qc_cells").glob("*.png"))) == 4

    qc = out / "qc" / "tagged.png"  # garbage of the same size and mtime: kept cell used as is
    stat = qc.stat()
    qc.write_bytes(b"\0" * stat.st_size)
    os.utime(qc, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    sheet.unlink()
    assert run_tile(cfg) == 0
    assert np.array_equal(np.asarray(Image.open(sheet)), first)

    write_qc(qc, Image.new("RGB", (300, 200), (255, 0, 0)))  # a changed QC image: made again
    assert run_tile(cfg) == 0
    again = np.asarray(Image.open(sheet))
    assert np.array_equal(again, uncached()) and not np.array_equal(again, first)


def test_kept_cells_go_with_their_qc_image_and_killed_writers_temps_after_a_day(
    tmp_path: Path,
) -> None:
    """A cell is kept while its slide's QC image is: a slide left out of this run (another
    array task's share) keeps it, one whose QC image the user removed loses it."""
    out = tmp_path / "tiles"
    slides = _cohort(tmp_path)
    cfg = TileConfig(slides_dir=str(slides), output_dir=str(out), workers=1,
                     tiling=TilingConfig(mpp=1.0, tile_size=64, default_mpp=0.5))  # fmt: skip
    assert run_tile(cfg) == 0
    cells = out / ".qc_cells"
    (slides / "bare.tiff").unlink()  # out of this run; its QC image stays
    (slides / "blank.tiff").unlink()
    (out / "qc" / "blank.png").unlink()  # removed by its user
    old, new = cells / ".tagged.png.x1y2.tmp", cells / ".unknown.png.a3b4.tmp"
    old.write_bytes(b"torn")
    new.write_bytes(b"being written")
    os.utime(old, (1e9, 1e9))
    assert run_tile(cfg) == 0
    assert sorted(p.name for p in cells.iterdir()) == [
        ".unknown.png.a3b4.tmp", "bare.png", "tagged.png", "unknown.png"
    ]  # fmt: skip


def test_an_unreadable_qc_image_greys_its_cell_not_the_whole_sheet(tmp_path: Path) -> None:
    out = tmp_path / "tiles"
    cfg = TileConfig(slides_dir=str(_cohort(tmp_path)), output_dir=str(out), workers=1,
                     tiling=TilingConfig(mpp=1.0, tile_size=64, default_mpp=0.5))  # fmt: skip
    assert run_tile(cfg) == 0
    shutil.rmtree(out / ".qc_cells")
    (out / "qc" / "tagged.png").write_bytes(b"not a png")  # torn by a full disk, say
    (out / "qc_contact_sheet.png").unlink()
    assert run_tile(cfg) == 0
    sheet = np.asarray(Image.open(out / "qc_contact_sheet.png"))
    cells = pd.read_csv(out / "tiling.csv")["slide_id"].tolist()
    i, cols, cell, label = cells.index("tagged"), 2, CELL_PX, 12  # 4 slides: 2 x 2 cells
    left, top = (i % cols) * cell, (i // cols) * (cell + label)
    grey = sheet[top + label + 10 : top + label + cell - 10, left + 10 : left + cell - 10]
    assert (grey == 200).all()
