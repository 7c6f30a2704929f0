"""Careless inputs to the commands: folders a user made that hold files with an output's name,
and files in shapes the readers did not expect. Each is refused with one line before any work,
and nothing of the user's is replaced."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import yaml
from conftest import Pipeline, make_cohort
from test_config import one_line_error
from test_store import store_of

from melanoma_mil.cli import main
from melanoma_mil.data.synthetic import make_bag_cohort


@pytest.mark.parametrize("command", ["heatmap", "predict"])
def test_a_users_heatmap_pictures_are_not_replaced_without_overwrite(
    pipe: Pipeline, tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pictures"  # e.g. another tool's heatmaps, one folder per slide
    (out / "slide_000").mkdir(parents=True)
    mine = {name: f"mine {name}" for name in ("heatmap.png", "montage.png")}
    for name, text in mine.items():
        (out / "slide_000" / name).write_text(text)
    argv = [command, f"run_dir={pipe.run_dir}", f"output_dir={out}", f"slides_dir={pipe.slides}",
            f"features_dir={pipe.features}", "slide_ids=[slide_000]", "device=cpu",
            "thumbnail_size=128", "top_k=2"]  # fmt: skip
    err = one_line_error(capsys, *argv)
    assert "'slide_000/heatmap.png'" in err and "overwrite=true" in err  # where it is
    assert {p.name for p in out.rglob("*")} == {"slide_000", *mine}
    assert all((out / "slide_000" / n).read_text() == t for n, t in mine.items())
    assert main([*argv, "overwrite=true"]) == 0  # asked: replaced
    assert (out / "slide_000" / "heatmap.png").read_bytes().startswith(b"\x89PNG")


def _users_project(out: Path, drawn: Path) -> dict[str, bytes]:
    """A user's folder: figures and notes named like a slide's files, notes in a slide's folder,
    and a copy of a slide folder drawn elsewhere (slide_005); its files by path."""
    for name in ("figures/heatmap.png", "notes/attention.h5", "slide_001/notes.txt"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(f"mine {name}")
    shutil.copytree(drawn, out / "slide_005")
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


@pytest.mark.parametrize("command", ["heatmap", "predict"])
def test_a_first_call_leaves_a_users_folders_named_by_no_slide_of_it_alone(
    pipe: Pipeline, tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A first call into an output_dir holding a user's figures/heatmap.png was refused as
    output 'from an unknown run', though it writes only its slides' folders: the others are
    left alone, also with overwrite=true. Files of the user's (a dangling link too) in the
    folder of a slide of the call are still refused, and replaced only with overwrite=true."""
    argv = [command, f"run_dir={pipe.run_dir}", f"slides_dir={pipe.slides}", "top_k=2",
            f"features_dir={pipe.features}", "device=cpu", "thumbnail_size=128"]  # fmt: skip
    assert main([*argv, f"output_dir={tmp_path / 'elsewhere'}", "slide_ids=[slide_005]"]) == 0
    drawn = tmp_path / "elsewhere" / "slide_005"
    calls = [*argv, "slide_ids=[slide_000,slide_001]"]
    mine = _users_project(tmp_path / "first", drawn)
    assert main([*calls, f"output_dir={tmp_path / 'first'}"]) == 0
    assert all((tmp_path / "first" / n).read_bytes() == b for n, b in mine.items())
    out = tmp_path / "second"
    mine = _users_project(out, drawn)
    (out / "slide_000").mkdir()
    (out / "slide_000" / "heatmap.png").write_text("mine")
    (out / "slide_001" / "tiles.geojson").symlink_to(tmp_path / "gone.geojson")
    capsys.readouterr()
    err = one_line_error(capsys, *calls, f"output_dir={out}")
    assert "['slide_000/heatmap.png', 'slide_001/tiles.geojson'] from an unknown run" in err
    assert not (out / ".melanoma-mil.json").exists()
    assert (out / "slide_000" / "heatmap.png").read_text() == "mine"
    assert (out / "slide_001" / "tiles.geojson").is_symlink()
    assert main([*calls, f"output_dir={out}", "overwrite=true"]) == 0  # asked: replaced
    assert (out / "slide_000" / "heatmap.png").read_bytes().startswith(b"\x89PNG")
    assert all((out / n).read_bytes() == b for n, b in mine.items())


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"", "No columns to parse"), (b"train,val,test\n\xe9,b,c\n", "save it as UTF-8 CSV")],
)
def test_an_empty_or_non_utf8_clam_splits_file_is_one_line_before_the_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, problem: str
) -> None:
    features, labels = make_bag_cohort(tmp_path, n_patients=8, dim=8)
    folder = tmp_path / "clam_splits"
    folder.mkdir()
    (folder / "splits_0.csv").write_text("train,val,test\nP0000,P0001,P0002\n")
    (folder / "splits_1.csv").write_bytes(content)  # a fold file cut short, or saved as Latin-1
    out = tmp_path / "run"
    err = one_line_error(capsys, "fit", f"data.features_dir={features}",
                         f"data.labels_csv={labels}", f"output_dir={out}",
                         f"cv.splits_file={folder}", "logger=none")  # fmt: skip
    assert str(folder / "splits_1.csv") in err and problem in err
    assert not out.exists()


