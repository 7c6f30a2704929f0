"""A folder a command writes into that exists but cannot be written (a read-only mount, another
user's folder) is refused before any work, in one line naming it: each slide used to fail on it
one by one, each after its tiling or encoding. Real read-only bind mounts (root only)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import (
    Pipeline,
    inference_cfg,
    make_cohort,
    one_thread_env,
    read_only_bind,
    write_grid,
)
from test_config import one_line_error
from test_extract import not_built
from test_extract_cache import _cfg
from test_tile_disk import _slides

from melanoma_mil.config import FitConfig, PredictConfig, TileConfig, TilingConfig, load_config
from melanoma_mil.data.synthetic import make_bag_cohort
from melanoma_mil.demo.pyramid import write_pyramid
from melanoma_mil.errors import UserError
from melanoma_mil.features import run as features_run
from melanoma_mil.features.run import run_extract
from melanoma_mil.inference.predict import run_predict
from melanoma_mil.tiling.coords import write_coords
from melanoma_mil.tiling.run import run_tile
from melanoma_mil.training.cv import run_fit


def _refused(folder: Path, command: str) -> str:
    return f"`{command}`'s folder '{folder}' cannot be written (Read-only file system"


@pytest.mark.parametrize("name", ["coords", "qc", ".qc_cells"])
def test_tile_refuses_a_read_only_folder_it_writes_before_tiling(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    slides = _slides(tmp_path, 2)
    out = tmp_path / "tiles"
    with read_only_bind(out / name):
        keys = (f"slides_dir={slides}", f"output_dir={out}", "workers=1", "tiling.mpp=1.0",
                "tiling.tile_size=64")  # fmt: skip
        err = one_line_error(capsys, "tile", *keys)
        assert _refused(out / name, "tile") in err and "fix its permissions" in err
    assert not list(out.rglob("*.h5")) and not list(out.rglob("*.png"))


def test_extract_refuses_a_read_only_cache_folder_before_encoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the encoder is even built (weights loaded, maybe downloaded)."""
    tiles = make_cohort(tmp_path, 2)
    out = tmp_path / "features"
    assert run_extract(_cfg(tiles, out)) == 0
    (bag,) = out.glob("*/slide1.h5")
    bag.unlink()  # one slide left to encode
    monkeypatch.setattr(features_run, "build_encoder", not_built)
    with read_only_bind(bag.parent), pytest.raises(UserError, match="cannot be written") as e:
        run_extract(_cfg(tiles, out))
    assert _refused(bag.parent, "extract") in str(e.value)
    assert not bag.exists()


def test_predict_refuses_a_read_only_folder_of_a_slide_it_draws_only(
    pipe: Pipeline, tmp_path: Path
) -> None:
    out = tmp_path / "pred"
    given = (f"slides_dir={pipe.slides}", f"features_dir={pipe.features}")
    with read_only_bind(out / "slide_001"):
        assert run_predict(inference_cfg(PredictConfig, pipe, out, *given,
                                         "slide_ids=[slide_000]")) == 0  # fmt: skip
        both = inference_cfg(
            PredictConfig, pipe, out, *given, "slide_ids=[slide_000,slide_001]", "overwrite=true"
        )
        with pytest.raises(UserError, match="cannot be written") as e:
            run_predict(both)
        assert _refused(out / "slide_001", "predict") in str(e.value)
    assert pd.read_csv(out / "predictions.csv")["slide_id"].tolist() == ["slide_000"]


def test_predict_refuses_a_read_only_folder_in_work_before_tiling(
    pipe: Pipeline, tmp_path: Path
) -> None:
    out = tmp_path / "pred"
    given = (f"slides_dir={pipe.slides}", "heatmaps=false")
    assert (
        run_predict(inference_cfg(PredictConfig, pipe, out, *given, "slide_ids=[slide_000]")) == 0
    )
    (work,) = (out / "_work").iterdir()
    (cache,) = (p for p in (work / "features").iterdir() if p.is_dir())
    for folder in (work / "tiles" / "qc", work / "tiles" / "coords", cache):
        cfg = inference_cfg(
            PredictConfig, pipe, out, *given, "slide_ids=[slide_001]", "overwrite=true"
        )
        with read_only_bind(folder), pytest.raises(UserError, match="cannot be written") as e:
            run_predict(cfg)
        assert _refused(folder, "predict") in str(e.value)
        assert not list(work.rglob("slide_001*"))  # neither tiled nor encoded


