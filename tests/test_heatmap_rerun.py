"""A resumed or overwriting `heatmap` never reports, or leaves beside its results, another slide
file's or an earlier call's per-slide files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import pandas as pd
import pytest
from conftest import (
    Pipeline,
    inference_cfg,
    room_for_one_and_a_half,
    slide_folder,
    small_disk,
)
from PIL import Image

from melanoma_mil.config import HeatmapConfig
from melanoma_mil.inference.heatmap import run_heatmap


def heatmap_cfg(pipe: Pipeline, out: Path, *extra: str) -> HeatmapConfig:
    return inference_cfg(HeatmapConfig, pipe, out, *extra)


def row_of(out: Path) -> pd.Series:
    return pd.read_csv(out / "heatmaps.csv").set_index("slide_id").loc["S"]


def test_a_changed_slide_with_the_same_id_is_redrawn(pipe: Pipeline, tmp_path: Path) -> None:
    fit = pd.read_csv(pipe.run_dir / "predictions.csv").set_index("slide_id")
    a, b = slide_folder(pipe, tmp_path, "slide_000"), slide_folder(pipe, tmp_path, "slide_007")
    out = tmp_path / "hm"
    assert run_heatmap(heatmap_cfg(pipe, out, f"slides_dir={a}", "geojson=true")) == 0
    assert run_heatmap(heatmap_cfg(pipe, out, f"slides_dir={a}")) == 0
    assert row_of(out)["status"] == "skipped"  # the same file: kept
    assert run_heatmap(heatmap_cfg(pipe, out, f"slides_dir={b}")) == 0
    row = row_of(out)
    fold = fit.loc["slide_007", "fold"]  # this fold model gives fit's probability for slide_007
    assert row["status"] == "ok"
    assert row[f"prob_fold_{fold}"] == pytest.approx(fit.loc["slide_007", "prob"], abs=1e-4)
    with h5py.File(out / "S" / "attention.h5") as f:
        assert f.attrs["slide_path"] == str(b / "S.tiff")
    assert not (out / "S" / "tiles.geojson").exists()  # slide_000's, not asked for this time


def test_a_rerun_with_another_mpp_csv_row_is_redrawn(pipe: Pipeline, tmp_path: Path) -> None:
    slides, out, table = slide_folder(pipe, tmp_path, "slide_000"), tmp_path / "hm", tmp_path / "m"
    table.write_text("slide_id,mpp\nS,0.25\n")  # the file says 0.5: tiled 4x coarser with it

    def drawn(*extra: str) -> tuple[str, int]:
        assert run_heatmap(heatmap_cfg(pipe, out, f"slides_dir={slides}", *extra)) == 0
        return row_of(out)["status"], int(row_of(out)["n_tiles"])

    status, own = drawn()
    assert status == "ok"
    status, n = drawn(f"mpp_csv={table}")
    assert status == "ok" and n != own
    assert drawn(f"mpp_csv={table}") == ("skipped", n)
    assert drawn() == ("ok", own)  # the row dropped: the slide's own mpp again


def test_a_rerun_at_another_precision_is_redrawn(pipe: Pipeline, tmp_path: Path) -> None:
    recorded = json.loads((pipe.run_dir / "provenance.json").read_text())["precision"]
    other = "fp32" if recorded != "fp32" else "bf16"
    slides, out = slide_folder(pipe, tmp_path, "slide_000"), tmp_path / "hm"

    def status(*extra: str) -> str:
        assert run_heatmap(heatmap_cfg(pipe, out, f"slides_dir={slides}", *extra)) == 0
        return str(row_of(out)["status"])

    assert status() == "ok"
    assert status(f"precision={other}") == "ok"  # its features re-extracted: drawn from them
    with h5py.File(out / "S" / "attention.h5") as f:
        assert f.attrs["precision"] == other
    assert status(f"precision={other}") == "skipped"
    assert status("precision=auto") == "skipped"  # any precision will do


def test_a_rerun_asking_for_geojson_draws_it(pipe: Pipeline, tmp_path: Path) -> None:
    out = tmp_path / "hm"
    given = [f"slides_dir={pipe.slides}", f"features_dir={pipe.features}", "slide_ids=[slide_000]"]
    assert run_heatmap(heatmap_cfg(pipe, out, *given)) == 0
    assert run_heatmap(heatmap_cfg(pipe, out, *given, "geojson=true")) == 0
    assert pd.read_csv(out / "heatmaps.csv")["status"].tolist() == ["ok"]  # not skipped
    assert (out / "slide_000" / "tiles.geojson").is_file()
    assert run_heatmap(heatmap_cfg(pipe, out, *given, "geojson=true")) == 0
    assert pd.read_csv(out / "heatmaps.csv")["status"].tolist() == ["skipped"]


def test_a_rerun_with_other_drawing_settings_redraws(pipe: Pipeline, tmp_path: Path) -> None:
    out = tmp_path / "hm"
    given = [f"slides_dir={pipe.slides}", f"features_dir={pipe.features}", "slide_ids=[slide_000]"]

    def sizes(*extra: str) -> tuple[str, tuple[int, int], tuple[int, int]]:
        assert run_heatmap(heatmap_cfg(pipe, out, *given, *extra)) == 0
        status = pd.read_csv(out / "heatmaps.csv")["status"].tolist()
        folder = out / "slide_000"
        with Image.open(folder / "heatmap.png") as heat, Image.open(folder / "montage.png") as mt:
            return status[0], heat.size, mt.size

    status, heat, montage = sizes("top_k=1", "thumbnail_size=128")
    assert status == "ok"
    (out / "slide_000" / "notes.txt").write_text("mine")
    assert sizes("top_k=1", "thumbnail_size=128") == ("skipped", heat, montage)
    status, heat2, montage2 = sizes("top_k=2", "thumbnail_size=128")  # a wider montage
    assert (status, heat2) == ("ok", heat) and montage2[0] > montage[0]
    status, heat3, montage3 = sizes("top_k=2", "thumbnail_size=256")  # a larger heatmap
    assert (status, montage3) == ("ok", montage2) and heat3[0] > heat[0]
    assert sizes("top_k=2", "thumbnail_size=256") == ("skipped", heat3, montage3)
    with h5py.File(out / "slide_000" / "attention.h5", "a") as f:  # as written before the record
        del f.attrs["drawing"]
    assert sizes("top_k=2", "thumbnail_size=256")[0] == "ok"
    assert (out / "slide_000" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("removed", ["heatmap.png", "montage.png"])
def test_a_removed_drawing_is_drawn_again(pipe: Pipeline, tmp_path: Path, removed: str) -> None:
    out = tmp_path / "hm"
    cfg = heatmap_cfg(pipe, out, f"slides_dir={pipe.slides}", f"features_dir={pipe.features}",
                      "slide_ids=[slide_000]")  # fmt: skip
    assert run_heatmap(cfg) == 0
    (out / "slide_000" / removed).unlink()
    assert run_heatmap(cfg) == 0
    table = pd.read_csv(out / "heatmaps.csv")
    assert table["status"].tolist() == ["ok"]
    assert (out / "slide_000" / removed).is_file()
    assert table.loc[0, removed.removesuffix(".png")] == str(out / "slide_000" / removed)


def test_an_attention_file_without_a_fingerprint_is_redone(pipe: Pipeline, tmp_path: Path) -> None:
    out = tmp_path / "hm"
    cfg = heatmap_cfg(pipe, out, f"slides_dir={pipe.slides}", f"features_dir={pipe.features}",
                      "slide_ids=[slide_000]")  # fmt: skip
    assert run_heatmap(cfg) == 0
    with h5py.File(out / "slide_000" / "attention.h5", "a") as f:  # as written before the change
        del f.attrs["slide_fingerprint"]
    assert run_heatmap(cfg) == 0
    assert pd.read_csv(out / "heatmaps.csv")["status"].tolist() == ["ok"]
    with h5py.File(out / "slide_000" / "attention.h5") as f:
        assert f.attrs["slide_fingerprint"]


def test_overwrite_removes_the_earlier_calls_slide_files_only(
    pipe: Pipeline, tmp_path: Path
) -> None:
    out = tmp_path / "hm"
    given = [f"slides_dir={pipe.slides}", f"features_dir={pipe.features}"]
    first = heatmap_cfg(pipe, out, *given, "slide_ids=[slide_000,slide_001]", "geojson=true")
    assert run_heatmap(first) == 0
    (out / "slide_001" / "notes.txt").write_text("mine")
    second = heatmap_cfg(pipe, out, *given, "slide_ids=[slide_000]", "overwrite=true")
    assert run_heatmap(second) == 0
    assert pd.read_csv(out / "heatmaps.csv")["slide_id"].tolist() == ["slide_000"]
    gone = ["slide_000/tiles.geojson", "slide_001/attention.h5", "slide_001/heatmap.png",
            "slide_001/montage.png", "slide_001/tiles.geojson"]  # fmt: skip
    assert [p for p in gone if (out / p).exists()] == []
    kept = ["slide_000/attention.h5", "slide_000/heatmap.png", "slide_001/notes.txt"]
    assert [p for p in kept if not (out / p).is_file()] == []


def test_overwrite_leaves_a_users_copy_of_a_slide_folder_alone(
    pipe: Pipeline, tmp_path: Path
) -> None:
    """A slide's folder copied by the user in output_dir (best/) held an attention.h5, and
    overwrite=true deleted its files as an earlier call's slide folder."""
    out = tmp_path / "hm"
    given = [f"slides_dir={pipe.slides}", f"features_dir={pipe.features}"]
    assert run_heatmap(heatmap_cfg(pipe, out, *given, "slide_ids=[slide_000]")) == 0
    shutil.copytree(out / "slide_000", out / "best")
    before = {p: p.read_bytes() for p in (out / "best").iterdir()}
    again = heatmap_cfg(pipe, out, *given, "slide_ids=[slide_001]", "overwrite=true")
    assert run_heatmap(again) == 0
    assert not (out / "slide_000").exists()  # the earlier call's: removed
    assert {p: p.read_bytes() for p in before if p.is_file()} == before