def test_a_file_where_tile_or_extract_makes_a_folder_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiles = make_cohort(tmp_path, 1)
    out = tmp_path / "tiles_out"
    out.mkdir()
    (out / "coords").write_text("mine")  # e.g. a list of coordinates of yours
    err = one_line_error(capsys, "tile", f"slides_dir={tmp_path / 'slides'}", f"output_dir={out}",
                         "workers=1", "tiling.mpp=0.5", "tiling.tile_size=64")  # fmt: skip
    assert f"'{out / 'coords'}' is a file" in err and "move the file away" in err
    assert [p.name for p in out.iterdir()] == ["coords"] and (out / "coords").read_text() == "mine"

    feats = tmp_path / "features"
    extract = ["extract", f"coords_dir={tiles}", f"output_dir={feats}", "num_workers=0",
               "device=cpu", "encoder.name=resnet18_imagenet",
               "encoder.pretrained=false"]  # fmt: skip
    assert main(extract) == 0
    capsys.readouterr()
    (key,) = [p for p in feats.iterdir() if p.is_dir()]
    shutil.rmtree(key)
    key.write_text("mine")  # a file named as the cache folder extract writes
    err = one_line_error(capsys, *extract)
    assert f"'{key}' is a file" in err
    assert key.read_text() == "mine"


@pytest.mark.parametrize(("command", "cached"), [("heatmap", True), ("predict", True),
                                                 ("predict", False)])  # fmt: skip
def test_a_file_named_as_a_slides_folder_is_refused_before_any_work(
    pipe: Pipeline, tmp_path: Path, command: str, cached: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "slide_001").write_text("mine")  # e.g. notes on that slide, saved without a suffix
    argv = [command, f"run_dir={pipe.run_dir}", f"output_dir={out}", f"slides_dir={pipe.slides}",
            "slide_ids=[slide_000,slide_001]", "device=cpu", "thumbnail_size=128", "top_k=2",
            *([f"features_dir={pipe.features}"] if cached else [])]  # fmt: skip
    err = one_line_error(capsys, *argv)
    assert f"'{out / 'slide_001'}' is a file" in err and "move the file away" in err
    assert {p.name for p in out.iterdir()} == {"slide_001"}  # no marker, no _work: no work done
    assert (out / "slide_001").read_text() == "mine"
    if command == "predict" and cached:  # scored only: no folder of that name is made
        assert main([*argv, "heatmaps=false"]) == 0
        assert (out / "slide_001").read_text() == "mine"


