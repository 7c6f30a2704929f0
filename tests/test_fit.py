"""`fit`: learnability, patient-level splits, determinism, multi-class, patient bags, DDP."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import one_thread_env, one_torch_thread

from melanoma_mil.cli import main
from melanoma_mil.config import FitConfig, ModelConfig, OptimConfig, load_config
from melanoma_mil.data.synthetic import make_bag_cohort
from melanoma_mil.errors import UserError
from melanoma_mil.locks import try_lock
from melanoma_mil.rundir import DONE, FOLDS, SUMMARY, fold_lock, load_run
from melanoma_mil.training.cv import run_fit
from melanoma_mil.training.module import MILModule, seed_step


def fit_cfg(features: Path, labels: Path, out: Path, *extra: str) -> FitConfig:
    base = [
        f"data.features_dir={features}",
        f"data.labels_csv={labels}",
        f"output_dir={out}",
        "trainer.accelerator=cpu",
        "logger=none",
        "cv.folds=3",
        "optim.lr=1e-3",
    ]
    return load_config(FitConfig, [], [*base, *extra])


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Every test here trains tiny models, its module-scoped fits included (one_torch_thread)."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_bag_cohort(tmp_path_factory.mktemp("cohort"), n_patients=60, dim=64, shift=5.0)


@pytest.fixture(scope="module")
def learned_run(cohort: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    # seeds 0-5 (cohort, seed, cv.seed): pooled AUC >= 0.998, every fold 1.0; 3 epochs: 0.86
    assert run_fit(fit_cfg(*cohort, out, "trainer.max_epochs=10")) == 0
    return out


def test_planted_signal_is_learned(learned_run: Path) -> None:
    summary = json.loads((learned_run / "cv_summary.json").read_text())
    assert summary["pooled_auc"]["value"] >= 0.95
    assert summary["auc"]["mean"] >= 0.95
    assert summary["pooled_auc"]["ci_low"] <= summary["pooled_auc"]["value"] <= 1.0
    for metric in ("auc", "accuracy", "balanced_accuracy", "f1"):
        assert len(summary[metric]["per_fold"]) == 3
        assert set(summary[metric]) == {"mean", "std", "per_fold"}


def test_run_outputs_follow_the_contract(learned_run: Path) -> None:
    preds = pd.read_csv(learned_run / "predictions.csv")
    assert len(preds) == 60 and preds["slide_id"].is_unique
    assert {"slide_id", "patient_id", "fold", "label", "prob"} <= set(preds.columns)
    assert preds["prob"].between(0, 1).all()
    for name in ("config.yaml", "splits.json", "roc.png", "provenance.json"):
        assert (learned_run / name).is_file()
    run = load_run(learned_run)
    assert run.classes == ["immune_high", "immune_low"]
    assert len(run.fold_models()) == 3
    assert run.provenance["encoder"] == "synthetic"


def test_test_fold_is_never_used_for_model_selection(learned_run: Path) -> None:
    splits = json.loads((learned_run / "splits.json").read_text())["splits"]
    tested = []
    for s in splits:
        assert s["val"], "model selection needs a validation split inside the training fold"
        assert not set(s["test"]) & (set(s["train"]) | set(s["val"]))
        tested += s["test"]
    assert sorted(tested) == sorted(set(tested)) and len(tested) == 60


def test_rerun_refuses_other_settings_overwrite_starts_over(cohort, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run_fit(fit_cfg(*cohort, out, "trainer.max_epochs=1")) == 0
    before = json.loads((out / "splits.json").read_text())["sha256"]
    stamp = (out / "cv_summary.json").stat().st_mtime_ns
    assert run_fit(fit_cfg(*cohort, out, "trainer.max_epochs=1")) == 0  # same: nothing to do
    assert (out / "cv_summary.json").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match=r"trainer.max_epochs: 1 in the run, 2 now.*overwrite=true"):
        run_fit(fit_cfg(*cohort, out, "trainer.max_epochs=2"))
    cfg = fit_cfg(*cohort, out, "trainer.max_epochs=1", "overwrite=true", "cv.seed=99")
    assert run_fit(cfg) == 0
    summary = json.loads((out / "cv_summary.json").read_text())
    after = json.loads((out / "splits.json").read_text())["sha256"]
    assert summary["splits_sha256"] == after != before  # overwrite: new splits from cv.seed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no leftover beside it


def test_no_patient_in_two_splits_and_patient_bags(tmp_path: Path) -> None:
    features, labels = make_bag_cohort(tmp_path, n_patients=18, dim=32, slides_per_patient=2)
    out = tmp_path / "slide_level"
    assert run_fit(fit_cfg(features, labels, out, "trainer.max_epochs=2")) == 0
    patient = pd.read_csv(labels).set_index("slide_id")["patient_id"]
    for s in json.loads((out / "splits.json").read_text())["splits"]:
        parts = [{patient[b] for b in s[k]} for k in ("train", "val", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    out = tmp_path / "patient_level"
    assert (
        run_fit(fit_cfg(features, labels, out, "trainer.max_epochs=2", "data.bag_level=patient"))
        == 0
    )
    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == 18  # one bag per patient, made of both slides
    assert preds["slide_id"].str.count(";").eq(1).all()


@pytest.mark.parametrize("balance", ["none", "sampler"])
def test_same_seed_same_splits_and_predictions(cohort, balance: str, tmp_path: Path) -> None:
    runs = []
    keys = ("trainer.max_epochs=3", "data.max_instances=30", f"data.balance={balance}")
    for name in ("a", "b"):
        out = tmp_path / name
        assert run_fit(fit_cfg(*cohort, out, *keys, "seed=3", "cv.seed=3")) == 0
        runs.append(out)
    a, b = (json.loads((r / "splits.json").read_text()) for r in runs)
    assert a["sha256"] == b["sha256"]
    pa, pb = (pd.read_csv(r / "predictions.csv") for r in runs)
    pd.testing.assert_frame_equal(pa, pb)


def test_multiclass(tmp_path: Path) -> None:
    features, labels = make_bag_cohort(
        tmp_path, n_patients=36, dim=32, shift=5.0, classes=("low", "mid", "high")
    )
    out = tmp_path / "run"
    keys = ("trainer.max_epochs=5", "data.classes=[low,mid,high]")  # seeds 0-3: AUC >= 0.94
    assert run_fit(fit_cfg(features, labels, out, *keys)) == 0
    preds = pd.read_csv(out / "predictions.csv")
    assert {"prob_low", "prob_mid", "prob_high"} <= set(preds.columns)
    assert preds[["prob_low", "prob_mid", "prob_high"]].sum(1).round(4).eq(1).all()
    summary = json.loads((out / "cv_summary.json").read_text())
    assert summary["classes"] == ["low", "mid", "high"]
    assert summary["auc"]["mean"] > 0.6


def test_label_map_drops_and_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    features, labels = make_bag_cohort(
        tmp_path, n_patients=30, dim=16, shift=5.0, classes=("c1", "c2", "c3")
    )
    out = tmp_path / "run"
    cfg = fit_cfg(
        features,
        labels,
        out,
        "trainer.max_epochs=1",
        "data.label_map={c1: immune_low, c2: drop, c3: immune_high}",
    )
    with caplog.at_level("INFO"):
        assert run_fit(cfg) == 0
    assert "kept 20 slides" in caplog.text and "dropped 10" in caplog.text
    # each fold says where and at which precision it trained (precision auto on CPU: fp32)
    assert caplog.text.count("trained on cpu, precision 32-true") == 3  # 3 folds
    assert set(pd.read_csv(out / "predictions.csv")["label"]) == {"immune_low", "immune_high"}


def test_a_fold_in_a_log_says_which_epoch_it_is_at(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off a terminal (a SLURM log) Lightning's bar is off; each fold still writes epoch lines,
    at least its last, and they leave no state in the checkpoint."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file, not a terminal
    features, labels = make_bag_cohort(tmp_path, n_patients=12, dim=8)
    out = tmp_path / "run"
    with caplog.at_level("INFO"):
        assert run_fit(fit_cfg(features, labels, out, "trainer.max_epochs=3")) == 0
    for fold in range(3):
        assert f"fold_{fold}: epoch 3/3 (" in caplog.text
    ckpt = torch.load(out / FOLDS / "fold_0" / "best.ckpt", weights_only=False)
    assert not any("EpochLines" in key for key in ckpt.get("callbacks", {}))


def test_ddp_counts_every_test_bag_once_and_equals_one_process(tmp_path: Path) -> None:
    """23 bags over 3 folds: uneven test sets that DistributedSampler pads on 2 ranks, and
    odd training folds. 2 ranks x 1 bag per step train exactly as 1 process x 2 bags, with
    the bags subsampled (data.max_instances) alike."""
    features, labels = make_bag_cohort(tmp_path, n_patients=23, dim=16, shift=5.0)
    out = tmp_path / "ddp"
    args = [
        "fit",
        f"data.features_dir={features}",
        f"data.labels_csv={labels}",
        f"output_dir={out}",
        "cv.folds=3",
        "trainer.max_epochs=2",
        "trainer.accelerator=cpu",
        "trainer.accumulate_grad_batches=2",
        "data.max_instances=8",
        "logger=none",
    ]
    ddp = [*args, "trainer.devices=2", "trainer.strategy=ddp"]
    cmd = [sys.executable, "-m", "melanoma_mil", *ddp]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=one_thread_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0 alone logs each fold, naming the ranks
    assert (proc.stdout + proc.stderr).count("trained on cpu (rank 0 of 2), precision") == 3
    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == 23 and preds["slide_id"].is_unique
    assert sorted(preds.groupby("fold").size()) == [7, 8, 8]
    one = tmp_path / "one"
    assert main([*(a.replace(str(out), str(one)) for a in args)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(one / "predictions.csv"), preds, check_exact=True)


def test_a_steps_draws_depend_on_its_seed_only() -> None:
    """What the DDP test relies on, without torch.manual_seed's ~2 ms of lazy-backend seeding."""
    cpu = torch.device("cpu")
    seed_step(cpu, 7)
    first = torch.rand(5)
    torch.rand(100)  # the history before a step must not matter
    seed_step(cpu, 7)
    assert torch.equal(torch.rand(5), first)
    seed_step(cpu, 8)
    assert not torch.equal(torch.rand(5), first)


