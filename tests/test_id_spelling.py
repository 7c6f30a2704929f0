"""Slide ids that differ only in case or Unicode form (`S1`/`s1`, composed/decomposed `café`):
two slides where the output folder's file system keeps such names apart (ext4, tmpfs), refused
before any work only where it would make their files one (macOS, Windows, SMB, FAT); and ids
that Windows keeps for devices (`CON`, `nul.x`), refused everywhere: an output folder is often
copied to Windows or an SMB share."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import Pipeline, make_cohort, read_only_bind
from test_config import one_line_error

from melanoma_mil.cli import main
from melanoma_mil.config import TileConfig
from melanoma_mil.data.synthetic import make_bag_cohort
from melanoma_mil.errors import UserError
from melanoma_mil.fsutil import Folding, name_folding
from melanoma_mil.ids import id_problem
from melanoma_mil.tiling.find import find_slides
from melanoma_mil.tiling.run import run_tile

PAIRS = [("S1", "s1"), ("caf\u00e9", "cafe\u0301")]
ENCODER = ["encoder.name=resnet18_imagenet", "encoder.pretrained=false", "device=cpu",
           "num_workers=0"]  # fmt: skip


def _manifest(tmp_path: Path, first: str, second: str) -> Path:
    """Two generated slides listed under ``first`` and ``second``."""
    make_cohort(tmp_path, 2)
    slides, manifest = tmp_path / "slides", tmp_path / "m.csv"
    manifest.write_text(
        f"slide_id,path\n{first},{slides / 'slide0.tif'}\n{second},{slides / 'slide1.tif'}\n",
        encoding="utf-8",
    )
    return manifest


@pytest.mark.parametrize(("first", "second"), PAIRS)
def test_ids_differing_in_case_or_form_are_tiled_and_extracted_apart_on_ext4(
    tmp_path: Path, first: str, second: str
) -> None:
    manifest = _manifest(tmp_path, first, second)
    tiled, feats = tmp_path / "tiled", tmp_path / "features"
    assert main(["tile", f"manifest={manifest}", f"output_dir={tiled}"]) == 0
    given = [f"coords_dir={tiled}", f"manifest={manifest}", f"output_dir={feats}"]
    assert main(["extract", *given, *ENCODER]) == 0
    bags = {p.name: p for p in feats.glob("*/*.h5")}
    assert set(bags) == {f"{first}.h5", f"{second}.h5"}
    with h5py.File(bags[f"{first}.h5"]) as a, h5py.File(bags[f"{second}.h5"]) as b:
        assert a.attrs["slide_path"].endswith("slide0.tif")
        assert b.attrs["slide_path"].endswith("slide1.tif")
        assert not np.array_equal(a["features"][:], b["features"][:])
    assert {p.name for p in tiled.iterdir()} >= {"coords"}  # no probe left behind
    assert not [p for p in [*tiled.rglob(".*"), *feats.rglob(".*")] if "probe" in p.name]


@pytest.mark.parametrize(
    ("first", "second", "said", "folding"),
    [
        ("S1", "s1", "'S1' and 's1'", Folding(case=True, form=False)),
        ("caf\u00e9", "cafe\u0301", r"'caf\xe9' and 'cafe\u0301'", Folding(case=False, form=True)),
    ],
)
def test_ids_one_file_where_names_fold_are_refused_naming_both_the_source_and_the_fix(
    tmp_path: Path, first: str, second: str, said: str, folding: Folding
) -> None:
    """As the output folder's file system were probed to fold them (macOS, Windows, SMB)."""
    manifest = _manifest(tmp_path, first, second)
    out = tmp_path / "tiled"
    with pytest.raises(UserError) as e:
        find_slides(None, manifest, [], out, folding)
    err = str(e.value)
    assert f"slide ids {said} in manifest '{manifest}'" in err
    assert "differ only in case or Unicode form" in err and str(out) in err
    assert err.endswith("give one of them another slide_id.")
    other = Folding(case=not folding.case, form=not folding.form)  # folds only the other way
    assert list(find_slides(None, manifest, [], out, other)) == sorted([first, second])
    assert not out.exists()


