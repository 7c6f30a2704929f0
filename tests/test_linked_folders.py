"""No command writes through a linked folder inside its output folder: the writes would land
outside it and replace files there. A linked output_dir itself is fine (`fit overwrite=true`
replaces the run where it points)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import Pipeline, inference_cfg, make_cohort

from melanoma_mil import rundir
from melanoma_mil.cli import main
from melanoma_mil.config import (
    EncoderConfig,
    ExtractConfig,
    FitConfig,
    PredictConfig,
    TileConfig,
    TilingConfig,
    load_config,
)
from melanoma_mil.data.synthetic import make_bag_cohort
from melanoma_mil.errors import UserError
from melanoma_mil.features.run import run_extract
from melanoma_mil.ids import held_ids
from melanoma_mil.inference.predict import run_predict
from melanoma_mil.tiling.qc import CELLS
from melanoma_mil.tiling.run import run_tile
from melanoma_mil.training.cv import run_fit


def _mine(root: Path, name: str) -> Path:
    """A user's folder elsewhere, holding a file a command would write under that name."""
    mine = root / "mine"
    mine.mkdir()
    (mine / name).write_bytes(b"mine")
    return mine


def test_tile_refuses_a_linked_qc_folder_and_takes_a_linked_output_dir(tmp_path: Path) -> None:
    make_cohort(tmp_path, 1)
    out = tmp_path / "tiles_out"
    out.mkdir()
    mine = _mine(tmp_path, "slide0.png")
    (out / "qc").symlink_to(mine)
    cfg = TileConfig(slides_dir=str(tmp_path / "slides"), output_dir=str(out), workers=1,
                     tiling=TilingConfig(mpp=0.5, tile_size=64))  # fmt: skip
    with pytest.raises(UserError, match=r"qc' is a link to .*mine.*replace the link by a folder"):
        run_tile(cfg)
    assert (mine / "slide0.png").read_bytes() == b"mine" and [p.name for p in out.iterdir()] == [
        "qc"
    ]
    (out / "qc").unlink()
    linked = tmp_path / "linked"
    linked.symlink_to(out, target_is_directory=True)
    run_tile(replace(cfg, output_dir=str(linked)))
    assert (out / "coords" / "slide0.h5").is_file()


def test_extract_refuses_a_linked_folder_in_its_output(tmp_path: Path) -> None:
    tiles = make_cohort(tmp_path, 1)
    out = tmp_path / "features"
    out.mkdir()
    (out / "cache").symlink_to(_mine(tmp_path, "slide0.h5"))
    encoder = EncoderConfig(name="resnet18_imagenet", pretrained=False)
    cfg = ExtractConfig(
        coords_dir=str(tiles), output_dir=str(out), num_workers=0, device="cpu", encoder=encoder
    )
    assert run_extract(cfg) == 0  # another encoder's cache, linked in: not written, no bother
    (key,) = [p for p in out.iterdir() if p.is_dir() and not p.is_symlink()]
    shutil.rmtree(key)
    key.symlink_to(tmp_path / "mine", target_is_directory=True)  # the cache it writes, linked
    with pytest.raises(UserError, match=f"{key.name}' is a link"):
        run_extract(cfg)
    assert [p.read_bytes() for p in (tmp_path / "mine").iterdir()] == [b"mine"]


