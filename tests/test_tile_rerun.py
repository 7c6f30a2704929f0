"""`tile` re-run on a cohort that changed: a slide re-scanned in place, a same-named slide from
elsewhere, linked slides and folders, a slide whose reader crashes its process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import CMU, tissue_image

from melanoma_mil.config import EncoderConfig, ExtractConfig, TileConfig, TilingConfig
from melanoma_mil.demo.pyramid import write_pyramid
from melanoma_mil.errors import UserError
from melanoma_mil.features.run import run_extract
from melanoma_mil.tiling.coords import read_coords
from melanoma_mil.tiling.find import find_slides
from melanoma_mil.tiling.fingerprint import slide_fingerprint
from melanoma_mil.tiling.run import run_tile
from melanoma_mil.workshare import me, process_start

TILING = TilingConfig(mpp=1.0, tile_size=64)
ROOT = Path(__file__).resolve().parents[1]


def _tile(slides: Path, out: Path, workers: int = 1) -> int:
    return run_tile(
        TileConfig(slides_dir=str(slides), output_dir=str(out), workers=workers, tiling=TILING)
    )


def _table(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "tiling.csv", keep_default_na=False).set_index("slide_id")


def _slide(path: Path, seed: int = 0, side: int = 768) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_pyramid(path, tissue_image(side, seed), mpp=0.5, n_levels=1)
    return path


def test_a_slide_rescanned_in_place_is_tiled_again_another_file_is_refused(
    tmp_path: Path,
) -> None:
    slides, out = tmp_path / "slides", tmp_path / "tiles"
    _slide(slides / "a.tiff")
    _slide(slides / "b.tiff", seed=1)
    assert _tile(slides, out) == 0
    _slide(slides / "a.tiff", seed=2, side=896)  # re-scanned: same name, another file

    assert _tile(slides, out) == 0
    table = _table(out)
    assert table.loc["a", "status"] == "ok" and table.loc["b", "status"] == "skipped"
    assert read_coords(out / "coords" / "a.h5").fingerprint == slide_fingerprint(slides / "a.tiff")

    other = _slide(tmp_path / "elsewhere" / "a.tiff", seed=3)  # another cohort's slide 'a'
    coords = out / "coords" / "a.h5"
    stamp = coords.stat().st_mtime_ns
    assert _tile(other.parent, out) == 1
    reason = _table(out).loc["a", "reason"]
    assert str(coords) in reason and "delete it" in reason and str(slides / "a.tiff") in reason
    assert coords.stat().st_mtime_ns == stamp


def test_linked_folders_are_searched_each_real_folder_once(tmp_path: Path) -> None:
    store, slides = tmp_path / "store", tmp_path / "slides"
    _slide(store / "more" / "m.tiff")
    _slide(slides / "plain" / "p.tiff", seed=1)
    os.symlink(store / "more", slides / "batch2")  # a linked folder
    os.symlink(store / "more", slides / "batch2_again")  # the same folder twice
    os.symlink(slides, slides / "plain" / "loop")  # a loop
    found = find_slides(slides, None, [".tiff"], slides)
    assert sorted(found) == ["m", "p"]
    assert found["m"].parent.name in ("batch2", "batch2_again")


def test_a_linked_slide_is_reopened_by_extract_without_slides_dir(tmp_path: Path) -> None:
    target = _slide(tmp_path / "store" / "scan_0001.tiff")
    slides = tmp_path / "slides"
    slides.mkdir()
    os.symlink(target, slides / "linked.tiff")
    out = tmp_path / "tiles"
    assert _tile(slides, out) == 0
    cfg = ExtractConfig(coords_dir=str(out), output_dir=str(tmp_path / "f"), num_workers=0,
                        encoder=EncoderConfig(name="resnet18_imagenet", pretrained=False),
                        batch_size=16, device="cpu")  # fmt: skip
    assert run_extract(cfg) == 0  # the recorded path is re-opened: the same fingerprint
    grid = read_coords(out / "coords" / "linked.h5")
    assert grid.slide_path == str(slides / "linked.tiff")  # the link, not its target


def _crasher(tmp_path: Path, opens: Path) -> Path:
    """A sitecustomize folder: OpenSlide kills its process on slides named a_crash*, and
    appends its pid to ``opens`` on each other slide."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "import openslide\n"
        "_init = openslide.OpenSlide.__init__\n"
        "def _crash(self, filename, *a, **k):\n"
        "    if os.path.basename(str(filename)).startswith('a_crash'):\n"
        "        os._exit(139)\n"
        f"    with open({str(opens)!r}, 'a') as f:\n"
        "        f.write(f'{os.getpid()}\\n')\n"
        "    _init(self, filename, *a, **k)\n"
        "openslide.OpenSlide.__init__ = _crash\n"
    )
    return inject


