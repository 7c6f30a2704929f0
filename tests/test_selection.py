"""Model selection inside a training fold: early stopping, or the last epoch on train + val."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from melanoma_mil.config import FitConfig, load_config
from melanoma_mil.data.splits import Split
from melanoma_mil.data.synthetic import make_bag_cohort
from melanoma_mil.models.ensemble import Ensemble
from melanoma_mil.rundir import load_fold_model
from melanoma_mil.training.cv import run_fit
from melanoma_mil.training.selection import (
    FoldSelection,
    fold_epochs,
    fold_members,
    most_members,
    plan_selection,
    resolve_selection,
)


def _split(n_val_per_class: int) -> tuple[Split, dict[str, int]]:
    val = [f"v{c}_{i}" for c in (0, 1) for i in range(n_val_per_class)]
    train = [f"t{c}_{i}" for c in (0, 1) for i in range(30)]
    labels = {b: int(b[1]) for b in train + val + ["x0_0", "x1_0"]}
    return Split(0, 0, train, val, ["x0_0", "x1_0"]), labels


def test_auto_stops_early_only_when_every_class_has_enough_validation_bags() -> None:
    cfg = FitConfig()
    assert cfg.trainer.selection == "auto" and cfg.trainer.min_val_bags == 50
    small, labels = _split(49)
    assert resolve_selection(cfg, small, labels) == "last"
    large, labels = _split(50)
    assert resolve_selection(cfg, large, labels) == "early_stopping"
    cfg.trainer.selection = "early_stopping"
    assert resolve_selection(cfg, small, labels) == "early_stopping"
    sel = plan_selection(FitConfig(), small, labels)  # last: validation bags train too
    assert sel.mode == "last" and sel.val == [] and set(sel.train) == set(small.train + small.val)
    assert not set(sel.train) & set(small.test)


def _fit(features: Path, labels: Path, out: Path, *extra: str) -> FitConfig:
    keys = [
        f"data.features_dir={features}",
        f"data.labels_csv={labels}",
        f"output_dir={out}",
        "trainer.accelerator=cpu",
        "logger=none",
        "cv.folds=2",
        "model.hidden_dim=32",
        "model.attention_dim=16",
    ]
    return load_config(FitConfig, [], [*keys, *extra])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_bag_cohort(tmp_path_factory.mktemp("sel"), n_patients=24, dim=8, shift=4.0)


def test_last_trains_on_train_plus_val_and_tests_the_last_epoch(
    cohort: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "last"
    with caplog.at_level(logging.INFO, logger="melanoma_mil"):
        # auto -> last; without weight averaging the last epoch is tested
        cfg = _fit(*cohort, out, "trainer.max_epochs=3", "trainer.average_fraction=0")
        assert run_fit(cfg) == 0
    assert "last of 3 epochs, no model selection" in caplog.text
    splits = json.loads((out / "splits.json").read_text())["splits"]
    assert all(s["val"] for s in splits)  # splits.json keeps the validation split (paired runs)
    s = splits[0]
    ckpt = torch.load(out / "folds/fold_0/best.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 2  # the last of 3 epochs
    # the standardisation statistics come from train + val: they trained together
    bags = [h5py.File(cohort[0] / f"{b}.h5", "r")["features"][:] for b in s["train"] + s["val"]]
    mean = np.concatenate(bags).astype(np.float64).mean(0)
    saved = torch.load(out / "folds/fold_0/model.pt", weights_only=True)["state_dict"]
    np.testing.assert_allclose(saved["embed.0.mean"].numpy(), mean, rtol=1e-4, atol=1e-4)


def test_early_stopping_selects_on_the_validation_split(
    cohort: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "es"
    cfg = _fit(*cohort, out, "trainer.selection=early_stopping", "trainer.max_epochs=3")
    with caplog.at_level(logging.INFO, logger="melanoma_mil"):
        assert run_fit(cfg) == 0
    assert "selected by best val_loss=" in caplog.text and "=nan" not in caplog.text
    s = json.loads((out / "splits.json").read_text())["splits"][0]
    bags = [h5py.File(cohort[0] / f"{b}.h5", "r")["features"][:] for b in s["train"]]
    saved = torch.load(out / "folds/fold_0/model.pt", weights_only=True)["state_dict"]
    mean = np.concatenate(bags).astype(np.float64).mean(0)
    np.testing.assert_allclose(saved["embed.0.mean"].numpy(), mean, rtol=1e-4, atol=1e-4)


def test_average_fraction_tests_the_mean_of_the_last_epochs_weights(
    cohort: tuple[Path, Path], tmp_path: Path
) -> None:
    """With a constant learning rate, a 3-epoch run's weights are a 4-epoch run's after its
    third epoch (the bag order depends on (seed, epoch) only), so averaging the last 2 epochs of
    the 4-epoch run must give the mean of the two plain runs' weights, and test with them."""
    keys = ("trainer.selection=last", "optim.scheduler=none", "model.dropout=0")
    weights, preds = {}, {}
    runs = {
        "e3": ("trainer.max_epochs=3", "trainer.average_fraction=0"),
        "e4": ("trainer.max_epochs=4", "trainer.average_fraction=0"),
        "avg": ("trainer.max_epochs=4", "trainer.average_fraction=0.5"),
    }
    for name, extra in runs.items():
        out = tmp_path / name
        assert run_fit(_fit(*cohort, out, *keys, *extra)) == 0
        weights[name] = torch.load(out / "folds/fold_0/model.pt", weights_only=True)["state_dict"]
        preds[name] = pd.read_csv(out / "predictions.csv").sort_values("slide_id")["prob"]
    for k, v in weights["avg"].items():
        if v.is_floating_point():
            mean = (weights["e3"][k] + weights["e4"][k]) / 2
            torch.testing.assert_close(v, mean, rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(weights["e3"]["classifier.weight"], weights["e4"]["classifier.weight"])
    assert not np.allclose(preds["avg"].to_numpy(), preds["e4"].to_numpy())  # tested averaged


@pytest.mark.parametrize(
    ("keys", "mode", "n_train", "epochs", "averaged", "members"),
    [
        ((), "last", 92, 109, 55, 3),  # MUSK2's fold: 50 epochs would be 4,600 steps
        ((), "last", 493, 50, 25, 1),  # enough steps at 50 epochs
        ((), "early_stopping", 92, 50, 25, 1),  # early stopping ends runs; 50 is only its cap
        (("trainer.accumulate_grad_batches=4",), "last", 493, 81, 41, 3),  # 124 steps an epoch
        (("trainer.max_epochs=3",), "last", 92, 3, 2, 1),  # a number is taken as given
        (("trainer.average_fraction=0",), "last", 493, 50, 1, 1),
        (("model.members=2",), "last", 493, 50, 25, 2),  # and so is a number of members
        (("model.members=1",), "last", 92, 109, 55, 1),
    ],
)
def test_small_folds_train_longer_and_as_an_ensemble_only_when_left_unset(
    keys: tuple[str, ...], mode: str, n_train: int, epochs: int, averaged: int, members: int
) -> None:
    cfg = load_config(FitConfig, [], list(keys))
    n = fold_epochs(cfg, mode, n_train)
    sel = FoldSelection(mode, [f"b{i}" for i in range(n_train)], [], n, fold_members(cfg, n))
    assert (sel.epochs, sel.averaged(cfg), sel.members) == (epochs, averaged, members)


def test_the_memory_check_counts_the_most_members_any_fold_trains() -> None:
    labels = {f"b{i}": i % 2 for i in range(600)}
    ids = list(labels)
    small = Split(0, 0, ids[:90], ids[90:100], ids[100:110])  # 100 bags: epochs raised
    large = Split(0, 1, ids[:450], ids[450:550], ids[550:])  # 550: 50 epochs, 100 val bags
    cfg = load_config(FitConfig, [], [])
    assert most_members(cfg, [large], labels) == 1
    assert most_members(cfg, [large, small], labels) == 3
    assert most_members(load_config(FitConfig, [], ["trainer.max_epochs=50"]), [small], labels) == 1


def test_ensemble_members_train_as_they_would_alone_and_predict_their_mean_probability(
    cohort: tuple[Path, Path], tmp_path: Path
) -> None:
    """Member 0 is built first from the fold's seed, and the bag order depends on (seed, epoch)
    only, so without dropout it must end with the weights of a run without members: each
    member's loss (summed, not averaged) trains it alone. The tested prediction is the mean of
    the members' probabilities."""
    keys = ("trainer.max_epochs=3", "trainer.average_fraction=0", "model.dropout=0")
    assert run_fit(_fit(*cohort, tmp_path / "one", *keys)) == 0
    assert run_fit(_fit(*cohort, tmp_path / "two", *keys, "model.members=2")) == 0
    one = load_fold_model(tmp_path / "one/folds/fold_0/model.pt")
    two = load_fold_model(tmp_path / "two/folds/fold_0/model.pt")
    assert isinstance(two, Ensemble) and len(two.members) == 2
    member = two.members[0].state_dict()
    for k, v in one.state_dict().items():
        torch.testing.assert_close(member[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(two.members[0].classifier.weight, two.members[1].classifier.weight)
    preds = pd.read_csv(tmp_path / "two/predictions.csv").set_index("slide_id")
    with h5py.File(next(cohort[0].glob("*.h5")), "r") as f:
        bag = torch.from_numpy(f["features"][:]).float()
        slide = Path(f.filename).stem
    fold = int(preds.loc[slide, "fold"])  # the fold whose test split holds this bag
    model = load_fold_model(tmp_path / f"two/folds/fold_{fold}/model.pt")
    assert isinstance(model, Ensemble)
    with torch.no_grad():
        out = model(bag)
        member_probs = [float(torch.softmax(m(bag).logits, -1)[1]) for m in model.members]
    assert float(torch.softmax(out.logits, -1)[1]) == pytest.approx(np.mean(member_probs), abs=1e-6)
    assert preds.loc[slide, "prob"] == pytest.approx(np.mean(member_probs), abs=1e-5)
    assert float(out.attention.sum()) == pytest.approx(1.0, abs=1e-5)
