"""A cohort folder of symbolic links: `predict` and `heatmap` tile, encode and score each linked
slide as they would its target, skip it on a rerun, and catch a link that now points elsewhere."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from conftest import CMU, Pipeline, inference_cfg

from melanoma_mil.config import HeatmapConfig, PredictConfig
from melanoma_mil.inference.heatmap import run_heatmap
from melanoma_mil.inference.predict import run_predict


def link(path: Path, target: Path) -> None:
    """``path`` -> ``target`` as a relative link (replacing one there), as cohort folders do."""
    path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(os.path.relpath(target, path.parent))


def table(out: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(out / name, dtype={"slide_id": str}).set_index("slide_id")


def work_statuses(out: Path, name: str) -> dict[str, str]:
    """slide_id -> status in the _work tiling.csv or extract.csv of the last call."""
    (csv,) = out.glob(f"_work/*/**/{name}")
    return table(csv.parent, name)["status"].to_dict()


@pytest.mark.skipif(not CMU.is_file(), reason="needs the real Aperio slide in shared/data")
def test_predict_scores_linked_slides_as_their_targets(pipe: Pipeline, tmp_path: Path) -> None:
    fit = table(pipe.run_dir, "predictions.csv")
    slides = tmp_path / "links"
    slides.mkdir()
    (slides / "B2.svs").symlink_to(CMU)  # a real Aperio slide, linked under another name
    link(slides / "L0.tiff", pipe.slides / "slide_000.tiff")
    direct = tmp_path / "direct"
    assert run_predict(inference_cfg(PredictConfig, pipe, direct, f"slides_dir={CMU.parent}",
                                     "heatmaps=false")) == 0  # fmt: skip
    out = tmp_path / "pred"
    cfg = inference_cfg(PredictConfig, pipe, out, f"slides_dir={slides}", "overwrite=true")
    assert run_predict(cfg) == 0
    got, target = table(out, "predictions.csv"), table(direct, "predictions.csv").iloc[0]
    assert (got["status"] == "ok").all() and (out / "B2" / "heatmap.png").is_file()
    assert got.loc["B2", "n_tiles"] == target["n_tiles"]
    assert got.loc["B2", "prob"] == pytest.approx(target["prob"], abs=1e-6)
    fold = fit.loc["slide_000", "fold"]  # this fold model gives fit's probability for slide_000
    assert got.loc["L0", f"prob_fold_{fold}"] == pytest.approx(
        fit.loc["slide_000", "prob"], abs=1e-4
    )

    assert run_predict(cfg) == 0  # nothing changed: nothing tiled or encoded again
    assert work_statuses(out, "tiling.csv") == {"B2": "skipped", "L0": "skipped"}
    assert work_statuses(out, "extract.csv") == {"B2": "skipped", "L0": "skipped"}
    (feats,) = (p for p in out.glob("_work/*/features/*") if p.is_dir())
    again = tmp_path / "cached"  # the features predict made, given back as a cache
    assert run_predict(inference_cfg(PredictConfig, pipe, again, f"slides_dir={slides}",
                                     f"features_dir={feats}")) == 0  # fmt: skip
    cached = table(again, "predictions.csv")["prob"]
    assert cached.to_dict() == pytest.approx(got["prob"].to_dict(), abs=1e-6)

    link(slides / "L0.tiff", pipe.slides / "slide_007.tiff")  # the link now points elsewhere
    assert run_predict(cfg) == 0
    assert work_statuses(out, "extract.csv") == {"B2": "skipped", "L0": "ok"}
    row = table(out, "predictions.csv").loc["L0"]
    fold = fit.loc["slide_007", "fold"]
    assert row[f"prob_fold_{fold}"] == pytest.approx(fit.loc["slide_007", "prob"], abs=1e-4)


def test_heatmap_draws_linked_slides_and_redraws_a_retargeted_link(
    pipe: Pipeline, tmp_path: Path
) -> None:
    fit = table(pipe.run_dir, "predictions.csv")
    slides, out = tmp_path / "links", tmp_path / "hm"
    link(slides / "S.tiff", pipe.slides / "slide_000.tiff")
    cfg = inference_cfg(HeatmapConfig, pipe, out, f"slides_dir={slides}")
    assert run_heatmap(cfg) == 0
    assert table(out, "heatmaps.csv").loc["S", "status"] == "ok"
    assert run_heatmap(cfg) == 0
    assert table(out, "heatmaps.csv").loc["S", "status"] == "skipped"  # the same file: kept
    link(slides / "S.tiff", pipe.slides / "slide_007.tiff")
    assert run_heatmap(cfg) == 0
    row = table(out, "heatmaps.csv").loc["S"]
    fold = fit.loc["slide_007", "fold"]
    assert row["status"] == "ok"
    assert row[f"prob_fold_{fold}"] == pytest.approx(fit.loc["slide_007", "prob"], abs=1e-4)


def test_heatmap_from_a_cache_checks_where_each_link_points(pipe: Pipeline, tmp_path: Path) -> None:
    slides, out = tmp_path / "links", tmp_path / "hm"
    link(slides / "slide_000.tiff", pipe.slides / "slide_000.tiff")
    link(slides / "slide_001.tiff", pipe.slides / "slide_007.tiff")  # points to another slide
    cfg = inference_cfg(HeatmapConfig, pipe, out, f"slides_dir={slides}",
                        f"features_dir={pipe.features}")  # fmt: skip
    assert run_heatmap(cfg) == 1
    got = table(out, "heatmaps.csv")
    assert got.loc["slide_000", "status"] == "ok"
    bad = got.loc["slide_001"]
    assert bad["status"] == "failed" and "is not the slide that was tiled" in bad["reason"]
