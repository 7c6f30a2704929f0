"""`predict` / `heatmap` never score one slide's features under another's id, and `predict`
never mixes the previous call's outputs, or a user's files, with its own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import Pipeline, inference_cfg, slide_folder, untagged_copy
from PIL import Image

from melanoma_mil.config import HeatmapConfig, PredictConfig, load_config
from melanoma_mil.errors import UserError
from melanoma_mil.inference.heatmap import run_heatmap
from melanoma_mil.inference.inputs import find_input_slides
from melanoma_mil.inference.predict import run_predict
from melanoma_mil.tiling.coords import read_coords


def predict_cfg(pipe: Pipeline, out: Path, *extra: str) -> PredictConfig:
    return inference_cfg(PredictConfig, pipe, out, *extra)


def run_with_tiling(pipe: Pipeline, root: Path, **tiling: Any) -> Path:
    """A copy of the pipeline's run whose provenance records other tiling settings."""
    run = root / "run"
    shutil.copytree(pipe.run_dir, run)
    prov = json.loads((run / "provenance.json").read_text())
    prov["tiling"] = json.dumps({**json.loads(prov["tiling"]), **tiling}, sort_keys=True)
    (run / "provenance.json").write_text(json.dumps(prov))
    return run


def test_work_files_of_another_slide_with_the_same_id_are_rebuilt(
    pipe: Pipeline, tmp_path: Path
) -> None:
    fit = pd.read_csv(pipe.run_dir / "predictions.csv").set_index("slide_id")
    a, b = slide_folder(pipe, tmp_path, "slide_000"), slide_folder(pipe, tmp_path, "slide_007")
    out = tmp_path / "pred"
    assert run_predict(predict_cfg(pipe, out, f"slides_dir={a}", "heatmaps=false")) == 0
    first = pd.read_csv(out / "predictions.csv").set_index("slide_id").loc["S"]
    (out / "predictions.csv").unlink()  # the user clears the table, keeps the folder
    assert run_predict(predict_cfg(pipe, out, f"slides_dir={b}", "heatmaps=false")) == 0
    row = pd.read_csv(out / "predictions.csv").set_index("slide_id").loc["S"]
    fold = fit.loc["slide_007", "fold"]  # this fold model gives fit's probability for slide_007
    assert row[f"prob_fold_{fold}"] == pytest.approx(fit.loc["slide_007", "prob"], abs=1e-4)
    assert row["prob"] != pytest.approx(first["prob"], abs=1e-6)
    # the slide is replaced by a broken file: tile fails, so its old features are not scored
    (b / "S.tiff").write_bytes(b"II*\x00 not a slide")
    cfg = predict_cfg(pipe, out, f"slides_dir={b}", "heatmaps=false", "overwrite=true")
    assert run_predict(cfg) == 1
    row = pd.read_csv(out / "predictions.csv").set_index("slide_id").loc["S"]
    assert row["status"] == "failed" and pd.isna(row.get("prob"))
    assert "not a format OpenSlide reads" in row["reason"]  # tile's own reason


def test_overwrite_retiles_with_the_runs_new_tiling(pipe: Pipeline, tmp_path: Path) -> None:
    a = slide_folder(pipe, tmp_path, "slide_000")
    out = tmp_path / "pred"
    assert run_predict(predict_cfg(pipe, out, f"slides_dir={a}", "heatmaps=false")) == 0
    run2 = run_with_tiling(pipe, tmp_path, min_tissue=0.05)
    cfg = predict_cfg(pipe, out, f"run_dir={run2}", f"slides_dir={a}", "heatmaps=false",
                      "overwrite=true")  # fmt: skip
    assert run_predict(cfg) == 0
    key = json.loads((run2 / "provenance.json").read_text())["cache_key"]
    grid = read_coords(out / "_work" / key / "tiles" / "coords" / "S.h5")
    assert grid.tiling["min_tissue"] == 0.05
    row = pd.read_csv(out / "predictions.csv").set_index("slide_id").loc["S"]
    assert row["status"] == "ok" and row["n_tiles"] == len(grid.coords)


def test_predict_ignores_the_runs_tissue_masks_for_new_slides(
    pipe: Pipeline, tmp_path: Path
) -> None:
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(masks / "S.png")  # a training slide's: none
    run = run_with_tiling(pipe, tmp_path, mask_dir=str(masks))
    a = slide_folder(pipe, tmp_path, "slide_000")
    cfg = predict_cfg(pipe, tmp_path / "pred", f"run_dir={run}", f"slides_dir={a}",
                      "heatmaps=false")  # fmt: skip
    assert run_predict(cfg) == 0
    row = pd.read_csv(tmp_path / "pred" / "predictions.csv").set_index("slide_id").loc["S"]
    assert row["status"] == "ok" and row["n_tiles"] > 0