def test_tile_reads_read_only_coords_and_qc_when_every_slide_is_tiled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A finished tiling on a read-only share is only read again: not refused."""
    slides = _slides(tmp_path, 2)
    out = tmp_path / "tiles"
    cfg = TileConfig(slides_dir=str(slides), output_dir=str(out), workers=1,
                     tiling=TilingConfig(mpp=1.0, tile_size=64))  # fmt: skip
    assert run_tile(cfg) == 0
    made = {p: p.stat().st_mtime_ns for p in out.rglob("*.h5")}
    with read_only_bind(out / "coords"), read_only_bind(out / "qc"):
        assert run_tile(cfg) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.h5")} == made


@pytest.mark.parametrize("made", ["now", "before precision records"])
def test_extract_reads_a_complete_read_only_cache_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], made: str
) -> None:
    """Every slide encoded: the read-only cache (a lab's finished, shared one) is used as it is,
    exit 0: no bag is touched and its table is kept, as one printed line says (exit 1 before:
    extract.csv could not be rewritten). A cache made before folders recorded their precision
    is read as well, its precision taken from its bags, not recorded (an OSError before)."""
    tiles = make_cohort(tmp_path, 2)
    out = tmp_path / "features"
    assert run_extract(_cfg(tiles, out)) == 0
    (cache,) = (p for p in out.iterdir() if p.is_dir())
    if made != "now":
        (cache / ".precision.json").unlink()
    made = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    table = (cache / "extract.csv").read_bytes()
    capsys.readouterr()
    with read_only_bind(cache):
        assert run_extract(_cfg(tiles, out)) == 0
    printed = capsys.readouterr().out
    assert f"table: {cache / 'extract.csv'} left as it was (the folder is read-only)" in printed
    assert "slide0" in printed and "slide1" in printed and "skipped" in printed
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == made
    assert (cache / "extract.csv").read_bytes() == table


def test_predict_scores_from_a_read_only_complete_work_cache(
    pipe: Pipeline, tmp_path: Path
) -> None:
    out = tmp_path / "pred"
    given = (f"slides_dir={pipe.slides}", "heatmaps=false", "slide_ids=[slide_000]")
    assert run_predict(inference_cfg(PredictConfig, pipe, out, *given)) == 0
    first = pd.read_csv(out / "predictions.csv")
    (work,) = (out / "_work").iterdir()
    (cache,) = (p for p in (work / "features").iterdir() if p.is_dir())
    with ExitStack() as stack:
        for folder in (work / "tiles" / "coords", work / "tiles" / "qc", cache):
            stack.enter_context(read_only_bind(folder))
        cfg = inference_cfg(PredictConfig, pipe, out, *given, "overwrite=true")
        assert run_predict(cfg) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "predictions.csv"), first)


def test_predict_refuses_a_read_only_work_folder_holding_stale_files_before_deleting_any(
    pipe: Pipeline, tmp_path: Path
) -> None:
    """Coords made at another mpp sit in a read-only coords folder: one line before any stale
    file is deleted (it was a traceback midway, after deleting the slide's features)."""
    out, table = tmp_path / "pred", tmp_path / "mpp.csv"
    table.write_text("slide_id,mpp\nslide_000,0.25\n")  # the file says 0.5: its coords go stale
    given = (f"slides_dir={pipe.slides}", "heatmaps=false", "slide_ids=[slide_000]")
    assert run_predict(inference_cfg(PredictConfig, pipe, out, *given)) == 0
    (work,) = (out / "_work").iterdir()
    coords = work / "tiles" / "coords"
    kept = sorted(work.rglob("slide_000*.h5"))
    cfg = inference_cfg(PredictConfig, pipe, out, *given, f"mpp_csv={table}", "overwrite=true")
    with read_only_bind(coords), pytest.raises(UserError, match="cannot be written") as e:
        run_predict(cfg)
    assert _refused(coords, "predict") in str(e.value)
    assert sorted(work.rglob("slide_000*.h5")) == kept and len(kept) == 2


@pytest.mark.parametrize("why", ["zero tiles", "no slide file"])
def test_extract_reads_a_complete_read_only_cache_with_a_slide_it_cannot_encode(
    tmp_path: Path, why: str
) -> None:
    """A slide with no bag that extract never encodes (a blank slide's empty coords, a slide
    whose file is gone) leaves nothing to write: the complete cache is not refused for it."""
    tiles = make_cohort(tmp_path, 2)
    slide = tmp_path / "slides" / "slide2.tif"
    shutil.copy(tmp_path / "slides" / "slide0.tif", slide)
    grid = write_grid(tiles, slide, 384, 64)
    if why == "zero tiles":
        write_coords(tiles / "coords" / "slide2.h5", replace(grid, coords=grid.coords[:0]))
    else:
        slide.unlink()
    out = tmp_path / "features"
    run_extract(_cfg(tiles, out))
    (cache,) = (p for p in out.iterdir() if p.is_dir())
    made = {p: p.stat().st_mtime_ns for p in cache.glob("*.h5")}
    assert sorted(p.stem for p in made) == ["slide0", "slide1"]
    with read_only_bind(cache):  # a slide with no file fails; one with no tiles is empty
        assert run_extract(_cfg(tiles, out)) == (1 if why == "no slide file" else 0)
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.h5")} == made


def test_predict_scores_from_a_read_only_work_cache_with_a_blank_slide(
    pipe: Pipeline, tmp_path: Path
) -> None:
    """A blank slide (zero tiles) never has a bag: the complete _work cache is only read."""
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(pipe.slides / "slide_000.tiff", slides / "slide_000.tiff")
    write_pyramid(slides / "blank.tiff", np.full((512, 512, 3), 245, np.uint8), mpp=0.5,
                  n_levels=1)  # fmt: skip
    out = tmp_path / "pred"
    given = (f"slides_dir={slides}", "heatmaps=false")
    run_predict(inference_cfg(PredictConfig, pipe, out, *given))
    first = pd.read_csv(out / "predictions.csv")
    assert first["slide_id"].tolist() == ["blank", "slide_000"]  # blank: failed, empty
    (work,) = (out / "_work").iterdir()
    (cache,) = (p for p in (work / "features").iterdir() if p.is_dir())
    with read_only_bind(cache):
        run_predict(inference_cfg(PredictConfig, pipe, out, *given, "overwrite=true"))
    again = pd.read_csv(out / "predictions.csv")  # the blank one's reason now cites the cache
    pd.testing.assert_frame_equal(again.drop(columns="reason"), first.drop(columns="reason"))


def test_extract_refuses_a_read_only_cache_folder_holding_a_bag_it_recomputes(
    tmp_path: Path,
) -> None:
    """A torn bag (a copy cut short) is recomputed: its read-only folder is refused in one
    line before any encoding, not failed slide by slide when each is claimed."""
    tiles = make_cohort(tmp_path, 2)
    out = tmp_path / "features"
    assert run_extract(_cfg(tiles, out)) == 0
    (bag,) = out.glob("*/slide1.h5")
    bag.write_bytes(bag.read_bytes()[:1000])
    with read_only_bind(bag.parent), pytest.raises(UserError, match="cannot be written") as e:
        run_extract(_cfg(tiles, out))
    assert _refused(bag.parent, "extract") in str(e.value)
    assert bag.stat().st_size == 1000


# chmod does not stop root: as root, the CLI runs without the capabilities that let it ignore
# file modes, so a folder chmod 555 refuses it with EACCES as it does any other user (the
# interpreter lives under /root, 0700: `nobody` could not run it)
_DAC = "-dac_override,-dac_read_search"


def as_user(*argv: str) -> tuple[int, str]:
    """Run the CLI bound by file modes; (exit code, its `error:` line, the only one)."""
    prefix = [] if os.geteuid() else ["setpriv", f"--bounding-set={_DAC}", f"--inh-caps={_DAC}"]
    if prefix and shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to run the CLI bound by file modes as root")
    root = Path(__file__).resolve().parents[1]  # this checkout's melanoma_mil, not the venv's
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "melanoma_mil", *argv],
        capture_output=True,
        text=True,
        cwd=root,
        env={**one_thread_env(), "PYTHONPATH": str(root)},
        check=False,
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) <= 1, done.stderr
    return done.returncode, errors[0] if errors else done.stderr