def _tile_in_a_process(slides: Path, out: Path, inject: Path) -> int:
    """`_tile` with 2 workers in a fresh Python whose tile workers (not itself) load ``inject``:
    the forkserver they fork from starts with this PYTHONPATH (it keeps its start's env)."""
    code = (
        "import os, sys\n"
        f"os.environ['PYTHONPATH'] = {str(inject)!r}\n"
        "from melanoma_mil.config import TileConfig, TilingConfig\n"
        "from melanoma_mil.tiling.run import run_tile\n"
        f"sys.exit(run_tile(TileConfig(slides_dir={str(slides)!r}, output_dir={str(out)!r}, "
        f"workers=2, tiling=TilingConfig(mpp={TILING.mpp}, tile_size={TILING.tile_size}))))\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode


def test_a_crashing_slide_fails_alone(tmp_path: Path) -> None:
    """A reader that kills its process (a segfault in libopenslide on a corrupt file, an OOM
    kill) must not fail the slides the other workers were tiling, in this run or the next."""
    opens = tmp_path / "opens.txt"  # the process that opened each slide
    inject = _crasher(tmp_path, opens)
    slides = tmp_path / "slides"
    others = [f"slide{i}" for i in range(1, 9)]
    for i, sid in enumerate(("a_crash", *others)):  # crashes first
        _slide(slides / f"{sid}.tiff", seed=i)
    out = tmp_path / "tiles"
    assert _tile_in_a_process(slides, out, inject) == 1
    table = _table(out)
    assert table.loc["a_crash", "status"] == "failed"
    assert "process died" in table.loc["a_crash", "reason"]
    # a worker the pool killed as it broke may have written its slide's coords just before:
    # the retry then finds them done ("skipped: tiled by another process"), never failed
    for sid in others:
        assert table.loc[sid, "status"] in ("ok", "skipped"), table.loc[sid, "reason"]
        assert (out / "coords" / f"{sid}.h5").is_file()
    # a process each only for the slide in flight beside it (not for every slide after it:
    # a spawn per slide for the rest of a cohort); the others in a new pool of 2
    assert len(set(opens.read_text().split())) <= 1 + 1 + 2

    assert _tile_in_a_process(slides, out, inject) == 1  # a re-run gets past it too
    table = _table(out)
    assert {table.loc[s, "status"] for s in others} == {"skipped"}
    assert table.loc["a_crash", "status"] == "failed"


def _files(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_other_settings_are_refused_before_any_slide_is_touched(tmp_path: Path) -> None:
    """A folder tiled at 1 um/px re-run at 0.5: one line and exit 2 up front, not every slide
    'failed' and tiling.csv rewritten to say so; overwrite=true, the fix it names, works."""
    slides, out = tmp_path / "slides", tmp_path / "tiles"
    slides.mkdir()
    if CMU.is_file():
        (slides / "aperio.svs").symlink_to(CMU)  # a real Aperio scan
    else:  # a fresh clone without ../shared: a second pyramid in its place
        _slide(slides / "aperio.tiff", seed=1)
    _slide(slides / "b.tiff")
    assert _tile(slides, out) == 0
    before, table = _files(out), (out / "tiling.csv").read_bytes()
    kept = (out / "coords" / "aperio.h5").read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "melanoma_mil", "tile", f"slides_dir={slides}",
         f"output_dir={out}", "tiling.mpp=0.5", "tiling.tile_size=64", "workers=1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    err = proc.stderr.strip()
    assert proc.returncode == 2 and err.count("\n") == 0 and "Traceback" not in err
    assert f"output_dir '{out}'" in err and "tiling.mpp: 1.0 in the folder, 0.5 now" in err
    assert "overwrite=true" in err and "another output_dir" in err
    assert _files(out) == before and (out / "tiling.csv").read_bytes() == table

    cfg = TileConfig(slides_dir=str(slides), output_dir=str(out), workers=1, overwrite=True,
                     tiling=TilingConfig(mpp=0.5, tile_size=64))  # fmt: skip
    assert run_tile(cfg) == 0
    assert read_coords(out / "coords" / "aperio.h5").tiling["mpp"] == 0.5
    (out / "coords" / "aperio.h5").write_bytes(kept)  # a folder of both: say how many differ
    cfg.overwrite = False
    with pytest.raises(UserError, match=r"\(1 of the 2 tiled slides: tiling.mpp: 1.0 in the"):
        run_tile(cfg)
    shutil.rmtree(out / "coords")  # only coords count: a folder without them is tiled
    assert run_tile(cfg) == 0


def test_default_mpp_as_tile_advises_tiles_the_slide_without_one_and_keeps_the_others(
    tmp_path: Path,
) -> None:
    """tile's fix for a slide without resolution is mpp_csv or tiling.default_mpp; the second
    must not be refused as 'other settings' for the slides that record their own mpp."""
    import tifffile

    slides, out = tmp_path / "slides", tmp_path / "tiles"
    _slide(slides / "a.tiff")  # records 0.5 um/px
    with tifffile.TiffWriter(slides / "b.tiff") as tif:  # records no resolution
        tif.write(tissue_image(768, 1), tile=(256, 256), photometric="rgb")
    assert _tile(slides, out) == 1
    assert "tiling.default_mpp" in _table(out).loc["b", "reason"]
    kept = (out / "coords" / "a.h5").stat().st_mtime_ns
    cfg = TileConfig(slides_dir=str(slides), output_dir=str(out), workers=1,
                     tiling=TilingConfig(mpp=1.0, tile_size=64, default_mpp=0.5))  # fmt: skip
    assert run_tile(cfg) == 0
    table = _table(out)
    assert table.loc["a", "status"] == "skipped" and table.loc["b", "status"] == "ok"
    assert (out / "coords" / "a.h5").stat().st_mtime_ns == kept
    assert read_coords(out / "coords" / "b.h5").mpp_source == "default"


def test_a_crashing_slide_taken_over_from_a_dead_peer_fails_alone(tmp_path: Path) -> None:
    """A peer killed by a slide left its claim; taking the slide over in-process (as the wait
    for peers' slides did, whatever `workers` said) killed this process too: no table."""
    inject = _crasher(tmp_path, tmp_path / "opens.txt")
    slides, out = tmp_path / "slides", tmp_path / "tiles"
    for i, sid in enumerate(("a_crash", "slide1")):
        _slide(slides / f"{sid}.tiff", seed=i)
    (out / "coords").mkdir(parents=True)
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    owner = {**me(), "pid": peer.pid, "start": process_start(peer.pid)}
    (out / "coords" / "a_crash.lock").write_text(json.dumps(owner))
    tile = subprocess.Popen(
        [sys.executable, "-m", "melanoma_mil", "tile", f"slides_dir={slides}",
         f"output_dir={out}", "workers=2", "tiling.mpp=1.0", "tiling.tile_size=64"],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(inject), str(ROOT)])},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert tile.stderr is not None
    for line in tile.stderr:  # the peer dies once tile waits for its slide
        if "waiting for 1 slide(s)" in line:
            break
    peer.kill()
    peer.wait()
    tile.stderr.read()
    assert tile.wait() == 1
    table = _table(out)
    assert table.loc["slide1", "status"] == "ok"
    assert "process died" in table.loc["a_crash", "reason"]