def test_a_newline_in_a_slide_file_name_keeps_the_error_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_cohort(tmp_path, 1)
    slides = tmp_path / "slides"
    (slides / "slide0.tif").rename(slides / "slide\n0.tif")  # a name pasted with its newline
    out = tmp_path / "tiled"
    err = one_line_error(capsys, "tile", f"slides_dir={slides}", f"output_dir={out}", "workers=1")
    assert "slide\\n0.tif" in err and "control character" in err
    assert not out.exists()


@pytest.mark.parametrize("brk", ["\x85", "\u2028", "\u2029"])
def test_a_unicode_line_break_in_a_slide_file_name_keeps_the_error_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], brk: str
) -> None:
    make_cohort(tmp_path, 1)
    slides = tmp_path / "slides"  # NEL and the line/paragraph separators: lines to splitlines
    (slides / "slide0.tif").rename(slides / f"slide{brk}0.tif")  # and to many log viewers
    os.link(slides / f"slide{brk}0.tif", slides / "hard.tif")  # refused: one file, two ids
    err = one_line_error(capsys, "tile", f"slides_dir={slides}", f"output_dir={tmp_path / 'o'}")
    assert len(err.splitlines()) == 1, err
    assert f"slide{repr(brk)[1:-1]}0" in err  # written as its escape, e.g. slide\u20280


def test_a_store_dir_of_yours_keeps_its_folders_holding_an_index_json(tmp_path: Path) -> None:
    features, labels = make_bag_cohort(tmp_path, n_patients=6, dim=8)
    stores = tmp_path / "scratch"  # data.store_dir: your scratch folder, holding other things
    site = stores / "site"  # a folder of yours with an index.json, as websites and datasets have
    site.mkdir(parents=True)
    for name, text in (("index.json", '{"pages": []}'), ("index.html", "<html>")):
        (site / name).write_text(text)
    days_ago = time.time() - 3 * 86400
    os.utime(site / "index.json", (days_ago, days_ago))
    store = store_of(features, labels, f"data.store_dir={stores}")
    assert store.folder.parent == stores
    assert sorted(p.name for p in site.iterdir()) == ["index.html", "index.json"]


def test_a_missing_swept_feature_folder_is_named_before_the_first_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    features, labels = make_bag_cohort(tmp_path, n_patients=8, dim=8)
    typo = tmp_path / "featurse"  # the first cache of an encoder sweep, misspelt
    sweep_file = tmp_path / "enc.yaml"
    values = {"values": [str(typo), str(features)]}
    sweep_file.write_text(
        yaml.safe_dump({"method": "grid", "parameters": {"data.features_dir": values}})
    )
    argv = ["sweep", str(sweep_file), f"data.labels_csv={labels}", f"output_dir={tmp_path / 'sw'}",
            "logger=none", "cv.folds=2", "trainer.max_epochs=1",
            "trainer.accelerator=cpu"]  # fmt: skip
    assert main(argv) == 1  # the run fails (a cache may be made later: a resume retries it)
    said = [r.getMessage() for r in caplog.records]
    first = next(i for i, m in enumerate(said) if m.startswith("sweep run "))
    warned = [m for m in said[:first] if f"'{typo}' not found" in m]
    assert len(warned) == 1 and "data.features_dir; its run will fail" in warned[0], warned


def test_one_slide_file_under_two_ids_is_refused_before_tiling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_cohort(tmp_path, 2)
    slides, out = tmp_path / "slides", tmp_path / "tiled"
    manifest = tmp_path / "m.csv"  # a row copied for a new slide whose path was not changed
    manifest.write_text(f"slide_id,path\nA,{slides / 'slide0.tif'}\nB,{slides / 'slide0.tif'}\n")
    err = one_line_error(capsys, "tile", f"manifest={manifest}", f"output_dir={out}")
    assert "slides 'A' and 'B'" in err and "are one file" in err
    (slides / "again.tif").symlink_to(slides / "slide1.tif")  # a cohort of links, one twice
    err = one_line_error(capsys, "tile", f"slides_dir={slides}", f"output_dir={out}")
    assert "slides 'again' and 'slide1'" in err and "are one file" in err
    (slides / "again.tif").unlink()
    os.link(slides / "slide1.tif", slides / "hard.tif")  # `ln` without -s: a hard link
    err = one_line_error(capsys, "tile", f"slides_dir={slides}", f"output_dir={out}")
    assert "slides 'hard' and 'slide1'" in err and "are one file" in err
    assert str(slides / "slide1.tif") in err  # the other name of the file is said too
    assert not out.exists()


