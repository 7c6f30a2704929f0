"""Every model through the real pipeline: `fit` on the session's slide features, then `predict`
with heatmaps on a slide (attention.h5, heatmap.png, predictions.csv); DDP with tiny bags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import Pipeline, one_thread_env
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from melanoma_mil.config import (
    MODEL_NAMES,
    FitConfig,
    ModelConfig,
    OptimConfig,
    PredictConfig,
    load_config,
)
from melanoma_mil.data.synthetic import make_bag_cohort
from melanoma_mil.inference.predict import run_predict
from melanoma_mil.training.cv import run_fit
from melanoma_mil.training.module import MILModule

SLIDE = "slide_000"


# gated_attention is the session pipeline's own model (tests/test_heatmap.py, test_predict.py);
# here only as an ensemble, with clam_mb's instance losses in an ensemble too
CASES = [(n, 1) for n in MODEL_NAMES if n != "gated_attention"]


@pytest.mark.parametrize(("name", "members"), [*CASES, ("gated_attention", 2), ("clam_mb", 2)])
def test_model_fits_predicts_and_draws_a_heatmap(
    name: str, members: int, pipe: Pipeline, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    fit = load_config(
        FitConfig,
        [],
        [
            f"data.features_dir={pipe.features}",
            f"data.labels_csv={pipe.root / 'cohort/labels.csv'}",
            f"output_dir={run}",
            "cv.folds=2",
            "trainer.max_epochs=1",
            "logger=none",
            "trainer.accelerator=cpu",
            f"model.name={name}",
            "model.hidden_dim=64",
            f"model.members={members}",
        ],
    )
    assert run_fit(fit) == 0
    out = tmp_path / "pred"
    keys = [
        f"run_dir={run}",
        f"slides_dir={pipe.slides}",
        f"features_dir={pipe.features}",
        f"output_dir={out}",
        f"slide_ids=[{SLIDE}]",
        "device=cpu",
        "thumbnail_size=256",
        "top_k=2",
    ]
    assert run_predict(load_config(PredictConfig, [], keys)) == 0
    table = pd.read_csv(out / "predictions.csv").set_index("slide_id")
    assert table.loc[SLIDE, "status"] == "ok" and 0 <= table.loc[SLIDE, "prob"] <= 1
    assert (out / SLIDE / "heatmap.png").stat().st_size > 0
    with h5py.File(out / SLIDE / "attention.h5", "r") as f:
        folds = f["attention_folds"][:]
        assert folds.shape[1] == 2 and (folds >= 0).all()
        np.testing.assert_allclose(folds.sum(0), 1.0, atol=1e-5)
        assert f.attrs["prob"] == pytest.approx(table.loc[SLIDE, "prob"], abs=1e-6)


@pytest.mark.slow  # two gloo processes in a subprocess: ~20 s
def test_ddp_trains_clam_mb_on_bags_too_small_for_its_instance_loss(tmp_path: Path) -> None:
    """DDP fails when a parameter gets no gradient in a step; 1-tile bags leave CLAM's instance
    classifiers without top/bottom-k tiles, so the model must still touch them."""
    features, labels = make_bag_cohort(tmp_path, n_patients=16, dim=8, n_instances=(1, 3))
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "melanoma_mil",
        "fit",
        f"data.features_dir={features}",
        f"data.labels_csv={labels}",
        f"output_dir={out}",
        "cv.folds=2",
        "trainer.max_epochs=2",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.accumulate_grad_batches=2",
        "logger=none",
        "model.name=clam_mb",
        "model.hidden_dim=16",
        "model.attention_dim=8",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=one_thread_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(pd.read_csv(out / "predictions.csv")) == 16


@pytest.mark.parametrize(
    ("names", "order", "warns"),
    [
        (("immune_low", "immune_high"), None, True),
        (("immune_low", "immune_high"), "[immune_low,immune_high]", False),
        (("0", "1"), None, False),  # numeric labels: the conventional positive 1 is last
    ],
)
def test_topk_names_the_class_order_it_ranks_tiles_by_when_order_is_alphabetical(
    names: tuple[str, str],
    order: str | None,
    warns: bool,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """immune_high bags hold the planted tiles, but alphabetically immune_low is the last class,
    whose P(tile) topk ranks by: the user is told how to put the deciding class last."""
    feats, labels = make_bag_cohort(
        tmp_path / "c", n_patients=8, dim=16, n_instances=(2, 4), classes=names
    )
    keys = [
        f"data.features_dir={feats}", f"data.labels_csv={labels}", f"output_dir={tmp_path / 'r'}",
        "cv.folds=2", "trainer.max_epochs=1", "logger=none", "trainer.accelerator=cpu",
        "model.name=topk", "model.hidden_dim=16", *([f"data.classes={order}"] if order else []),
    ]  # fmt: skip
    with caplog.at_level("WARNING", logger="melanoma_mil"):
        assert run_fit(load_config(FitConfig, [], keys)) == 0
    assert ("model.name=topk ranks each bag's tiles" in caplog.text) == warns


def test_topk_learns_planted_tiles_through_fit_where_its_warm_up_is_needed(
    tmp_path: Path, one_thread: None
) -> None:
    """On this cohort, topk without its warm-up (model.topk_warmup=0) scored a pooled AUC of
    0.747 (one fold 0.42: the planted tiles never ranked on top); with it, 0.994."""
    feats, labels = make_bag_cohort(tmp_path / "c", n_patients=60, dim=32, shift=4.0, seed=5)
    keys = [
        f"data.features_dir={feats}", f"data.labels_csv={labels}", f"output_dir={tmp_path / 'r'}",
        "cv.folds=3", "trainer.max_epochs=30", "logger=none", "trainer.accelerator=cpu",
        "model.name=topk", "model.members=1", "data.classes=[immune_low,immune_high]",
    ]  # fmt: skip
    assert run_fit(load_config(FitConfig, [], keys)) == 0
    table = pd.read_csv(tmp_path / "r" / "predictions.csv")
    assert roc_auc_score(table["y"], table["prob"]) >= 0.95


class _Warming(L.Callback):
    """Records, at each training step, whether the topk model is in its warm-up."""

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.seen.append(module.model.warming)


@pytest.mark.parametrize(("epochs", "warm"), [(30, 3), (9, 0)])
def test_training_warms_topk_up_in_its_first_tenth_of_epochs(epochs: int, warm: int) -> None:
    """The LightningModule tells the model each epoch's number: floor(0.1 x epochs) warm-up
    epochs, then top tiles only (a run under 10 epochs has none, so it trains on top tiles)."""
    torch.manual_seed(0)
    module = MILModule.create(8, 2, ModelConfig(name="topk"), OptimConfig(), None, epochs)
    bag = ([torch.randn(5, 8)], torch.tensor([1]), torch.tensor([0]))
    spy = _Warming()
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[spy],
    )  # fmt: skip
    trainer.fit(module, DataLoader([0], batch_size=None, collate_fn=lambda _: bag))
    assert spy.seen == [True] * warm + [False] * (epochs - warm)