def test_cached_features_of_another_slide_fail_that_slide(pipe: Pipeline, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(pipe.slides / "slide_007.tiff", slides / "slide_000.tiff")  # same id, other slide
    shutil.copy(pipe.slides / "slide_001.tiff", slides / "slide_001.tiff")
    out = tmp_path / "hm"
    keys = [f"run_dir={pipe.run_dir}", f"slides_dir={slides}", f"output_dir={out}",
            f"features_dir={pipe.features}", "device=cpu", "thumbnail_size=128"]  # fmt: skip
    assert run_heatmap(load_config(HeatmapConfig, [], [*keys, "top_k=2"])) == 1
    table = pd.read_csv(out / "heatmaps.csv").set_index("slide_id")
    bad = table.loc["slide_000"]
    assert bad["status"] == "failed" and pd.isna(bad["prob"])
    assert "is not the slide that was tiled" in bad["reason"]
    assert table.loc["slide_001", "status"] == "ok"


def test_a_dicom_folder_recorded_by_features_is_found(tmp_path: Path) -> None:
    dicom = tmp_path / "slides" / "S1"
    dicom.mkdir(parents=True)
    (dicom / "level0.dcm").write_bytes(b"DICM")
    feats = tmp_path / "feats"
    feats.mkdir()
    with h5py.File(feats / "S1.h5", "w") as f:
        f.attrs["slide_path"] = str(dicom)
    cfg = load_config(HeatmapConfig, [], [f"output_dir={tmp_path / 'out'}"])
    assert find_input_slides(cfg, feats, render=True) == {"S1": dicom}


@pytest.mark.parametrize("name", ["report.html", "evaluation/evaluation.json"])
def test_a_users_report_in_an_unmarked_folder_is_refused(
    pipe: Pipeline, tmp_path: Path, name: str
) -> None:
    out = tmp_path / "project"
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).write_text("MY OWN REPORT")
    cfg = predict_cfg(pipe, out, f"features_dir={pipe.features}", "heatmaps=false",
                      f"labels_csv={pipe.root / 'cohort/labels.csv'}")  # fmt: skip
    with pytest.raises(UserError, match="overwrite=true"):
        run_predict(cfg)
    assert (out / name).read_text() == "MY OWN REPORT"


