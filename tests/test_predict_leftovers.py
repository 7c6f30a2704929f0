"""`predict` scores bags it cannot draw, speaks in its own keys while it tiles, and never
replaces an evaluation it did not write."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import (
    Pipeline,
    inference_cfg,
    mounted_tmpfs,
    room_for_one_and_a_half,
    small_disk,
    untagged_copy,
)
from test_config import one_line_error

from melanoma_mil.config import EvaluateConfig, HeatmapConfig, PredictConfig, load_config
from melanoma_mil.demo.pyramid import write_pyramid
from melanoma_mil.errors import UserError
from melanoma_mil.evaluation.evaluate import run_evaluate
from melanoma_mil.inference.analyse import ATTENTION_FILE
from melanoma_mil.inference.heatmap import run_heatmap
from melanoma_mil.inference.predict import run_predict

GEOMETRY = ("patch_level", "downsample", "read_size")  # attrs `tile` writes, read to draw


def predict_cfg(pipe: Pipeline, out: Path, *extra: str) -> PredictConfig:
    return inference_cfg(PredictConfig, pipe, out, *extra)


def test_a_bag_without_tile_geometry_is_scored_without_a_heatmap(
    pipe: Pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    for sid in ("slide_003", "slide_004"):
        shutil.copy(pipe.features / f"{sid}.h5", cache)
    out = tmp_path / "pred"
    assert run_predict(predict_cfg(pipe, out, f"features_dir={cache}")) == 0
    assert (out / "slide_004" / "heatmap.png").is_file()
    with h5py.File(cache / "slide_004.h5", "r+") as f:  # as a bag from another tool
        for attrs in (f.attrs, f["coords"].attrs):
            for key in GEOMETRY:
                attrs.pop(key, None)
    capsys.readouterr()
    assert run_predict(predict_cfg(pipe, out, f"features_dir={cache}", "overwrite=true")) == 0
    pred = pd.read_csv(out / "predictions.csv").set_index("slide_id")
    flat = pred.loc["slide_004"]
    assert flat["status"] == "ok" and 0 <= flat["prob"] <= 1 and flat["n_tiles"] > 0
    assert "no tile geometry" in flat["reason"] and pd.isna(flat.get("heatmap"))
    assert pred.loc["slide_003", "status"] == "ok" and pd.isna(pred.loc["slide_003", "reason"])
    assert (out / "slide_003" / "heatmap.png").is_file()
    assert not (out / "slide_004").exists()  # the earlier call's drawing of it is gone
    printed = capsys.readouterr().out
    assert "1 slide scored without a heatmap, its bag holds" in printed and "slide_004" in printed
    assert "extract it for heatmaps" in printed
    plain = predict_cfg(pipe, tmp_path / "plain", f"features_dir={cache}", "heatmaps=false")
    assert run_predict(plain) == 0
    score = pd.read_csv(tmp_path / "plain" / "predictions.csv").set_index("slide_id")
    assert flat["prob"] == pytest.approx(score.loc["slide_004", "prob"], abs=1e-6)
    # `heatmap` exists to draw: there the slide still fails, with the same reason
    drawn = inference_cfg(HeatmapConfig, pipe, tmp_path / "hm", f"features_dir={cache}")
    assert run_heatmap(drawn) == 1
    row = pd.read_csv(tmp_path / "hm" / "heatmaps.csv").set_index("slide_id").loc["slide_004"]
    assert row["status"] == "failed" and "no tile geometry" in row["reason"]


def test_tiling_advice_during_predict_names_only_predicts_keys(
    pipe: Pipeline,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    folder = untagged_copy(pipe.slides / "slide_000.tiff", tmp_path / "slides" / "S.tiff").parent
    caplog.set_level(logging.INFO)
    assert run_predict(predict_cfg(pipe, tmp_path / "a", f"slides_dir={folder}")) == 1
    seen = capsys.readouterr()
    console = seen.out + seen.err + caplog.text
    assert "records no resolution" in seen.out and "mpp_csv=" in seen.out  # tile's table
    assert "default_mpp" not in console  # a key predict does not take


def test_an_evaluation_predict_did_not_write_is_never_replaced(
    pipe: Pipeline, tmp_path: Path
) -> None:
    out = tmp_path / "pred"
    labels = pipe.root / "cohort/labels.csv"
    keys = [f"features_dir={pipe.features}", "heatmaps=false",
            "slide_ids=[slide_000,slide_001,slide_002,slide_003,slide_004,slide_005]"]  # fmt: skip
    assert run_predict(predict_cfg(pipe, out, *keys, f"labels_csv={labels}")) == 0
    # predict's own evaluation is replaced by a rerun as before
    again = predict_cfg(pipe, out, *keys, f"labels_csv={labels}", "overwrite=true")
    assert run_predict(again) == 0
    evaluation = out / "evaluation"
    ecfg = load_config(EvaluateConfig, [], [
        f"predictions={out / 'predictions.csv'}", f"labels_csv={labels}", "bootstrap=100",
        f"output_dir={evaluation}", "overwrite=true"])  # fmt: skip
    assert run_evaluate(ecfg) == 0  # the user's own evaluation, in predict's folder
    users = {p.name: p.read_bytes() for p in evaluation.iterdir()}
    table = (out / "predictions.csv").read_bytes()
    for extra in (["overwrite=true"], []):
        if not extra:
            (out / "predictions.csv").unlink()  # no overwrite needed: still refused
        with pytest.raises(UserError, match=f"{evaluation}.*not written by predict") as e:
            run_predict(predict_cfg(pipe, out, *keys, f"labels_csv={labels}", *extra))
        assert "\n" not in str(e.value) and "another output_dir" in str(e.value)
        assert {p.name: p.read_bytes() for p in evaluation.iterdir()} == users
        assert not extra or (out / "predictions.csv").read_bytes() == table  # before any work


SIX = "slide_ids=[slide_000,slide_001,slide_002,slide_003,slide_004,slide_005]"


def labelled(pipe: Pipeline, out: Path, *extra: str) -> PredictConfig:
    """predict on six cached bags with labels_csv: it writes a report into out/evaluation."""
    labels = pipe.root / "cohort/labels.csv"
    keys = [f"features_dir={pipe.features}", "heatmaps=false", SIX, f"labels_csv={labels}"]
    return predict_cfg(pipe, out, *keys, *extra)


def test_labels_the_run_does_not_know_are_refused_before_any_work(
    pipe: Pipeline, tmp_path: Path
) -> None:
    """predict's report maps labels_csv to the run's classes: that mapping is checked first, not
    after every slide is scored (and so are repeated slides)."""
    out = tmp_path / "pred"
    bad = tmp_path / "labels.csv"
    for rows, problem in (
        ("slide_000,melanoma\nslide_001,benign\n", "none of its labels"),
        ("slide_000,immune_low\nslide_000,immune_high\n", "twice"),
    ):
        bad.write_text("slide_id,label\n" + rows)
        keys = [f"features_dir={pipe.features}", "heatmaps=false", SIX, f"labels_csv={bad}"]
        with pytest.raises(UserError, match=f"{bad}.*{problem}") as e:
            run_predict(predict_cfg(pipe, out, *keys))
        assert "\n" not in str(e.value) and not out.exists()


def _immutable(path: Path, on: bool) -> bool:
    """Set or clear ``path``'s immutable attribute (root, a file system that has it, as
    ext4): a rename over it then fails, as a crash between a write's renames would leave it."""
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        return False
    done = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True)
    return done.returncode == 0


