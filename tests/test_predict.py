"""`predict`: new slides -> the run's tiling + encoder -> fold ensemble, reproducing `fit`."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TILE, Pipeline

from melanoma_mil.config import (
    EncoderConfig,
    EvaluateConfig,
    ExtractConfig,
    PredictConfig,
    load_config,
)
from melanoma_mil.data.bags import read_bag
from melanoma_mil.errors import UserError
from melanoma_mil.evaluation.evaluate import run_evaluate
from melanoma_mil.features.run import run_extract
from melanoma_mil.inference.analyse import probability_columns
from melanoma_mil.inference.attention import AttentionMap
from melanoma_mil.inference.ensemble import Ensemble
from melanoma_mil.inference.inputs import encoder_config
from melanoma_mil.inference.predict import run_predict
from melanoma_mil.io import sha256_file
from melanoma_mil.rundir import load_run


def predict_cfg(pipe: Pipeline, out: Path, *extra: str) -> PredictConfig:
    keys = [
        f"run_dir={pipe.run_dir}",
        f"output_dir={out}",
        "device=cpu",
        "num_workers=0",
        "batch_size=32",
        "thumbnail_size=256",
        "top_k=2",
    ]
    return load_config(PredictConfig, [], [*keys, *extra])


def test_new_slides_are_tiled_and_encoded_like_the_run_and_reproduce_fit(
    pipe: Pipeline, tmp_path: Path
) -> None:
    fit = pd.read_csv(pipe.run_dir / "predictions.csv")
    # one test slide of each fold, copied to a new folder, plus a corrupt file
    picks = fit.groupby("fold").head(1)
    new = tmp_path / "new_slides"
    new.mkdir()
    for sid in picks["slide_id"]:
        shutil.copy(pipe.slides / f"{sid}.tiff", new / f"{sid}.tiff")
    (new / "broken.tiff").write_bytes(b"II*\x00 not a slide")
    out = tmp_path / "pred"
    assert run_predict(predict_cfg(pipe, out, f"slides_dir={new}")) == 1  # broken.tiff failed
    pred = pd.read_csv(out / "predictions.csv").set_index("slide_id")
    assert pred.loc["broken", "status"] == "failed" and "broken" in pred.loc["broken", "reason"]
    assert pd.isna(pred.loc["broken", "prob"])
    folds = load_run(pipe.run_dir).fold_names()
    for r in picks.itertuples():
        row = pred.loc[r.slide_id]
        assert row["status"] == "ok" and row["n_tiles"] > 0
        # the fold model that had this slide in its test set gives fit's probability
        assert row[f"prob_fold_{r.fold}"] == pytest.approx(r.prob, abs=1e-4)
        assert row["prob"] == pytest.approx(np.mean([row[f"prob_{f}"] for f in folds]))
        assert row["prob_immune_low"] == pytest.approx(row["prob"])
        assert row["pred"] == ("immune_low" if row["prob"] > 0.5 else "immune_high")
        for name in ("heatmap.png", "montage.png", "attention.h5"):
            assert (out / r.slide_id / name).is_file()
    with pytest.raises(UserError, match="overwrite=true"):
        run_predict(predict_cfg(pipe, out, f"slides_dir={new}"))


def test_predict_from_the_runs_feature_cache_matches_fit_for_every_slide(
    pipe: Pipeline, tmp_path: Path
) -> None:
    out = tmp_path / "pred"
    cfg = predict_cfg(pipe, out, f"features_dir={pipe.features}", "heatmaps=false")
    assert run_predict(cfg) == 0
    pred = pd.read_csv(out / "predictions.csv").set_index("slide_id")
    fit = pd.read_csv(pipe.run_dir / "predictions.csv")
    assert len(pred) == len(fit) == 12
    same = [pred.loc[r.slide_id, f"prob_fold_{r.fold}"] for r in fit.itertuples()]
    np.testing.assert_allclose(same, fit["prob"], atol=1e-4)
    assert not list(out.glob("*/heatmap.png"))


def test_predict_refuses_a_feature_cache_from_another_encoder(
    pipe: Pipeline, tmp_path: Path
) -> None:
    coords = tmp_path / "tiles" / "coords"
    coords.mkdir(parents=True)
    shutil.copy(pipe.root / "tiles" / "coords" / "slide_000.h5", coords)
    other = ExtractConfig(
        coords_dir=str(coords.parent),
        output_dir=str(tmp_path / "feats"),
        encoder=EncoderConfig(name="ciga_simclr_resnet18", pretrained=False),
        batch_size=32,
        num_workers=0,
        device="cpu",
    )
    assert run_extract(other) == 0
    (cache,) = [p for p in (tmp_path / "feats").iterdir() if p.is_dir()]
    out = tmp_path / "pred"
    cfg = predict_cfg(
        pipe, out, f"features_dir={cache}", f"slides_dir={pipe.slides}", "slide_ids=[slide_000]"
    )
    with pytest.raises(UserError, match="encoder='ciga_simclr_resnet18'.*'resnet18_imagenet'"):
        run_predict(cfg)
    assert not (out / "predictions.csv").exists()


def test_weights_file_must_match_the_recorded_sha(pipe: Pipeline, tmp_path: Path) -> None:
    run = load_run(pipe.run_dir)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"some weights")
    sha_run = dataclasses.replace(run, provenance={**run.provenance, "encoder_weights": "ab" * 32})
    with pytest.raises(UserError, match="pass encoder_weights=PATH"):
        encoder_config(sha_run, None)
    with pytest.raises(UserError, match="sha256"):
        encoder_config(sha_run, str(weights))
    digest = sha256_file(weights)
    ok_run = dataclasses.replace(run, provenance={**run.provenance, "encoder_weights": digest})
    assert encoder_config(ok_run, str(weights)) == EncoderConfig(  # the run's own file: trusted
        name="resnet18_imagenet", weights=str(weights), pretrained=False, trust_weights=True
    )
    assert encoder_config(run, None) == EncoderConfig(name="resnet18_imagenet", pretrained=False)
    with pytest.raises(UserError, match="drop encoder_weights"):
        encoder_config(run, str(weights))


def test_predict_refuses_a_cache_with_another_tile_size(pipe: Pipeline, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(pipe.features / "slide_003.h5", cache)
    with h5py.File(cache / "slide_003.h5", "r+") as f:
        f.attrs["tile_size"] = 2 * TILE
    cfg = predict_cfg(pipe, tmp_path / "pred", f"features_dir={cache}", "heatmaps=false")
    with pytest.raises(UserError, match=f"tile_size={2 * TILE}.*tile_size={TILE}"):
        run_predict(cfg)


def test_multiclass_prediction_columns() -> None:
    amap = AttentionMap(
        "s",
        np.zeros((3, 2), np.int64),
        256,
        np.full((2, 3), 1 / 3),
        np.array([[0.2, 0.5, 0.3], [0.4, 0.4, 0.2]]),
        ["fold_0", "fold_1"],
        ["a", "b", "c"],
    )
    cols = probability_columns(amap)
    assert "prob" not in cols and cols["pred"] == "b"
    assert cols["prob_a"] == pytest.approx(0.3) and cols["prob_fold_1_a"] == pytest.approx(0.4)
    assert set(cols) == {"prob_a", "prob_b", "prob_c", "pred"} | {
        f"prob_fold_{k}_{c}" for k in (0, 1) for c in "abc"
    }


def test_a_missing_slide_file_keeps_its_prediction_and_a_corrupt_bag_fails_alone(
    pipe: Pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    for sid in ("slide_003", "slide_004", "slide_005"):
        shutil.copy(pipe.features / f"{sid}.h5", cache)
    with h5py.File(cache / "slide_003.h5", "r+") as f:
        f.attrs["slide_path"] = str(tmp_path / "moved" / "slide_003.tiff")
    (cache / "slide_004.h5").write_bytes(b"truncated")
    out = tmp_path / "pred"
    assert run_predict(predict_cfg(pipe, out, f"features_dir={cache}")) == 1
    pred = pd.read_csv(out / "predictions.csv").set_index("slide_id")
    assert pred.loc["slide_003", "status"] == "no_heatmap"
    assert "pass slides_dir" in pred.loc["slide_003", "reason"]
    assert 0 <= pred.loc["slide_003", "prob"] <= 1
    assert pred.loc["slide_004", "status"] == "failed" and pd.isna(pred.loc["slide_004", "prob"])
    assert pred.loc["slide_005", "status"] == "ok"
    assert (out / "slide_005" / "heatmap.png").is_file()
    printed = capsys.readouterr().out  # the reasons are printed, not only written
    for sid in ("slide_003", "slide_004"):
        status, reason = pred.loc[sid, ["status", "reason"]]
        assert f"  {status} {sid}: {reason}" in printed.splitlines()
    assert f"of 3 slides; reasons (all in {out / 'predictions.csv'})" in printed
    assert "fold models on cpu, predicted" in printed  # predict_cfg: device=cpu


def test_patients_csv_scores_each_patients_pooled_tiles(pipe: Pipeline, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    for sid in ("slide_000", "slide_001", "slide_002", "slide_003"):
        shutil.copy(pipe.features / f"{sid}.h5", cache)
    (cache / "slide_003.h5").write_bytes(b"truncated")
    patients = tmp_path / "patients.csv"
    pd.DataFrame(  # P1's slides listed out of name order: pooled in this order, as by `fit`
        {"slide_id": ["slide_001", "slide_000", "slide_002", "slide_003"],
         "patient_id": ["P1", "P1", "P2", "P2"]}
    ).to_csv(patients, index=False)  # fmt: skip
    out = tmp_path / "pred"
    cfg = predict_cfg(pipe, out, f"features_dir={cache}", "heatmaps=false",
                      f"patients_csv={patients}")  # fmt: skip
    assert run_predict(cfg) == 1  # slide_003 failed; the others and both patients still scored
    table = pd.read_csv(out / "patient_predictions.csv").set_index("patient_id")
    assert list(table.index) == ["P1", "P2"] and list(table["n_slides"]) == [2, 1]
    assert table.loc["P2", "left_out"] == "slide_003"
    assert table.loc["P1", "slide_ids"] == "slide_001;slide_000"
    ensemble = Ensemble(load_run(pipe.run_dir), torch.device("cpu"))
    pooled = np.concatenate([read_bag(cache / f"slide_00{i}.h5")[0] for i in (1, 0)])
    probs, _ = ensemble(pooled)
    assert table.loc["P1", "prob"] == pytest.approx(float(probs[:, 1].mean()), abs=1e-6)
    assert table.loc["P1", "n_tiles"] == len(pooled)
    slides = pd.read_csv(out / "predictions.csv").set_index("slide_id")
    assert slides["patient_id"].to_dict() == {
        "slide_000": "P1", "slide_001": "P1", "slide_002": "P2", "slide_003": "P2"
    }  # fmt: skip
    assert table.loc["P2", "prob"] == pytest.approx(slides.loc["slide_002", "prob"], abs=1e-6)
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,label\nslide_000,x\n")
    with pytest.raises(UserError, match="bad.csv.*patient_id"):
        run_predict(predict_cfg(pipe, tmp_path / "p2", f"features_dir={cache}",
                                f"patients_csv={bad}"))  # fmt: skip
    bad.write_text("slide_id,patient_id\nslide_000,P1\nslide_001,P1\nslide_000,P2\n")
    with pytest.raises(UserError, match=r"bad.csv.*\['slide_000'\] more than once"):
        run_predict(predict_cfg(pipe, tmp_path / "p3", f"features_dir={cache}",
                                f"patients_csv={bad}"))  # fmt: skip
    assert not (tmp_path / "p3").exists()  # refused before any work


@pytest.mark.parametrize("labelled_first", [False, True])
def test_overwrite_keeps_the_evaluation_a_user_ran_into_the_output_folder(
    pipe: Pipeline, tmp_path: Path, labelled_first: bool
) -> None:
    """The external-validation recipe: predict, then `evaluate` into <output_dir>/evaluation.
    A later predict overwrite=true (no labels) keeps that evaluation, also when it replaced one
    predict's own report had written there."""
    out = tmp_path / "pred"
    labels = pipe.root / "cohort/labels.csv"
    keys = [f"features_dir={pipe.features}", "heatmaps=false",
            "slide_ids=[slide_000,slide_001,slide_002,slide_003,slide_004,slide_005]"]  # fmt: skip
    first = [f"labels_csv={labels}"] if labelled_first else []
    assert run_predict(predict_cfg(pipe, out, *keys, *first)) == 0
    evaluation = out / "evaluation"
    assert (evaluation / "evaluation.json").is_file() == labelled_first
    ecfg = load_config(EvaluateConfig, [], [
        f"predictions={out / 'predictions.csv'}", f"labels_csv={labels}", "bootstrap=100",
        f"output_dir={evaluation}", f"overwrite={str(labelled_first).lower()}"])  # fmt: skip
    assert run_evaluate(ecfg) == 0
    users = {p.name: p.read_bytes() for p in evaluation.iterdir()}
    assert {"evaluation.json", "roc.png", "report.html"} <= set(users)
    assert run_predict(predict_cfg(pipe, out, *keys, "overwrite=true")) == 0
    assert {p.name: p.read_bytes() for p in evaluation.iterdir()} == users
    assert not (out / "report.html").exists()  # predict's own report still goes