def test_devices_that_would_change_the_bags_per_step_are_refused(tmp_path: Path) -> None:
    features, labels = make_bag_cohort(tmp_path, n_patients=6, dim=4)
    for extra in (
        ["trainer.devices=2"],
        ["trainer.num_nodes=2", "trainer.accumulate_grad_batches=3"],
    ):
        with pytest.raises(UserError, match="multiple of 2.*cv.run_folds"):
            run_fit(fit_cfg(features, labels, tmp_path / "run", *extra))
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_accelerator_this_machine_lacks_is_refused_before_the_run_folder(
    tmp_path: Path,
) -> None:
    features, labels = make_bag_cohort(tmp_path, n_patients=6, dim=4)
    with pytest.raises(UserError, match="trainer.accelerator=cuda: this machine has no"):
        run_fit(fit_cfg(features, labels, tmp_path / "run", "trainer.accelerator=cuda"))
    assert not (tmp_path / "run").exists()


def _torchrun_nodes(fit_args: list[str]) -> list[str]:
    """`fit` on two single-process "nodes" that torchrun starts on this host (gloo); the ranks'
    stderr, once both exit 0 (or the test fails, killing them, after 4 minutes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"]
    rendezvous = ["--master-addr=127.0.0.1", f"--master-port={port}"]
    nodes = [
        subprocess.Popen(
            [*launcher, f"--node-rank={n}", *rendezvous, "-m", "melanoma_mil", "fit", *fit_args],
            env=one_thread_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (0, 1)
    ]
    try:
        errs = [node.communicate(timeout=240)[1] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, err in zip(nodes, errs, strict=True):
        assert node.returncode == 0, err[-3000:]
    return errs


def test_rank_0_of_lightnings_launcher_never_waits_for_a_plan() -> None:
    """Lightning's launcher sets LOCAL_RANK in its rank 0 once it has launched replicas; a later
    fit in that process (a sweep's next run) must not take itself for a torchrun rank and wait
    for others in a broadcast (it hung)."""
    code = (
        "import os; from melanoma_mil.training.ranks import external_ranks; "
        "from melanoma_mil.config import FitConfig; import torch.distributed as dist; "
        "cfg = FitConfig(); cfg.trainer.strategy, cfg.trainer.devices = 'ddp', 2; "
        "cfg.trainer.accelerator = 'cpu'; os.environ['LOCAL_RANK'] = '0'; "
        "print(external_ranks(cfg), dist.is_initialized())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False"]


def _done(run: Path) -> list[str]:
    return sorted(p.parent.name for p in (run / FOLDS).glob(f"*/{DONE}"))


def test_two_nodes_under_torchrun_train_rank_0s_folds(tmp_path: Path) -> None:
    """trainer.num_nodes=2 with ranks started by torchrun: rank 0 alone plans, and every rank
    trains its folds. A fold another process is training (its lock held here) is left to it by
    both ranks (rank 1, planning alone, would train it without rank 0 and fail); then a resume
    finishes the run, written by rank 0 alone."""
    features, labels = make_bag_cohort(tmp_path, n_patients=12, dim=8, shift=5.0)
    out = tmp_path / "run"
    fit_args = [
        f"data.features_dir={features}",
        f"data.labels_csv={labels}",
        f"output_dir={out}",
        "cv.folds=2",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "trainer.strategy=ddp",
        "trainer.num_nodes=2",
        "trainer.accumulate_grad_batches=2",
        "logger=none",
    ]
    _torchrun_nodes([*fit_args, "cv.run_folds=[1]"])
    assert _done(out) == ["fold_1"]
    lock = try_lock(fold_lock(out, "fold_0"))
    assert lock is not None
    try:
        errs = _torchrun_nodes(fit_args)
    finally:
        lock.release()
    assert "fold_0: being trained by another process" in errs[0]
    assert _done(out) == ["fold_1"] and not (out / SUMMARY).exists()
    _torchrun_nodes(fit_args)
    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == 12 and preds["slide_id"].is_unique
    assert load_run(out).fold_names() == ["fold_0", "fold_1"]


@pytest.mark.parametrize("name", ["gated_attention", "clam_sb", "dsmil"])
def test_balance_loss_weighs_each_bag_by_its_class(name: str) -> None:
    """One bag per step: the class weight must scale that bag's whole loss (an instance loss
    too), not cancel out."""
    torch.manual_seed(0)
    model = ModelConfig(name=name)
    plain = MILModule.create(8, 2, model, OptimConfig(), None, 1)
    weighted = MILModule.create(8, 2, model, OptimConfig(), [0.75, 1.5], 1)
    out = plain.model.train()(torch.randn(20, 8), torch.tensor([1]))
    assert (out.instance_loss is not None) == (name != "gated_attention")
    for label, weight in ((0, 0.75), (1, 1.5)):
        y = torch.tensor([label])
        assert float(weighted._loss(out, y)) == pytest.approx(weight * float(plain._loss(out, y)))