def test_a_report_interrupted_before_it_was_recorded_stays_predicts(
    pipe: Pipeline, tmp_path: Path
) -> None:
    out = tmp_path / "pred"
    assert run_predict(labelled(pipe, out)) == 0
    evaluation = out / "evaluation"
    blocked = out / "report.html"  # renamed last: the crash comes after the evaluation's files
    if not _immutable(blocked, True):
        pytest.skip("needs root and chattr on a file system with the immutable attribute")
    try:
        before = (evaluation / "evaluation.json").stat().st_ino
        with pytest.raises(OSError):
            run_predict(labelled(pipe, out, "overwrite=true"))
    finally:
        _immutable(blocked, False)
    assert (evaluation / "evaluation.json").stat().st_ino != before  # rewritten, not recorded
    # a kill -9 inside an atomic write leaves its temp file
    fd, leftover = tempfile.mkstemp(prefix=".roc.png.", suffix=".tmp", dir=evaluation)
    os.close(fd)
    # a file moved in from elsewhere (older than the interrupted report) is still the user's
    users = evaluation / "pr.png"
    pr = users.read_bytes()
    users.write_bytes(b"the user's figure")
    os.utime(users, ns=(0, 3600 * 10**9))
    with pytest.raises(UserError, match="pr.png' was not written by predict"):
        run_predict(labelled(pipe, out, "overwrite=true"))
    assert users.read_bytes() == b"the user's figure"
    users.write_bytes(pr)  # put back: written now, as by the interrupted report
    assert run_predict(labelled(pipe, out, "overwrite=true")) == 0
    assert (out / "report.html").is_file() and Path(leftover).exists()
    marker = json.loads((out / ".melanoma-mil.json").read_text())
    assert "evaluation_pending" not in marker and "evaluation.json" in marker["evaluation_files"]
    assert run_predict(labelled(pipe, out, "overwrite=true")) == 0


