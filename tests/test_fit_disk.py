"""`fit` on a full disk: one line naming the run's folder, and checkpoints written in the run's
own folder, never through the system temp folder (a real tmpfs; skipped without root)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import mounted_tmpfs

from melanoma_mil.cli import main
from melanoma_mil.data.synthetic import make_bag_cohort

ROOT = Path(__file__).resolve().parents[1]
FAST = ["cv.folds=2", "trainer.max_epochs=1", "logger=none", "trainer.accelerator=cpu",
        "model.hidden_dim=512"]  # fmt: skip


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """fit's data keys for a small bag cohort."""
    features, labels = make_bag_cohort(tmp_path_factory.mktemp("cohort"), n_patients=12, dim=8)
    return [f"data.features_dir={features}", f"data.labels_csv={labels}"]


def test_a_disk_that_fills_while_a_fold_model_is_saved_is_one_line(
    cohort: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """torch.save on a full disk raises RuntimeError ('unexpected pos ...'), not OSError: fit
    ended in a traceback naming no file."""
    disk = tmp_path / "disk"
    if not mounted_tmpfs(disk, "16m"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        assert main(["fit", *cohort, *FAST, f"output_dir={tmp_path / 'one'}"]) == 0
        fold = tmp_path / "one" / "folds" / "fold_0"
        ckpt, model = ((fold / n).stat().st_size for n in ("best.ckpt", "model.pt"))
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(bytes(free - ckpt - model // 2 - 64 * 1024))
        capsys.readouterr()
        out = disk / "run"
        assert main(["fit", *cohort, *FAST, f"output_dir={out}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: No space left on device"), err
        assert f"'{out / 'folds'}" in err and ".tmp" not in err, err
        assert not [p for p in disk.rglob("*") if p.name.endswith(".tmp")]
        assert not list((out / "folds").glob("fold_*"))
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_checkpoints_do_not_pass_through_the_system_temp_folder(
    cohort: list[str], tmp_path: Path
) -> None:
    """Lightning's own save writes each checkpoint to $TMPDIR, then copies it over: a full /tmp
    failed a fit whose output_dir had room, naming output_dir."""
    small = tmp_path / "tmp"
    if not mounted_tmpfs(small, "256k"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        out = tmp_path / "run"
        done = subprocess.run(
            [sys.executable, "-m", "melanoma_mil", "fit", *cohort, *FAST, f"output_dir={out}"],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
            env={**os.environ, "TMPDIR": str(small)},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert (out / "folds" / "fold_1" / "best.ckpt").is_file()
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_strategy_with_a_checkpoint_writer_of_its_own_keeps_it() -> None:
    """XLA strategies refuse any writer but theirs: passed as a Trainer plugin, the folder
    writer made every TPU fit fail. Only Lightning's plain torch writer is replaced."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from melanoma_mil.training.checkpoint_io import FolderCheckpointIO, own_checkpoint_io

    class TheirOwn(TorchCheckpointIO):
        """A strategy's own writer (as XLACheckpointIO is)."""

    plain, special = SingleDeviceStrategy("cpu"), SingleDeviceStrategy("cpu")
    special.checkpoint_io = mine = TheirOwn()
    own_checkpoint_io(plain)
    own_checkpoint_io(special)
    assert type(plain.checkpoint_io) is FolderCheckpointIO and special.checkpoint_io is mine
