"""W&B logging with real offline runs: one run per fold + a summary run, read back from disk."""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import wandb
from PIL import Image
from wandb.proto import wandb_internal_pb2 as pb

from melanoma_mil.cli import main
from melanoma_mil.config import FitConfig, load_config
from melanoma_mil.data.synthetic import make_bag_cohort
from melanoma_mil.errors import UserError
from melanoma_mil.tracking import loggers
from melanoma_mil.training.cv import run_fit


@dataclass
class OfflineRun:
    run: Any = None  # the RunRecord: id, project, group, job_type, config, sweep_id
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None  # None: the run was never finished

    @property
    def config(self) -> dict[str, Any]:
        return {c.key: json.loads(c.value_json) for c in self.run.config.update}


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(path: Path) -> OfflineRun:
    """Parse a `run-<id>.wandb` file: a leveldb-style log (32 KiB blocks) of Record protobufs."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    out, pos, buf = OfflineRun(), 7, b""
    while pos + 7 <= len(data):
        if (left := 32768 - pos % 32768) < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST chunk of a record
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            kind_name = rec.WhichOneof("record_type")
            if kind_name == "run":
                out.run = rec.run
            elif kind_name == "history":
                out.history.append({_key(i): json.loads(i.value_json) for i in rec.history.item})
            elif kind_name == "summary":
                out.summary.update({_key(i): json.loads(i.value_json) for i in rec.summary.update})
            elif kind_name == "exit":
                out.exit_code = rec.exit.exit_code
    return out


def offline_runs(run_dir: Path) -> dict[str, OfflineRun]:
    """job_type -> run, for every offline run under <run_dir>/wandb."""
    wandb.teardown()  # waits for W&B's writer process to close every run file
    runs = [read_offline_run(p) for p in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))]
    return {r.run.job_type: r for r in runs}


@pytest.fixture()
def fresh_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """W&B reads the environment once per process setup: reset it around each test."""
    wandb.teardown()
    for var in ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_ENTITY", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "not_here"))  # must be ignored: run dir wins
    monkeypatch.chdir(tmp_path)
    yield
    wandb.teardown()
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "not_here").exists()


def test_fit_writes_one_offline_run_per_fold_and_a_summary(
    tmp_path: Path, fresh_wandb: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    features, labels = make_bag_cohort(
        tmp_path / "cohort", n_patients=12, dim=16, n_instances=(4, 12)
    )
    run_dir = tmp_path / "runs" / "resnet_vs_uni"
    cfg = load_config(
        FitConfig,
        dotlist=[
            f"data.features_dir={features}",
            f"data.labels_csv={labels}",
            f"output_dir={run_dir}",
            "logger=wandb",
            "cv.folds=2",
            "trainer.max_epochs=3",
            "trainer.min_epochs=3",
            "trainer.selection=early_stopping",  # validation metrics every epoch
            "wandb.tags=[paper]",
        ],
    )
    assert run_fit(cfg) == 0
    summary = json.loads((run_dir / "cv_summary.json").read_text())
    runs = offline_runs(run_dir)
    assert set(runs) == {"fold_0", "fold_1", "summary"}
    for k in (0, 1):
        fold = runs[f"fold_{k}"]
        assert fold.run.run_group == "resnet_vs_uni" and fold.run.project == "env-project"
        assert list(fold.run.tags) == ["paper", "synthetic"]
        assert fold.config["provenance"]["splits_sha256"] == summary["splits_sha256"]
        assert fold.config["provenance"]["encoder"] == "synthetic"
        assert fold.config["provenance"]["cache_key"] == summary["cache_key"] == "synthetic-16"
        assert fold.config["data"]["features_dir"] == str(features)
        epochs = [row for row in fold.history if "val_auc" in row]
        assert [row["epoch"] for row in epochs] == [0, 1, 2]
        assert sum("train_loss" in row for row in fold.history) == 3
        assert fold.summary["test_auc"] == pytest.approx(summary["auc"]["per_fold"][k])
    final = runs["summary"]
    assert final.run.run_group == "resnet_vs_uni"
    assert final.summary[loggers.SWEEP_METRIC] == pytest.approx(summary["auc"]["mean"])
    assert final.summary["cv/pooled_auc"] == pytest.approx(summary["pooled_auc"]["value"])
    assert final.summary["cv/roc/_type"] == "image-file"


def test_agent_run_collects_all_folds_and_the_sweep_metric(
    tmp_path: Path, fresh_wandb: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep01")
    monkeypatch.setenv("WANDB_RUN_ID", "agentrun")
    cfg = FitConfig(output_dir=str(tmp_path / "run"), logger="wandb", experiment="enc")
    cfg.cv.folds = 2
    run_dir = Path(cfg.output_dir)
    roc = tmp_path / "roc.png"
    Image.new("RGB", (8, 8)).save(roc)
    per_fold = {"auc": [0.7, 0.9], "accuracy": [0.5, 0.6]}
    for k in range(2):
        logger = loggers.fold_logger(cfg, run_dir, k, 0)
        assert logger is not None
        for epoch in range(2):
            logger.log_metrics({"val_auc": 0.5 + epoch / 10, "epoch": epoch}, step=epoch)
        loggers.finish_fold(logger, {"auc": per_fold["auc"][k]}, roc)
    summary = {k: {"mean": sum(v) / 2, "std": 0.1, "per_fold": v} for k, v in per_fold.items()}
    summary["pooled_auc"] = {"value": 0.8, "ci_low": 0.6, "ci_high": 0.95}
    preds = pd.DataFrame({"slide_id": ["a", "b"], "label": ["x", "y"], "prob": [0.2, 0.9]})
    loggers.log_summary(cfg, run_dir, summary, preds)
    runs = offline_runs(run_dir)
    assert list(runs) == ["fit"]  # the agent's run, nothing else
    run = runs["fit"]
    assert run.run.run_id == "agentrun" and run.run.sweep_id == "sweep01"
    assert [r["fold_1/val_auc"] for r in run.history if "fold_1/val_auc" in r] == [0.5, 0.6]
    assert run.summary["fold_0/test_auc"] == 0.7 and run.summary["fold_1/test_auc"] == 0.9
    assert run.summary["fold_0/test_roc/_type"] == "image-file"
    assert run.summary["cv/auc_mean"] == pytest.approx(0.8)
    assert run.summary["cv/pooled_auc_ci_high"] == 0.95


def test_mode_resolution_and_single_offline_notice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.org login me password pw\n")
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setattr(loggers, "_offline_notice_shown", False)
    cfg, run_dir = FitConfig(), tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger=loggers.__name__):
        assert loggers.resolve_mode(cfg, run_dir) == "offline"
        assert loggers.resolve_mode(cfg, run_dir) == "offline"
    notices = [r.getMessage() for r in caplog.records if "wandb sync" in r.getMessage()]
    assert len(notices) == 1 and str(run_dir / "wandb") in notices[0]
    netrc.write_text("machine api.wandb.ai login user password not-a-real-key\n")
    assert loggers.has_api_key() and loggers.resolve_mode(cfg, run_dir) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert loggers.resolve_mode(cfg, run_dir) == "disabled"
    cfg.wandb.mode = "offline"  # the config beats the environment
    assert loggers.resolve_mode(cfg, run_dir) == "offline"
    cfg.wandb.mode = "cloud"
    with pytest.raises(UserError, match="not one of"):
        loggers.resolve_mode(cfg, run_dir)


@pytest.mark.parametrize("how", ["wandb.mode=online", "WANDB_MODE=online"])
def test_online_without_an_api_key_is_refused_before_any_work(
    tmp_path: Path, fresh_wandb: None, monkeypatch: pytest.MonkeyPatch, capsys, how: str
) -> None:
    """wandb.init would raise at the first fold (a traceback, after the run folder is made)."""
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    features, labels = make_bag_cohort(tmp_path / "cohort", n_patients=8, dim=4)
    out = tmp_path / "run"
    argv = ["fit", f"data.features_dir={features}", f"data.labels_csv={labels}",
            f"output_dir={out}", "logger=wandb", "cv.folds=2", "trainer.max_epochs=1"]  # fmt: skip
    if how.startswith("WANDB_MODE"):
        monkeypatch.setenv("WANDB_MODE", "online")
    else:
        argv.append(how)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "needs an API key" in err and "wandb login" in err and "\n" not in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    ("netrc_name", "machine", "settings"),
    [
        (".netrc", "api.forge.coreweave.com", None),  # `wandb login` with wandb >= 0.31
        (".netrc", "wandb.example.org", "https://wandb.example.org"),  # `wandb login --host`
        ("_netrc", "api.wandb.ai", None),  # wandb reads ~/_netrc too (Windows)
    ],
)
def test_a_key_wandb_itself_finds_is_found(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    netrc_name: str,
    machine: str,
    settings: str | None,
) -> None:
    """wandb.mode=online is refused without a key: never for a key that wandb uses."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "NETRC", "WANDB_CONFIG_DIR",
                "WANDB_IDENTITY_TOKEN_FILE"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    key = tmp_path / netrc_name
    key.write_text(f"machine {machine} login user password not-a-real-key\n")
    key.chmod(0o600)
    if settings:
        folder = tmp_path / ".config" / "wandb"
        folder.mkdir(parents=True)
        (folder / "settings").write_text(f"[default]\nbase_url = {settings}\n")
    cfg = FitConfig(logger="wandb")
    cfg.wandb.mode = "online"
    assert loggers.has_api_key()
    loggers.check_logger(cfg)  # no UserError
    key.unlink()
    with pytest.raises(UserError, match="needs an API key"):
        loggers.check_logger(cfg)