def test_a_copied_output_folder_is_rerun_with_its_report(pipe: Pipeline, tmp_path: Path) -> None:
    out, copy = tmp_path / "pred", tmp_path / "copy"
    assert run_predict(labelled(pipe, out)) == 0
    shutil.copytree(out, copy, symlinks=True)  # as cp -a: size and mtime kept, new inodes
    roc = copy / "evaluation" / "roc.png"
    whole = roc.stat().st_mtime_ns // 10**9 * 10**9  # tar and some backups keep whole seconds
    os.utime(roc, ns=(whole, whole))
    assert run_predict(labelled(pipe, copy, "overwrite=true")) == 0
    assert (copy / "evaluation" / "evaluation.json").stat().st_mtime_ns > whole


def test_a_dangling_link_in_the_evaluation_is_refused_in_one_line(
    pipe: Pipeline, tmp_path: Path
) -> None:
    out = tmp_path / "pred"
    assert run_predict(labelled(pipe, out)) == 0
    link = out / "evaluation" / "roc.png"
    link.unlink()
    link.symlink_to(tmp_path / "gone.png")
    with pytest.raises(UserError, match="roc.png' .*was not written by predict") as e:
        run_predict(labelled(pipe, out, "overwrite=true"))
    assert "\n" not in str(e.value) and link.is_symlink()


