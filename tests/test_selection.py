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
from melanoma_mil.errors import UserError
from melanoma_mil.models.ensemble import Ensemble
from melanoma_mil.rundir import load_fold_model
from melanoma_mil.training.cv import run_fit
from melanoma_mil.training.selection import (
    FoldSelection,
    fold_epochs,
    fold_members,
    fold_selection,
    plan_selection,
    resolve_selection,
    run_selection,
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
    assert resolve_selection(cfg, [small], labels) == "last"
    large, labels = _split(50)
    assert resolve_selection(cfg, [large], labels) == "early_stopping"
    cfg.trainer.selection = "early_stopping"
    assert resolve_selection(cfg, [small], labels) == "early_stopping"
    run = run_selection(FitConfig(), [small], labels, ["a", "b"])
    sel = plan_selection(run, FitConfig(), small)  # last: validation bags train too
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
    n_train = len(s["train"]) + len(s["val"])  # the log counts what the fold trains on
    assert f"{n_train} training bags" in caplog.text and "validation bags" not in caplog.text
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
    assert f"by early stopping on {len(s['val'])} validation bags" in caplog.text
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
        (("trainer.accumulate_grad_batches=4",), "last", 493, 82, 41, 3),  # 123 steps an epoch
        (("trainer.accumulate_grad_batches=5",), "last", 12, 5000, 2500, 3),  # 2 (2 bags left)
        (("trainer.accumulate_grad_batches=5", "data.balance=sampler"), "last", 12, 3334, 1667, 3),
        (("trainer.accumulate_grad_batches=5",), "last", 3, 10000, 5000, 3),  # 1 partial step
        (("trainer.max_epochs=3",), "last", 92, 3, 2, 1),  # a number is taken as given
        (("trainer.average_fraction=0",), "last", 493, 50, 1, 1),
        (("model.members=2",), "last", 493, 50, 25, 2),  # and so is a number of members
        (("model.members=1",), "last", 92, 109, 55, 1),
        (("model.name=topk", "trainer.average_fraction=1"), "last", 493, 50, 45, 1),  # warm-up
        (
            ("model.name=topk", "trainer.average_fraction=1", "model.topk_warmup=0"),
            "last",
            493,
            50,
            50,
            1,
        ),
    ],
)
def test_small_folds_train_longer_and_as_an_ensemble_only_when_left_unset(
    keys: tuple[str, ...], mode: str, n_train: int, epochs: int, averaged: int, members: int
) -> None:
    cfg = load_config(FitConfig, [], list(keys))
    n = fold_epochs(cfg, mode, n_train)
    sel = FoldSelection(mode, [f"b{i}" for i in range(n_train)], [], n, fold_members(cfg, n))
    assert (sel.epochs, sel.averaged(cfg), sel.members) == (epochs, averaged, members)


@pytest.mark.parametrize(
    ("keys", "min_epochs", "first_averaged"),
    [
        (("model.name=topk", "trainer.max_epochs=200"), 30, 20),  # 20 warm-up + patience 10
        (("model.name=topk", "trainer.max_epochs=20"), 12, 2),  # 2 + 10
        (("model.name=topk", "trainer.max_epochs=200", "model.topk_warmup=0"), 5, 0),
        (("trainer.max_epochs=200",), 5, 0),  # no warm-up: trainer.min_epochs as set
    ],
)
def test_no_warm_up_epoch_is_averaged_and_early_stopping_waits_past_it(
    keys: tuple[str, ...], min_epochs: int, first_averaged: int, tmp_path: Path
) -> None:
    """topk's warm-up epochs train another pooling than the one tested: selection=last never
    averages their weights, and early stopping gives the top-tile training trainer.patience
    epochs before it may stop."""
    cfg = load_config(FitConfig, [], [*keys, "trainer.average_fraction=1"])
    stopping = FoldSelection("early_stopping", ["b0"], ["b1"], cfg.trainer.max_epochs, 1)
    assert stopping.callbacks(cfg, tmp_path)[2]["min_epochs"] == min_epochs
    last = FoldSelection("last", ["b0"], [], cfg.trainer.max_epochs, 1)
    average = next(c for c in last.callbacks(cfg, tmp_path)[1] if hasattr(c, "first"))
    assert average.first == first_averaged


def _folds(sizes: list[tuple[int, int]]) -> tuple[list[Split], dict[str, int]]:
    """Splits with (training bags, validation bags per class) each; 2 classes, alternating."""
    labels = {f"b{i}": i % 2 for i in range(1000)}
    ids = list(labels)
    splits = []
    for fold, (n_train, n_val) in enumerate(sizes):
        val = ids[: 2 * n_val]
        splits.append(Split(0, fold, ids[2 * n_val : 2 * n_val + n_train], val, ids[-10:]))
    return splits, labels