def test_a_hidden_copy_of_a_slide_folder_and_a_users_dangling_link_are_left_alone(
    pipe: Pipeline, tmp_path: Path
) -> None:
    """A user's hidden copy of a slide folder (.old/) stopped every later call with 'slide id
    '.old' starts with '.''; a dangling link of the user's named like a slide file in a
    redrawn slide's folder was deleted by overwrite=true. Both are left alone."""
    out = tmp_path / "hm"
    given = [f"slides_dir={pipe.slides}", f"features_dir={pipe.features}"]
    assert run_heatmap(heatmap_cfg(pipe, out, *given, "slide_ids=[slide_000]")) == 0
    shutil.copytree(out / "slide_000", out / ".old")
    link = out / "slide_000" / "tiles.geojson"
    link.symlink_to(tmp_path / "mine.geojson")  # not made yet: dangling
    assert run_heatmap(heatmap_cfg(pipe, out, *given, "slide_ids=[slide_001]")) == 0
    again = heatmap_cfg(pipe, out, *given, "slide_ids=[slide_000]", "overwrite=true")
    assert run_heatmap(again) == 0
    assert link.is_symlink() and not (tmp_path / "mine.geojson").exists()
    assert sorted(p.name for p in (out / ".old").iterdir()) == [
        "attention.h5", "heatmap.png", "montage.png"
    ]  # fmt: skip