def test_overwrite_removes_the_previous_calls_outputs_only(pipe: Pipeline, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    feats = f"features_dir={pipe.features}"
    labels = pipe.root / "cohort/labels.csv"
    first = predict_cfg(pipe, out, feats, "slide_ids=[slide_000,slide_002]", "geojson=true",
                        f"patients_csv={labels}", f"labels_csv={labels}")  # fmt: skip
    run_predict(first)
    assert (out / "report.html").is_file() and (out / "slide_000" / "tiles.geojson").is_file()
    (out / "notes.txt").write_text("mine")
    (out / "slide_002" / "notes.txt").write_text("mine")
    second = predict_cfg(pipe, out, feats, "slide_ids=[slide_000,slide_005]", "overwrite=true")
    assert run_predict(second) == 0
    assert sorted(pd.read_csv(out / "predictions.csv")["slide_id"]) == ["slide_000", "slide_005"]
    gone = ["patient_predictions.csv", "report.html", "evaluation/evaluation.json",
            "slide_002/attention.h5", "slide_002/heatmap.png",
            "slide_000/tiles.geojson"]  # fmt: skip
    assert [p for p in gone if (out / p).exists()] == []
    kept = ["notes.txt", "slide_002/notes.txt", "slide_000/heatmap.png", "slide_005/attention.h5"]
    assert [p for p in kept if not (out / p).is_file()] == []


def test_a_slide_without_resolution_is_predicted_with_mpp_csv(
    pipe: Pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = untagged_copy(pipe.slides / "slide_000.tiff", tmp_path / "slides" / "S.tiff").parent
    assert run_predict(predict_cfg(pipe, tmp_path / "a", f"slides_dir={folder}")) == 1
    reason = pd.read_csv(tmp_path / "a" / "predictions.csv").loc[0, "reason"]
    # the advice names only keys predict accepts, once, with no doubled 'failed: failed:'
    assert "no resolution" in reason and "mpp_csv=" in reason and "tiling." not in reason
    assert f"failed S: {reason}" in capsys.readouterr().out and "failed" not in reason
    drawn = inference_cfg(HeatmapConfig, pipe, tmp_path / "h", f"slides_dir={folder}")
    assert run_heatmap(drawn) == 1
    assert pd.read_csv(tmp_path / "h" / "heatmaps.csv").loc[0, "reason"] == reason

    mpp = read_coords(pipe.root / "tiles" / "coords" / "slide_000.h5").level0_mpp
    table = tmp_path / "mpp.csv"
    table.write_text(f"slide_id,mpp\nS,{mpp}\n")
    cfg = predict_cfg(pipe, tmp_path / "b", f"slides_dir={folder}", f"mpp_csv={table}")
    assert run_predict(cfg) == 0
    right = pd.read_csv(tmp_path / "b" / "predictions.csv").loc[0]
    assert right["status"] == "ok"

    # a typo in mpp_csv, then corrected: overwrite=true re-tiles the slide at the right mpp
    table.write_text(f"slide_id,mpp\nS,{mpp * 0.8}\n")
    assert (
        run_predict(predict_cfg(pipe, tmp_path / "c", f"slides_dir={folder}", f"mpp_csv={table}"))
        == 0
    )
    table.write_text(f"slide_id,mpp\nS,{mpp}\n")
    again = predict_cfg(
        pipe, tmp_path / "c", f"slides_dir={folder}", f"mpp_csv={table}", "overwrite=true"
    )
    assert run_predict(again) == 0
    fixed = pd.read_csv(tmp_path / "c" / "predictions.csv").loc[0]
    assert fixed["status"] == "ok" and fixed["n_tiles"] == right["n_tiles"]


def work_statuses(out: Path, table: str) -> dict[str, str]:
    """slide_id -> status in the _work tiling.csv or extract.csv of the last call."""
    (csv,) = out.glob(f"_work/*/**/{table}")
    return pd.read_csv(csv).set_index("slide_id")["status"].to_dict()


def test_overwrite_reuses_work_features_of_unchanged_slides(pipe: Pipeline, tmp_path: Path) -> None:
    fit = pd.read_csv(pipe.run_dir / "predictions.csv").set_index("slide_id")
    slides = tmp_path / "slides"
    slides.mkdir()
    for name, source in (("A", "slide_000"), ("B", "slide_001")):
        shutil.copy(pipe.slides / f"{source}.tiff", slides / f"{name}.tiff")
    out = tmp_path / "pred"
    cfg = predict_cfg(pipe, out, f"slides_dir={slides}", "heatmaps=false", "overwrite=true")
    assert run_predict(cfg) == 0
    assert run_predict(cfg) == 0  # nothing changed: nothing tiled or encoded again
    assert work_statuses(out, "tiling.csv") == {"A": "skipped", "B": "skipped"}
    assert work_statuses(out, "extract.csv") == {"A": "skipped", "B": "skipped"}
    shutil.copy(pipe.slides / "slide_007.tiff", slides / "B.tiff")  # B is now another slide
    assert run_predict(cfg) == 0
    assert work_statuses(out, "extract.csv") == {"A": "skipped", "B": "ok"}
    row = pd.read_csv(out / "predictions.csv").set_index("slide_id").loc["B"]
    fold = fit.loc["slide_007", "fold"]
    assert row[f"prob_fold_{fold}"] == pytest.approx(fit.loc["slide_007", "prob"], abs=1e-4)


def test_work_features_of_another_precision_are_re_extracted(
    pipe: Pipeline, tmp_path: Path
) -> None:
    recorded = json.loads((pipe.run_dir / "provenance.json").read_text())["precision"]
    other = "fp32" if recorded != "fp32" else "bf16"
    slides = slide_folder(pipe, tmp_path, "slide_000")
    out = tmp_path / "pred"
    cfg = predict_cfg(pipe, out, f"slides_dir={slides}", "heatmaps=false", "overwrite=true")
    assert run_predict(cfg) == 0
    again = predict_cfg(pipe, out, f"slides_dir={slides}", "heatmaps=false", "overwrite=true",
                        f"precision={other}")  # fmt: skip
    assert run_predict(again) == 0  # _work is predict's own cache: rebuilt, not failed
    assert work_statuses(out, "tiling.csv") == {"S": "skipped"}  # the coords are kept
    assert work_statuses(out, "extract.csv") == {"S": "ok"}
    assert pd.read_csv(out / "predictions.csv")["status"].tolist() == ["ok"]


def test_a_missing_mpp_csv_is_refused_even_beside_features_dir(
    pipe: Pipeline, tmp_path: Path
) -> None:
    """With features_dir, mpp_csv is unused; a path to no file is still a mistake to say, not
    to ignore (the user believes the resolutions were given)."""
    out = tmp_path / "pred"
    cfg = predict_cfg(pipe, out, f"features_dir={pipe.features}", f"mpp_csv={tmp_path / 'no.csv'}")
    with pytest.raises(UserError, match="mpp_csv .*no.csv' not found"):
        run_predict(cfg)
    assert not out.exists()  # before any work


def test_overwrite_retiles_a_slide_whose_mpp_csv_row_was_dropped(
    pipe: Pipeline, tmp_path: Path
) -> None:
    slides = slide_folder(pipe, tmp_path, "slide_000")
    own = len(read_coords(pipe.root / "tiles" / "coords" / "slide_000.h5").coords)
    table = tmp_path / "mpp.csv"
    table.write_text("slide_id,mpp\nS,0.25\n")  # a wrong row: the file says 0.5
    out = tmp_path / "pred"
    given = [f"slides_dir={slides}", "heatmaps=false"]
    assert run_predict(predict_cfg(pipe, out, *given, f"mpp_csv={table}")) == 0
    assert pd.read_csv(out / "predictions.csv").loc[0, "n_tiles"] != own
    # the row dropped: _work, predict's own cache, is tiled again at the slide's own mpp
    assert run_predict(predict_cfg(pipe, out, *given, "overwrite=true")) == 0
    row = pd.read_csv(out / "predictions.csv").loc[0]
    assert row["status"] == "ok" and row["n_tiles"] == own