def test_a_folder_redone_for_another_run_keeps_its_evaluation_predicts(
    pipe: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "pred"
    assert run_predict(labelled(pipe, out)) == 0
    path = out / ".melanoma-mil.json"
    marker = json.loads(path.read_text())  # as made for another run of this folder
    path.write_text(json.dumps({**marker, "run_id": "another", "run_dir": str(tmp_path / "x")}))

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C while the slides are scored

    # stopped after the folder was claimed for this run, before its report
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr("melanoma_mil.inference.predict.analyse_all", killed)
        run_predict(labelled(pipe, out, "overwrite=true"))
    assert json.loads(path.read_text())["run_id"] != "another"  # claimed
    assert run_predict(labelled(pipe, out, "overwrite=true")) == 0


def test_a_bad_wandb_mode_for_the_runs_slides_fails_before_any_work(
    pipe: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run recorded with logger=wandb gets its slides logged once they are done: a bad W&B
    mode is refused before the first slide, not after the last."""
    run = tmp_path / "run"
    shutil.copytree(pipe.run_dir, run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("logger: none", "logger: wandb"))
    monkeypatch.setenv("WANDB_MODE", "cloudy")
    out = tmp_path / "pred"
    with pytest.raises(UserError, match="not one of"):
        run_predict(predict_cfg(pipe, out, f"run_dir={run}", f"features_dir={pipe.features}"))
    assert not out.exists()


def test_a_failed_patient_table_write_leaves_the_earlier_predictions_whole(
    pipe: Pipeline, tmp_path: Path
) -> None:
    """overwrite=true with patients_csv replaced predictions.csv, then failed writing
    patient_predictions.csv, leaving the new slide table beside the old (or no) patient one.
    The patient table's write fails on a real full disk (a small tmpfs, one page left)."""
    disk = tmp_path / "disk"
    if not mounted_tmpfs(disk, "2m"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        patients = tmp_path / "patients.csv"
        pd.DataFrame({"slide_id": ["slide_000", "slide_001", "slide_002"],
                      "patient_id": ["P1", "P1", "P2"]}).to_csv(patients, index=False)  # fmt: skip
        out = disk / "pred"
        keys = (f"features_dir={pipe.features}", "heatmaps=false", f"patients_csv={patients}")
        assert run_predict(predict_cfg(pipe, out, *keys, "slide_ids=[slide_000,slide_001]")) == 0
        before = (out / "predictions.csv").read_bytes()
        (out / "patient_predictions.csv").unlink()
        # room for the slide table's temp file (one page, the first written), not the patients'
        stat = os.statvfs(disk)
        filler = disk / "filler"
        filler.write_bytes(bytes((stat.f_bavail - 1) * stat.f_frsize))
        with pytest.raises(OSError, match="No space left") as e:
            run_predict(predict_cfg(pipe, out, *keys, "slide_ids=[slide_000,slide_002]",
                                    "overwrite=true"))  # fmt: skip
        assert "write_together" in [entry.name for entry in e.traceback]  # after scoring
        assert (out / "predictions.csv").read_bytes() == before
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
        filler.unlink()  # a plain re-run finishes the call the full disk stopped
        assert run_predict(predict_cfg(pipe, out, *keys, "slide_ids=[slide_000,slide_002]")) == 0
        slides = pd.read_csv(out / "predictions.csv")
        assert list(slides["slide_id"]) == ["slide_000", "slide_002"]
        assert list(pd.read_csv(out / "patient_predictions.csv")["patient_id"]) == ["P1", "P2"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize(
    ("command", "name"),
    [("predict", "predictions.csv"), ("predict", "patient_predictions.csv"),
     ("predict", "report.html"), ("heatmap", "heatmaps.csv")],
)  # fmt: skip
def test_a_folder_at_one_of_the_commands_file_names_is_refused_before_any_work(
    pipe: Pipeline, tmp_path: Path, command: str, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder of the user's where the command writes (or, with overwrite, removes) a file:
    the call failed on it only after every slide was scored."""
    patients = tmp_path / "patients.csv"
    pd.DataFrame({"slide_id": ["slide_000"], "patient_id": ["P1"]}).to_csv(patients, index=False)
    out = tmp_path / "pred"
    (out / name).mkdir(parents=True)
    (out / name / "mine.txt").write_text("mine")
    keys = [f"run_dir={pipe.run_dir}", f"output_dir={out}", f"features_dir={pipe.features}",
            "device=cpu", "slide_ids=[slide_000]", "overwrite=true"]  # fmt: skip
    if command == "predict":
        keys += ["heatmaps=false", f"patients_csv={patients}"]
    err = one_line_error(capsys, command, *keys)
    assert f"'{out / name}' is a folder" in err and "move it away" in err
    made = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert made == [name, f"{name}/mine.txt"]


def test_a_full_disk_stops_the_drawing_not_the_predictions(
    pipe: Pipeline, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each slide after the disk filled was drawn anyway, failing with a bare OSError."""
    with small_disk(tmp_path / "disk", "2m") as disk:
        given = [f"slides_dir={pipe.slides}", f"features_dir={pipe.features}"]
        one = tmp_path / "one"
        assert run_predict(predict_cfg(pipe, one, *given, "slide_ids=[slide_000]")) == 0
        room_for_one_and_a_half(disk, one / "slide_000")
        out = disk / "pred"
        four = "slide_ids=[slide_000,slide_001,slide_002,slide_003]"
        assert run_predict(predict_cfg(pipe, out, *given, four)) == 1
        table = pd.read_csv(out / "predictions.csv").set_index("slide_id")
        full = f"disk full (No space left on device) in {out / 'slide_001'}"
        assert table["reason"].fillna("").tolist() == ["", full, *[f"not drawn: {full}"] * 2]
        assert table["prob"].notna().all()  # every slide scored
        assert f"predict stopped drawing heatmaps: {full}; make room" in caplog.text
        assert "overwrite=true" not in caplog.text  # it scored and drew everything again
        assert not [p for p in disk.rglob("*") if p.name.endswith(".tmp")]
        first = (out / "slide_000" / ATTENTION_FILE).stat()
        (disk / "filler").unlink()
        assert run_predict(predict_cfg(pipe, out, *given, four)) == 0  # a plain re-run resumes
        again = pd.read_csv(out / "predictions.csv").set_index("slide_id")
        assert again["status"].tolist() == ["ok"] * 4 and again["reason"].isna().all()
        assert again["heatmap"].notna().all() and again["prob"].equals(table["prob"])
        kept = (out / "slide_000" / ATTENTION_FILE).stat()
        assert (kept.st_ino, kept.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not redrawn
        with pytest.raises(UserError, match="exists; pass overwrite=true"):  # finished now
            run_predict(predict_cfg(pipe, out, *given, four))


def test_a_blank_slide_keeps_its_reason_on_a_second_run(pipe: Pipeline, tmp_path: Path) -> None:
    """The second call said 'empty: no tiles in the coords file' (extract's row: tile's own
    row was a cached 'skipped') instead of the first call's 'no tissue found'."""
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(pipe.slides / "slide_000.tiff", slides)
    write_pyramid(slides / "blank.tiff", np.full((1024, 1024, 3), 243, np.uint8), 0.5, 1)
    out = tmp_path / "pred"
    reasons = []
    for _ in range(3):
        assert run_predict(predict_cfg(pipe, out, f"slides_dir={slides}", "overwrite=true")) == 1
        table = pd.read_csv(out / "predictions.csv").set_index("slide_id")
        reasons.append(table.loc["blank", "reason"])
    assert reasons[0].startswith("empty: no tissue found") and len(set(reasons)) == 1