@pytest.fixture
def bags(tmp_path: Path) -> tuple[Path, Path]:
    return make_bag_cohort(tmp_path / "cohort", n_patients=12, dim=16)


def _fit_keys(bags: tuple[Path, Path], out: Path) -> list[str]:
    data = [f"data.features_dir={bags[0]}", f"data.labels_csv={bags[1]}", f"output_dir={out}"]
    return [*data, "trainer.accelerator=cpu", "logger=none", "cv.folds=2", "trainer.max_epochs=1"]


def _fitted(bags: tuple[Path, Path], out: Path) -> dict[str, bytes]:
    """A finished run in ``out``; its files."""
    assert run_fit(load_config(FitConfig, [], _fit_keys(bags, out))) == 0
    return {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_fit_overwrite_refuses_a_run_whose_folder_it_cannot_build_beside_before_training(
    bags: tuple[Path, Path], tmp_path: Path
) -> None:
    """The new run is built beside the old one: where that folder was not writable the call
    ended on a hidden temp name ('.run.fit-new') after building the cohort's bag store."""
    parent = tmp_path / "runs"
    run = parent / "run"
    before = _fitted(bags, run)
    stores = bags[0] / ".bag_stores"
    shutil.rmtree(stores)
    parent.chmod(0o555)
    try:
        rc, err = as_user("fit", *_fit_keys(bags, run), "overwrite=true", "cv.seed=5")
    finally:
        parent.chmod(0o755)
    assert rc == 2 and err.startswith("error: "), err
    assert f"'{parent}' cannot be written (Permission denied" in err and f"'{run}'" in err
    assert "fix its permissions" in err
    assert not stores.exists()  # refused before any work
    assert {str(p): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_fit_overwrite_refuses_a_run_whose_folds_it_cannot_delete_before_training(
    bags: tuple[Path, Path], tmp_path: Path
) -> None:
    """The old run's own files are deleted once the new one is swapped in: where its folds/
    was not writable the call trained the whole new run, then ended on 'fold_0'."""
    run = tmp_path / "run"
    before = _fitted(bags, run)
    stores = bags[0] / ".bag_stores"
    shutil.rmtree(stores)
    (run / "folds").chmod(0o555)
    try:
        rc, err = as_user("fit", *_fit_keys(bags, run), "overwrite=true", "cv.seed=5")
    finally:
        (run / "folds").chmod(0o755)
    assert rc == 2 and err.startswith("error: "), err
    assert f"'{run / 'folds'}' cannot be written (Permission denied" in err and f"'{run}'" in err
    assert not stores.exists()  # refused before any work
    assert {str(p): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort", "run"]


def test_fit_refuses_a_run_whose_folds_folder_it_cannot_write_before_training_a_fold(
    bags: tuple[Path, Path], tmp_path: Path
) -> None:
    """A resumed run with a fold left to train: where folds/ was not writable the call built
    the bag store, then ended on the hidden lock name '.fold_1.lock'."""
    run = tmp_path / "run"
    _fitted(bags, run)
    shutil.rmtree(run / "folds" / "fold_1")
    before = {str(p): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    stores = bags[0] / ".bag_stores"
    shutil.rmtree(stores)
    (run / "folds").chmod(0o555)
    try:
        rc, err = as_user("fit", *_fit_keys(bags, run))
    finally:
        (run / "folds").chmod(0o755)
    assert rc == 2 and err.startswith("error: "), err
    assert f"`fit`'s folder '{run / 'folds'}' cannot be written (Permission denied" in err
    assert not stores.exists()  # refused before any work
    assert {str(p): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("inside", [False, True])
@pytest.mark.parametrize("command", ["tile", "extract", "heatmap", "fit"])
def test_an_output_dir_a_user_cannot_write_is_refused_in_one_line(
    pipe: Pipeline, bags: tuple[Path, Path], tmp_path: Path, command: str, inside: bool
) -> None:
    """Another user's folder (chmod 555), as output_dir or as the folder it is to be made in
    (``inside``): refused before any work with EACCES, not only a read-only mount's EROFS."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    out = theirs / "new" if inside else theirs
    keys = {
        "tile": [f"slides_dir={pipe.slides}", "tiling.mpp=1.0", "tiling.tile_size=64"],
        "extract": [
            f"coords_dir={pipe.root / 'tiles'}",
            "encoder.name=resnet18_imagenet",
            "encoder.pretrained=false",
            "device=cpu",
        ],  # fmt: skip
        "heatmap": [f"run_dir={pipe.run_dir}", f"features_dir={pipe.features}", "device=cpu"],
        "fit": _fit_keys(bags, out)[:2] + _fit_keys(bags, out)[3:],
    }[command]
    theirs.chmod(0o555)
    try:
        rc, err = as_user(command, *keys, f"output_dir={out}")
    finally:
        theirs.chmod(0o755)
    assert rc == 2, err
    assert err == (
        f"error: output_dir '{out}' cannot be written (Permission denied in '{theirs}'); "
        "choose another output_dir or fix its permissions."
    )
    assert os.listdir(theirs) == []