@pytest.fixture
def fat_folder(tmp_path: Path) -> Iterator[Path]:
    """A real FAT file system (case-insensitive, as on a USB disk or SD card), mounted through
    FUSE (fusefat: the kernel here has no vfat); skipped where it cannot be had."""
    tools = [shutil.which(t) for t in ("mkfs.vfat", "fusefat")]
    if os.geteuid() != 0 or not Path("/dev/fuse").exists() or None in tools:
        pytest.skip("needs root, /dev/fuse, mkfs.vfat and fusefat")
    image, mnt = tmp_path / "fat.img", tmp_path / "fat"
    with image.open("wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.vfat", str(image)], check=True, capture_output=True)
    mnt.mkdir()
    if subprocess.run(
        ["fusefat", "-o", "rw+", str(image), str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("fusefat could not mount")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_ids_differing_in_case_are_refused_before_tiling_onto_a_real_fat_disk(
    tmp_path: Path, fat_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _manifest(tmp_path, "S1", "s1")
    out = fat_folder / "tiled"
    err = one_line_error(capsys, "tile", f"manifest={manifest}", f"output_dir={out}")
    assert "slide ids 'S1' and 's1'" in err and "give one of them another slide_id" in err
    assert os.listdir(fat_folder) == []  # no output folder, no probe left


def test_a_cohort_is_tiled_and_extracted_onto_a_real_fat_disk(
    tmp_path: Path, fat_folder: Path
) -> None:
    """FAT keeps no file modes: fusefat answers chmod with ENOSYS, which failed every write
    (each file is written under a temp name, then given the usual mode and renamed)."""
    manifest = _manifest(tmp_path, "S1", "S2")
    tiled, feats = fat_folder / "tiled", fat_folder / "features"
    assert main(["tile", f"manifest={manifest}", f"output_dir={tiled}"]) == 0
    given = [f"coords_dir={tiled}", f"manifest={manifest}", f"output_dir={feats}"]
    assert main(["extract", *given, *ENCODER]) == 0
    assert sorted(p.name for p in feats.glob("*/*.h5")) == ["S1.h5", "S2.h5"]
    assert not [p for p in fat_folder.rglob("*") if p.name.endswith(".tmp")]


def _coords(tmp_path: Path, first: str, second: str) -> Path:
    """Coords of two generated slides named ``first`` and ``second``, as `tile` writes them;
    their folder holds nothing else, so coords alone name the slides."""
    coords = make_cohort(tmp_path, 2) / "coords"
    for i, sid in enumerate((first, second)):
        (coords / f"slide{i}.h5").rename(coords / f"{sid}.h5")
    return coords


@pytest.mark.parametrize(("first", "second"), PAIRS)
def test_coords_alone_differing_in_case_or_form_are_extracted_apart_on_ext4(
    tmp_path: Path, first: str, second: str
) -> None:
    coords, feats = _coords(tmp_path, first, second), tmp_path / "features"
    assert main(["extract", f"coords_dir={coords}", f"output_dir={feats}", *ENCODER]) == 0
    assert {p.name for p in feats.glob("*/*.h5")} == {f"{first}.h5", f"{second}.h5"}


def test_coords_alone_differing_in_case_are_refused_before_extracting_onto_a_real_fat_disk(
    tmp_path: Path, fat_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No slides_dir or manifest: the coords files name the slides, and two of them would write
    one bag there (the second slide failed on the first one's bag, after encoding it)."""
    coords, out = _coords(tmp_path, "S1", "s1"), fat_folder / "features"
    err = one_line_error(capsys, "extract", f"coords_dir={coords}", f"output_dir={out}", *ENCODER)
    assert f"slide ids 'S1' and 's1' in coords_dir '{coords}'" in err and str(out) in err
    assert "rename one of the coords files" in err
    assert os.listdir(fat_folder) == []  # no output folder, no probe left


def _bags(pipe: Pipeline, tmp_path: Path, first: str, second: str) -> Path:
    """A feature folder of two of the session's bags named ``first`` and ``second``."""
    feats = tmp_path / "features"
    feats.mkdir()
    for i, sid in enumerate((first, second)):
        shutil.copy(pipe.features / f"slide_{i:03d}.h5", feats / f"{sid}.h5")
    return feats


def test_bags_differing_in_case_are_drawn_apart_on_ext4(pipe: Pipeline, tmp_path: Path) -> None:
    feats, out = _bags(pipe, tmp_path, "S1", "s1"), tmp_path / "heat"
    given = [f"run_dir={pipe.run_dir}", f"features_dir={feats}", f"output_dir={out}"]
    assert main(["heatmap", *given, "device=cpu", "num_workers=0", "thumbnail_size=128"]) == 0
    assert {p.name for p in out.iterdir() if p.is_dir()} >= {"S1", "s1"}


@pytest.mark.parametrize("command", ["heatmap", "predict"])
def test_bags_differing_in_case_are_refused_before_drawing_onto_a_real_fat_disk(
    pipe: Pipeline,
    tmp_path: Path,
    fat_folder: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    """features_dir alone names the slides: their heatmap folders would be one there."""
    feats, out = _bags(pipe, tmp_path, "S1", "s1"), fat_folder / command
    given = [f"run_dir={pipe.run_dir}", f"features_dir={feats}", f"output_dir={out}"]
    err = one_line_error(capsys, command, *given, "device=cpu", "num_workers=0")
    assert f"slide ids 'S1' and 's1' in features_dir '{feats}'" in err and str(out) in err
    assert os.listdir(fat_folder) == []


@pytest.mark.parametrize("sid", ["CON", "nul", "Aux", "prn", "COM1", "lpt9", "com\u00b9", "nul.x",
                                 "CON .a"])  # fmt: skip
def test_windows_device_names_are_not_slide_ids(sid: str) -> None:
    """Their files (`CON.h5`, `nul/`) cannot be opened or copied on Windows or an SMB share."""
    why = id_problem(sid)
    assert why is not None and "Windows" in why and "rename" in why


@pytest.mark.parametrize("sid", ["CONSOLE", "con1", "COM10", "LPT", "nul_1", "xcon", "S1"])
def test_names_that_only_start_like_windows_device_names_are_slide_ids(sid: str) -> None:
    assert id_problem(sid) is None


def test_tile_refuses_a_slide_file_with_a_windows_device_name_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_cohort(tmp_path, 2)
    slide = tmp_path / "slides" / "slide1.tif"
    slide.rename(slide.with_name("nul.tif"))
    out = tmp_path / "tiled"
    err = one_line_error(capsys, "tile", f"slides_dir={tmp_path / 'slides'}", f"output_dir={out}")
    assert f"{tmp_path / 'slides' / 'nul.tif'}: slide id 'nul'" in err and "Windows" in err
    assert "rename the slide file" in err
    assert not out.exists()


def test_tile_refuses_a_manifest_id_with_a_windows_device_name_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest, out = _manifest(tmp_path, "S1", "CON.svs"), tmp_path / "tiled"
    err = one_line_error(capsys, "tile", f"manifest={manifest}", f"output_dir={out}")
    assert f"manifest '{manifest}' row 3: slide id 'CON.svs'" in err and "Windows" in err
    assert not out.exists()


def test_extract_refuses_a_coords_file_with_a_windows_device_name_before_encoding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    coords, out = _coords(tmp_path, "S1", "Com3"), tmp_path / "features"
    err = one_line_error(capsys, "extract", f"coords_dir={coords}", f"output_dir={out}", *ENCODER)
    assert f"coords file '{coords / 'Com3.h5'}'" in err and "Windows" in err
    assert not out.exists()


def test_fit_refuses_a_labels_row_with_a_windows_device_name_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    features, labels = make_bag_cohort(tmp_path / "c", n_patients=12, dim=8)
    table = labels.read_text(encoding="utf-8").replace("P0003", "aux", 1)
    labels.write_text(table, encoding="utf-8")
    out = tmp_path / "run"
    args = [f"data.features_dir={features}", f"data.labels_csv={labels}", f"output_dir={out}"]
    err = one_line_error(capsys, "fit", *args)
    assert f"labels CSV '{labels}' row 5: slide id 'aux'" in err and "Windows" in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["heatmap", "predict"])
def test_a_bag_with_a_windows_device_name_is_refused_before_drawing(
    pipe: Pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """features_dir alone names the slides: a folder `nul/` is drawn for one."""
    feats, out = _bags(pipe, tmp_path, "S1", "nul"), tmp_path / command
    given = [f"run_dir={pipe.run_dir}", f"features_dir={feats}", f"output_dir={out}"]
    err = one_line_error(capsys, command, *given, "device=cpu", "num_workers=0")
    assert f"feature file '{feats / 'nul.h5'}'" in err and "Windows" in err
    assert not out.exists()


@pytest.mark.parametrize("missing", [False, True])
def test_ids_differing_in_case_into_a_read_only_folder_are_refused_as_not_writable(
    tmp_path: Path, missing: bool
) -> None:
    """The probe of its names cannot be made there: that is the truth to tell, not that its
    file system folds names (a read-only mount; ``missing``: output_dir to be made in one).
    Through the API: the CLI refuses such an output_dir before it calls `run_tile`."""
    manifest = _manifest(tmp_path, "S1", "s1")
    ro = tmp_path / "ro"
    out = ro / "tiled" if missing else ro
    cfg = TileConfig(manifest=str(manifest), output_dir=str(out))
    with read_only_bind(ro), pytest.raises(UserError) as e:
        run_tile(cfg)
    err = str(e.value)
    assert f"output_dir '{out}' cannot be written (Read-only file system in '{ro}')" in err
    assert f"'S1' and 's1' in manifest '{manifest}'" in err and "fix its permissions" in err
    assert "differ only in case" not in err and "\n" not in err
    assert os.listdir(ro) == []


class _Killed(BaseException):
    """A SIGKILL at one instant: nothing after it runs in the process's code."""


def test_the_probe_for_an_output_dir_not_made_yet_lands_in_it_not_in_the_users_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between making its probe and removing it, the probe is left where it was made:
    in output_dir, made for it, never in the user's folder that output_dir will be made in."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("user's")
    out = mine / "work" / "tiled"

    def killed(self: Path, missing_ok: bool = False) -> None:
        raise _Killed

    monkeypatch.setattr(Path, "unlink", killed)
    with pytest.raises(_Killed):
        name_folding(out)
    monkeypatch.undo()
    assert sorted(os.listdir(mine)) == ["notes.txt", "work"]
    assert {p.parent for p in mine.rglob(".melanoma-mil-probe-*")} == {out}


def test_the_probe_for_an_output_dir_not_made_yet_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "work" / "tiled"
    assert name_folding(out) == Folding(case=False, form=False)
    assert os.listdir(tmp_path) == []


def _one(tmp_path: Path, name: str, sid: str) -> Path:
    """A manifest ``name`` listing one generated slide of its own as ``sid``."""
    make_cohort(tmp_path / sid.encode().hex(), 1, seed=len(name) + ord(sid[0]))
    manifest = tmp_path / name
    slide = tmp_path / sid.encode().hex() / "slides" / "slide0.tif"
    manifest.write_text(f"slide_id,path\n{sid},{slide}\n")
    return manifest


def _copy_onto(folder: Path, to: Path) -> None:
    """``folder`` copied to ``to`` by its files' bytes alone: fusefat sets no times or modes."""
    for name, data in _files(folder).items():
        (to / name).parent.mkdir(parents=True, exist_ok=True)
        (to / name).write_bytes(data)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_second_call_tiling_an_id_differing_only_in_case_is_refused_on_a_real_fat_disk(
    tmp_path: Path, fat_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`s1` alone, after `S1` was tiled there: its coords would overwrite S1's. (The first call
    is copied there: fusefat makes no temp files of our names, so no call writes there.)"""
    first, second = _one(tmp_path, "a.csv", "S1"), _one(tmp_path, "b.csv", "s1")
    out = fat_folder / "tiled"
    assert main(["tile", f"manifest={first}", f"output_dir={tmp_path / 'first'}"]) == 0
    _copy_onto(tmp_path / "first", out)
    before, _ = _files(out), capsys.readouterr()
    err = one_line_error(capsys, "tile", f"manifest={second}", f"output_dir={out}")
    assert f"slide id 's1' in manifest '{second}'" in err and "'S1'" in err and str(out) in err
    assert _files(out) == before


def test_a_second_call_drawing_an_id_differing_only_in_case_is_refused_on_a_real_fat_disk(
    pipe: Pipeline, tmp_path: Path, fat_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`s1` alone, after `S1` was drawn there: its heatmap folder is S1's."""
    out = fat_folder / "heat"
    feats = []
    for sid in ("S1", "s1"):
        feats.append(tmp_path / sid.encode().hex())
        feats[-1].mkdir()
        shutil.copy(pipe.features / f"slide_00{len(feats)}.h5", feats[-1] / f"{sid}.h5")
    given = [f"run_dir={pipe.run_dir}", f"output_dir={out}", "device=cpu", "num_workers=0",
             "thumbnail_size=64"]  # fmt: skip
    first = [f"output_dir={tmp_path / 'first'}" if g.startswith("output_dir") else g for g in given]
    assert main(["heatmap", f"features_dir={feats[0]}", *first]) == 0
    _copy_onto(tmp_path / "first", out)  # as fusefat makes none of our temp files
    before, _ = _files(out / "S1"), capsys.readouterr()
    err = one_line_error(capsys, "heatmap", f"features_dir={feats[1]}", *given)
    assert f"slide id 's1' in features_dir '{feats[1]}'" in err and "'S1'" in err
    assert str(out) in err
    assert _files(out / "S1") == before


def test_a_second_call_drawing_an_id_differing_only_in_case_draws_both_on_ext4(
    pipe: Pipeline, tmp_path: Path
) -> None:
    out, given = tmp_path / "heat", ["device=cpu", "num_workers=0", "thumbnail_size=64"]
    for i, sid in enumerate(("S1", "s1")):
        feats = tmp_path / sid.encode().hex()
        feats.mkdir()
        shutil.copy(pipe.features / f"slide_00{i}.h5", feats / f"{sid}.h5")
        argv = ["heatmap", f"run_dir={pipe.run_dir}", f"features_dir={feats}", f"output_dir={out}"]
        assert main([*argv, *given]) == 0
    assert {p.name for p in out.iterdir() if p.is_dir()} >= {"S1", "s1"}


def test_a_second_call_encoding_an_id_differing_only_in_case_is_refused_on_a_real_fat_disk(
    tmp_path: Path, fat_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`s1` alone, after `S1` was encoded there: its bag would overwrite S1's."""
    coords = []
    for seed, sid in enumerate(("S1", "s1")):
        folder = make_cohort(tmp_path / sid.encode().hex(), 1, seed=seed) / "coords"
        (folder / "slide0.h5").rename(folder / f"{sid}.h5")
        coords.append(folder)
    out = fat_folder / "features"
    first = ["extract", f"coords_dir={coords[0]}", f"output_dir={tmp_path / 'first'}", *ENCODER]
    assert main(first) == 0
    _copy_onto(tmp_path / "first", out)  # as fusefat makes none of our temp files
    before, _ = _files(out), capsys.readouterr()
    err = one_line_error(capsys, "extract", f"coords_dir={coords[1]}", f"output_dir={out}",
                         *ENCODER)  # fmt: skip
    assert f"slide id 's1' in coords_dir '{coords[1]}' and 'S1'" in err and str(out) in err
    assert _files(out) == before


def test_a_users_folder_named_like_a_slide_in_another_case_is_drawn_into_on_a_real_fat_disk(
    pipe: Pipeline, tmp_path: Path, fat_folder: Path
) -> None:
    """A folder of the user's own in output_dir (notes, none of heatmap's files) is not a slide
    an earlier call drew: `S1` was refused as if it would overwrite the files of a slide `s1`."""
    out = fat_folder / "heat"
    (out / "s1").mkdir(parents=True)
    (out / "s1" / "notes.txt").write_text("mine")
    feats = tmp_path / "features"
    feats.mkdir()
    shutil.copy(pipe.features / "slide_001.h5", feats / "S1.h5")
    given = [f"run_dir={pipe.run_dir}", f"features_dir={feats}", f"output_dir={out}"]
    assert main(["heatmap", *given, "device=cpu", "num_workers=0", "thumbnail_size=64"]) == 0
    assert (out / "s1" / "notes.txt").read_text() == "mine"  # S1's folder there: s1's
    assert (out / "S1" / "attention.h5").is_file()