@pytest.mark.parametrize("command", ["heatmap", "predict"])
def test_a_bad_device_is_refused_before_tiling_or_claiming_the_folder(
    pipe: Pipeline, tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    for device in ("gpu", "mps"):  # a name of another tool; a device torch knows but we do not
        err = one_line_error(capsys, command, f"run_dir={pipe.run_dir}", f"output_dir={out}",
                             f"slides_dir={pipe.slides}", "slide_ids=[slide_000]",
                             f"device={device}")  # fmt: skip
        assert f"device '{device}' unknown" in err
        assert not out.exists()  # no _work tiles, no marker
    err = one_line_error(capsys, "extract", f"coords_dir={pipe.root / 'tiles'}",
                         f"output_dir={out}", "device=mps")  # fmt: skip
    assert "device 'mps' unknown" in err  # was a RuntimeError traceback


def test_a_slide_id_too_long_in_bytes_is_refused_before_tiling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """80 characters, 240 bytes: a valid file name, but its coords' claim draft
    (`.<id>.lock.<random>.claiming`) is not; the slide failed with ENAMETOOLONG once tiling."""
    make_cohort(tmp_path, 1)
    slides, out = tmp_path / "slides", tmp_path / "tiled"
    (slides / "slide0.tif").rename(slides / f"{'€' * 80}.tif")
    err = one_line_error(capsys, "tile", f"slides_dir={slides}", f"output_dir={out}")
    assert "240 bytes" in err and "shorten it" in err
    assert not out.exists()


def test_a_slide_id_of_many_bytes_whose_names_fit_is_tiled(tmp_path: Path) -> None:
    """114 characters, 227 bytes: every name made from it fits in 255 bytes (the claim draft
    adds 24); such an id tiled before the limit counted bytes, and still does."""
    make_cohort(tmp_path, 1)
    slides, out = tmp_path / "slides", tmp_path / "tiled"
    sid = "é" * 113 + "x"
    (slides / "slide0.tif").rename(slides / f"{sid}.tif")
    assert main(["tile", f"slides_dir={slides}", f"output_dir={out}"]) == 0
    assert (out / "coords" / f"{sid}.h5").is_file()


@pytest.mark.parametrize(
    ("command", "name"),
    [("predict", "predictions.csv"), ("predict", "Evaluation"), ("heatmap", "heatmaps.csv")],
)
def test_a_slide_named_as_the_commands_own_entry_is_refused_before_any_work(
    pipe: Pipeline, tmp_path: Path, command: str, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """'predictions.csv.tiff': its heatmap folder took the table's name, and the call ended in
    a traceback after every slide was done; 'Evaluation' is the report's folder on macOS."""
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(pipe.slides / "slide_000.tiff", slides / f"{name}.tiff")
    out = tmp_path / "out"
    err = one_line_error(capsys, command, f"run_dir={pipe.run_dir}", f"output_dir={out}",
                         f"slides_dir={slides}", "device=cpu", "thumbnail_size=128", "top_k=2",
                         f"labels_csv={pipe.root / 'cohort/labels.csv'}"
                         if command == "predict" else "top_k=2")  # fmt: skip
    assert f"slide '{name}': its folder in output_dir would be '{out / name}'" in err
    assert "rename the slide file" in err
    assert not out.exists()