def test_predict_refuses_a_linked_slide_folder(pipe: Pipeline, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    out.mkdir()
    mine = _mine(tmp_path, "heatmap.png")
    (out / "slide_000").symlink_to(mine)
    keys = (f"features_dir={pipe.features}", "slide_ids=[slide_000]")
    cfg = inference_cfg(PredictConfig, pipe, out, *keys)
    with pytest.raises(UserError, match="slide_000' is a link"):
        run_predict(cfg)
    assert (mine / "heatmap.png").read_bytes() == b"mine"
    assert [p.name for p in out.iterdir()] == ["slide_000"]
    (out / "slide_000").unlink()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (out / "_work").symlink_to(scratch)  # on-the-fly tiles and features on a scratch disk
    assert run_predict(cfg) == 0


@pytest.mark.parametrize("command", ["heatmap", "predict"])
def test_a_linked_folder_of_the_users_that_names_no_slide_is_left_alone(
    pipe: Pipeline, tmp_path: Path, command: str
) -> None:
    """A link of the user's in output_dir (figures/) that no slide of the call is named by was
    refused as if the command wrote into it; it is neither refused nor written through, also
    with overwrite=true. (One holding a slide's files looks like a slide's folder: refused.)"""
    out = tmp_path / command
    out.mkdir()
    mine = _mine(tmp_path, "notes.txt")
    (out / "figures").symlink_to(mine)
    keys = [f"features_dir={pipe.features}", "slide_ids=[slide_000]"]
    assert main([command, f"run_dir={pipe.run_dir}", f"output_dir={out}", "device=cpu",
                 "num_workers=0", "thumbnail_size=64", *keys]) == 0  # fmt: skip
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    assert main([command, f"run_dir={pipe.run_dir}", f"output_dir={out}", "device=cpu",
                 "num_workers=0", "thumbnail_size=64", *keys, "overwrite=true"]) == 0  # fmt: skip
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before
    assert (out / "slide_000" / "heatmap.png").is_file()


def test_fit_overwrite_replaces_a_linked_or_dot_output_dir_where_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replacement is built beside the run the link points to and swapped in there, the
    user's link kept (the link swapped would move the run off the linked disk, and crash); the
    same for a relative output_dir. From inside the run (e.g. 'output_dir=.') it is refused: the
    old run, the shell's working folder, is deleted once replaced."""
    features, labels = make_bag_cohort(tmp_path / "cohort", n_patients=12, dim=8, shift=4.0)

    def fit(out: Path, *extra: str) -> int:
        keys = [f"data.features_dir={features}", f"data.labels_csv={labels}", f"output_dir={out}"]
        keys += ["cv.folds=2", "trainer.max_epochs=1", "trainer.accelerator=cpu", "logger=none"]
        return run_fit(load_config(FitConfig, [], [*keys, "model.hidden_dim=8", *extra]))

    real = tmp_path / "scratch" / "run é x"
    assert fit(real) == 0
    (real / "NOTES.txt").write_text("mine")
    link = tmp_path / "runs" / "run"
    link.parent.mkdir()
    link.symlink_to(real, target_is_directory=True)
    assert fit(link, "overwrite=true", "seed=1") == 0
    assert link.is_symlink() and link.resolve() == real
    assert rundir.load_run(real).config.seed == 1 and (real / "NOTES.txt").read_text() == "mine"
    assert [p.name for p in link.parent.iterdir()] == ["run"]
    assert [p.name for p in real.parent.iterdir()] == [real.name]
    for here in (real, real / "folds"):  # the old run is deleted once replaced: refused
        monkeypatch.chdir(here)
        with pytest.raises(UserError, match="working folder"):
            fit(Path("."), "overwrite=true", "seed=2")
        with pytest.raises(UserError, match="working folder"):
            fit(link, "overwrite=true", "seed=2")
    assert rundir.load_run(real).config.seed == 1
    monkeypatch.chdir(real.parent)
    assert fit(Path(real.name), "overwrite=true", "seed=2") == 0
    assert rundir.load_run(real).config.seed == 2 and (real / "NOTES.txt").read_text() == "mine"
    assert [p.name for p in real.parent.iterdir()] == [real.name]


def test_a_dangling_link_as_output_dir_is_named_a_dangling_link(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from melanoma_mil.cli import main

    features, labels = make_bag_cohort(tmp_path / "cohort", n_patients=12, dim=8, shift=4.0)
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "gone", target_is_directory=True)
    keys = [f"data.features_dir={features}", f"data.labels_csv={labels}", "logger=none"]
    for out in (link, link / "sub"):
        assert main(["fit", f"output_dir={out}", *keys]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "which does not exist" in err and "a file" not in err, err
    assert not (tmp_path / "gone").exists()


def test_tile_refuses_a_linked_contact_sheet_cache(tmp_path: Path) -> None:
    """The cells kept for the next contact sheet are pruned (each whose QC image is gone): a
    link there pruned the user's own PNGs where it points."""
    make_cohort(tmp_path, 1)
    out = tmp_path / "tiles_out"
    out.mkdir()
    mine = _mine(tmp_path, "holiday.png")
    (out / CELLS).symlink_to(mine)
    cfg = TileConfig(slides_dir=str(tmp_path / "slides"), output_dir=str(out), workers=1,
                     tiling=TilingConfig(mpp=0.5, tile_size=64))  # fmt: skip
    with pytest.raises(UserError, match=r"qc_cells' is a link to .*mine.*replace the link"):
        run_tile(cfg)
    assert [p.name for p in mine.iterdir()] == ["holiday.png"]
    assert [p.name for p in out.iterdir()] == [CELLS]


@pytest.mark.parametrize("linked", ["tiles", "features/other_encoder"])
def test_predict_refuses_a_link_inside_its_work_cache(
    pipe: Pipeline, tmp_path: Path, linked: str
) -> None:
    """A user's tiling (or feature cache) linked into _work/<key>/ to be reused: its files of a
    slide made from another file were deleted and remade, its tiling.csv replaced."""
    mine = tmp_path / "mine"
    shutil.copytree(pipe.root / "tiles" if linked == "tiles" else pipe.features, mine)
    kept = {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()}
    other = tmp_path / "other"  # the same slide id, another file
    other.mkdir()
    shutil.copy(pipe.slides / "slide_000.tiff", other)
    out = tmp_path / "pred"
    link = out / "_work" / pipe.features.name / linked
    link.parent.mkdir(parents=True)
    link.symlink_to(mine)
    cfg = inference_cfg(PredictConfig, pipe, out, f"slides_dir={other}")
    with pytest.raises(UserError, match=f"{linked}' is a link") as refused:
        run_predict(cfg)
    assert f"outside output_dir '{out}' would" in str(refused.value)  # not a folder in _work
    assert {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()} == kept
    assert [p.name for p in out.iterdir()] == ["_work"]


def test_sweep_refuses_a_linked_comparison_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The sweep's comparison was written where the link pointed, outside the sweep's folder
    (and replaced there by the next sweep with overwrite=true)."""
    features, labels = make_bag_cohort(tmp_path / "c", n_patients=8, dim=4)
    sweep_file = tmp_path / "grid.yaml"
    sweep_file.write_text("method: grid\nparameters:\n  seed:\n    values: [1, 2]\n")
    out = tmp_path / "out"
    out.mkdir()
    mine = _mine(tmp_path, "notes.txt")
    (out / "comparison").symlink_to(mine)
    argv = ["sweep", str(sweep_file), f"output_dir={out}", f"data.features_dir={features}",
            f"data.labels_csv={labels}", "cv.folds=2", "trainer.max_epochs=1", "logger=none",
            "trainer.accelerator=cpu", "trainer.min_val_bags=1"]  # fmt: skip
    assert main(argv) == 2
    assert "comparison' is a link" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert [p.name for p in out.iterdir()] == ["comparison"]  # no fit, no marker


def test_held_slide_folders_are_named_by_ids_and_hold_a_slide_entry_a_dangling_link_too(
    tmp_path: Path,
) -> None:
    """The one test of which folders an earlier call's slides are (`heatmap`'s resume, links
    and case twins; `analyse.claim_for_run` had its own, which counted hidden folders): a
    hidden or device-named folder is no slide's, a dangling link named like a slide file
    makes its folder one (a draw would replace the link, so it is refused, not written)."""
    for name in ("S1/heatmap.png", ".old/attention.h5", "CON/attention.h5", "notes/a.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    (tmp_path / "S2").mkdir()
    (tmp_path / "S2" / "tiles.geojson").symlink_to(tmp_path / "gone")
    (tmp_path / "S3").symlink_to(tmp_path / "S1")  # a linked folder holding one: held
    names = ("attention.h5", "heatmap.png", "tiles.geojson")
    assert held_ids(tmp_path, holding=names) == ["S1", "S2", "S3"]
    (tmp_path / "S4.h5").write_text("x")
    (tmp_path / ".S5.h5").write_text("x")
    (tmp_path / "S6.h5").symlink_to(tmp_path / "gone")
    assert held_ids(tmp_path, ".h5") == ["S4"]