def test_a_call_on_other_slides_keeps_the_earlier_slides_in_the_table(
    pipe: Pipeline, tmp_path: Path
) -> None:
    """heatmaps.csv was rewritten with the last call's slides only: slide_000 and slide_001,
    drawn before and still in output_dir, were no longer listed (without overwrite=true)."""
    out = tmp_path / "hm"
    given = [f"slides_dir={pipe.slides}", f"features_dir={pipe.features}"]
    assert run_heatmap(heatmap_cfg(pipe, out, *given, "slide_ids=[slide_000,slide_001]")) == 0
    first = pd.read_csv(out / "heatmaps.csv").set_index("slide_id")
    assert run_heatmap(heatmap_cfg(pipe, out, *given, "slide_ids=[slide_002]")) == 0
    table = pd.read_csv(out / "heatmaps.csv").set_index("slide_id")
    assert table.index.tolist() == ["slide_000", "slide_001", "slide_002"]
    pd.testing.assert_frame_equal(table.loc[first.index, first.columns], first)
    (out / "slide_001" / "attention.h5").unlink()  # removed since: no longer listed
    assert run_heatmap(heatmap_cfg(pipe, out, *given, "slide_ids=[slide_002]")) == 0
    assert pd.read_csv(out / "heatmaps.csv")["slide_id"].tolist() == ["slide_000", "slide_002"]


def test_a_full_disk_stops_the_slides_after_it_and_a_rerun_resumes(
    pipe: Pipeline, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every slide after the disk filled was drawn anyway, each failing with a bare
    'OSError: [Errno 28]' that named no folder and no fix."""
    with small_disk(tmp_path / "disk", "2m") as disk:
        given = [f"slides_dir={pipe.slides}", f"features_dir={pipe.features}"]
        one = tmp_path / "one"
        assert run_heatmap(heatmap_cfg(pipe, one, *given, "slide_ids=[slide_000]")) == 0
        room_for_one_and_a_half(disk, one / "slide_000")
        out = disk / "hm"
        cfg = heatmap_cfg(pipe, out, *given, "slide_ids=[slide_000,slide_001,slide_002,slide_003]")
        assert run_heatmap(cfg) == 1
        table = pd.read_csv(out / "heatmaps.csv").set_index("slide_id")
        assert table.loc["slide_000", "status"] == "ok"
        full = f"disk full (No space left on device) in {out / 'slide_001'}"
        assert table.loc["slide_001", "reason"] == full
        later = table.loc[["slide_002", "slide_003"]]
        assert later["reason"].tolist() == [f"not drawn: {full}"] * 2  # scored, not drawn
        assert later["status"].tolist() == ["no_heatmap"] * 2 and later["prob"].notna().all()
        assert f"heatmap stopped early: {full}; make room" in caplog.text
        assert not [p for p in disk.rglob("*") if p.name.endswith(".tmp")]
        (disk / "filler").unlink()
        assert run_heatmap(cfg) == 0
        table = pd.read_csv(out / "heatmaps.csv")
        assert table["status"].tolist() == ["skipped", "ok", "ok", "ok"]