def _chosen(keys: list[str], sizes: list[tuple[int, int]]) -> list[tuple[str, int, int]]:
    """(mode, epochs, members) of each fold."""
    cfg = load_config(FitConfig, [], keys)
    splits, labels = _folds(sizes)
    run = run_selection(cfg, splits, labels, ["a", "b"])
    return [(s.mode, s.epochs, s.members) for s in (fold_selection(run, cfg, x) for x in splits)]


def test_folds_straddling_the_thresholds_share_one_mode_and_ensemble_size() -> None:
    """199/200/201 bags trained (train + val under selection=last): 51, 50 and 50 epochs
    each; alone the larger two would be single models. All three are 3-member ensembles, and
    each still makes at least 10,000 optimizer steps."""
    chosen = _chosen([], [(197, 1), (198, 1), (199, 1)])
    assert chosen == [("last", 51, 3), ("last", 50, 3), ("last", 50, 3)]
    # validation splits of 49 and 50 bags per class: no fold stops early
    chosen = _chosen([], [(600, 50), (600, 49), (600, 50)])
    assert [c[0] for c in chosen] == ["last"] * 3
    # folds all on one side decide as before (each fold alone)
    assert _chosen([], [(600, 50), (600, 51)]) == [("early_stopping", 50, 1)] * 2
    assert _chosen([], [(400, 5), (410, 5)]) == [("last", 50, 1)] * 2
    assert _chosen([], [(80, 1), (90, 1)]) == [("last", 122, 3), ("last", 109, 3)]
    assert _chosen(["trainer.max_epochs=50"], [(80, 1), (300, 1)]) == [("last", 50, 1)] * 2
    assert _chosen(["model.members=2"], [(80, 1), (300, 1)]) == [
        ("last", 122, 2),
        ("last", 50, 2),
    ]


def test_val_auc_early_stopping_on_a_validation_split_lacking_a_class_is_refused() -> None:
    splits, labels = _folds([(40, 3), (40, 3)])
    splits[1].val[:] = [b for b in splits[1].val if labels[b] == 0]  # fold_1: no class-1 bag
    keys = ["trainer.selection=early_stopping", "trainer.monitor=val_auc"]
    with pytest.raises(UserError, match=r"^fold_1: .*no 'b' bag.*trainer.selection=last"):
        run_selection(load_config(FitConfig, [], keys), splits, labels, ["a", "b"])
    for ok in (keys[:1], ["trainer.monitor=val_auc"]):  # val_loss is defined; auto picks last
        assert run_selection(load_config(FitConfig, [], ok), splits, labels, ["a", "b"])


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


def _splits_file(path: Path, val0: list[str]) -> Path:
    """Two folds of the 24-patient cohort: fold 0 validates on ``val0``, fold 1 on 3 bags per
    class."""
    ids = [f"P{p:04d}" for p in range(24)]
    first, second = ids[:12], ids[12:]
    folds = [
        (second, first, val0),
        (first, second, ids[:6]),
    ]
    splits = [
        {"repeat": 0, "fold": k, "train": [b for b in rest if b not in val], "val": val,
         "test": test}
        for k, (rest, test, val) in enumerate(folds)
    ]  # fmt: skip
    path.write_text(json.dumps({"splits": splits}))
    return path


def test_fold_processes_choose_the_mode_over_every_fold(
    cohort: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """min_val_bags=2: fold 1 alone (3 validation bags per class) would stop early, fold 0 (1
    per class) would not. A process training only fold 1, and the resume that trains fold 0,
    both train every fold on train + val."""
    splits = _splits_file(tmp_path / "splits.json", ["P0012", "P0013"])
    keys = (f"cv.splits_file={splits}", "trainer.min_val_bags=2", "trainer.max_epochs=2")
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="melanoma_mil"):
        assert run_fit(_fit(*cohort, out, *keys, "cv.run_folds=[1]")) == 0
        assert "repeat 0 fold 1: model selection none" in caplog.text
        assert run_fit(_fit(*cohort, out, *keys)) == 0
    assert "repeat 0 fold 0: model selection none" in caplog.text
    assert "by early stopping" not in caplog.text
    assert (out / "cv_summary.json").is_file()


def test_val_auc_on_a_validation_split_without_a_class_fails_before_training(
    cohort: tuple[Path, Path], tmp_path: Path
) -> None:
    splits = _splits_file(tmp_path / "splits.json", ["P0012"])  # fold 0: one class only
    out = tmp_path / "run"
    keys = [f"cv.splits_file={splits}", "trainer.selection=early_stopping"]
    cfg = _fit(*cohort, out, *keys, "trainer.monitor=val_auc")
    with pytest.raises(UserError, match="^fold_0: its validation split has no 'immune_high'"):
        run_fit(cfg)
    assert not (out / "folds").exists()
    assert run_fit(_fit(*cohort, out, *keys, "trainer.max_epochs=1")) == 0  # val_loss is defined