@pytest.fixture(scope="module")
def clam_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run `fit` trained on CLAM bags (h5_files/ with features + coords, pt_files/ alike)."""
    from melanoma_mil.config import FitConfig
    from melanoma_mil.data.synthetic import make_bag_cohort
    from melanoma_mil.training.cv import run_fit

    root = tmp_path_factory.mktemp("clam")
    feats, labels = make_bag_cohort(root / "src", n_patients=8, dim=16, n_instances=(2, 6))
    for sub in ("h5_files", "pt_files"):
        (root / "clam" / sub).mkdir(parents=True)
    for p in feats.glob("*.h5"):
        with h5py.File(p) as f, h5py.File(root / "clam" / "h5_files" / p.name, "w") as g:
            g["features"] = f["features"][:].astype("float32")
            g["coords"] = f["coords"][:]
            torch.save(
                torch.from_numpy(g["features"][:]), root / "clam" / "pt_files" / f"{p.stem}.pt"
            )
    keys = [f"data.features_dir={root / 'clam'}", f"data.labels_csv={labels}",
            f"output_dir={root / 'run'}", "cv.folds=2", "trainer.max_epochs=1",
            "trainer.accelerator=cpu", "logger=none"]  # fmt: skip
    assert run_fit(load_config(FitConfig, [], keys)) == 0
    return root


@pytest.mark.parametrize("bags", ["clam", "clam/h5_files", "clam/pt_files"])
def test_clam_bags_are_scored_as_fit_scored_them(clam_run: Path, bags: str, tmp_path: Path) -> None:
    keys = [f"run_dir={clam_run / 'run'}", f"output_dir={tmp_path / 'pred'}", "device=cpu",
            f"features_dir={clam_run / bags}", "heatmaps=false"]  # fmt: skip
    assert run_predict(load_config(PredictConfig, [], keys)) == 0
    pred = pd.read_csv(tmp_path / "pred" / "predictions.csv").set_index("slide_id")
    fit = pd.read_csv(clam_run / "run" / "predictions.csv")
    same = [pred.loc[r.slide_id, f"prob_fold_{r.fold}"] for r in fit.itertuples()]
    np.testing.assert_allclose(same, fit["prob"], atol=1e-4)


def test_heatmaps_from_clam_bags_are_refused_up_front(clam_run: Path, tmp_path: Path) -> None:
    keys = [f"run_dir={clam_run / 'run'}", f"output_dir={tmp_path / 'pred'}", "device=cpu",
            f"features_dir={clam_run / 'clam' / 'pt_files'}"]  # fmt: skip
    with pytest.raises(UserError, match="no tile geometry.*heatmaps=false") as e:
        run_predict(load_config(PredictConfig, [], keys))
    assert "delete" not in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "pred" / "predictions.csv").exists()


def test_threshold_decides_pred_everywhere(pipe: Pipeline, tmp_path: Path) -> None:
    """predict threshold=T: the pred column and attention.h5 predict the positive (last) class
    from probability T on, as its report does."""
    from melanoma_mil.inference.attention import read_attention

    classes = load_run(pipe.run_dir).classes
    keys = [f"features_dir={pipe.features}", "slide_ids=[slide_000,slide_001,slide_002]"]
    for threshold, expected in ((1e-9, classes[1]), (1 - 1e-9, classes[0])):
        out = tmp_path / f"t{threshold}"
        assert run_predict(predict_cfg(pipe, out, *keys, f"threshold={threshold}")) == 0
        table = pd.read_csv(out / "predictions.csv")
        assert (table["pred"] == expected).all() and (table["prob"] > 1e-9).all()
        maps = [read_attention(p) for p in sorted(out.rglob("attention.h5"))]
        assert len(maps) == 3 and {m.pred for m in maps} == {expected}
        assert all(m.threshold == threshold for m in maps)


def test_tilings_advice_in_a_slides_reason_says_how_predict_users_act_on_it(
    tmp_path: Path,
) -> None:
    """`tile` advises lowering tiling.tissue.* keys, which predict and heatmap do not take."""
    from melanoma_mil.inference.work import _reasons

    table = tmp_path / "tiling.csv"
    reason = "no tissue found (blank slide, or lower tiling.tissue.min_saturation)"
    pd.DataFrame(
        {"slide_id": ["blank", "tiny"], "status": ["empty", "empty"],
         "reason": [reason, "slide smaller than one tile (100 x 100 level-0 px)"]}
    ).to_csv(table, index=False)  # fmt: skip
    why = _reasons([table])
    assert why["blank"].startswith(f"empty: {reason}; predict and heatmap tile with the run's")
    assert "pass features_dir=" in why["blank"]
    assert why["tiny"] == "empty: slide smaller than one tile (100 x 100 level-0 px)"


def test_a_log_gets_no_progress_line_per_slide(
    pipe: Pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    """Off a terminal (a SLURM log) the bar redraws once per LOG_INTERVAL_S, not per slide."""
    from conftest import inference_cfg

    from melanoma_mil import progress

    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 1e6)  # no redraw falls due while it runs
    cfg = inference_cfg(PredictConfig, pipe, tmp_path / "p", f"features_dir={pipe.features}")
    assert run_predict(dataclasses.replace(cfg, heatmaps=False)) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("predict: ")]
    assert 1 <= len(lines) <= 2 and "12/12" in lines[-1], lines


@pytest.mark.parametrize("command", ["heatmap", "predict"])
def test_a_log_gets_the_bars_last_line_once(
    pipe: Pipeline, tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    """A last slide that ends as a redraw falls due (as slides over LOG_INTERVAL_S do) printed
    the 100% line, and closing the bar printed it again."""
    from melanoma_mil import progress
    from melanoma_mil.cli import main

    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)  # every redraw falls due
    argv = [command, f"run_dir={pipe.run_dir}", f"output_dir={tmp_path / 'o'}",
            f"slides_dir={pipe.slides}", f"features_dir={pipe.features}", "device=cpu",
            "slide_ids=[slide_000,slide_001]", "thumbnail_size=128", "top_k=2"]  # fmt: skip
    assert main(argv) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(f"{command}: ")]
    assert [ln.split("|")[0] for ln in lines] == [f"{command}:   0%", f"{command}:  50%",
                                                  f"{command}: 100%"], lines  # fmt: skip
