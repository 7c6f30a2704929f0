"""Folders on file systems mounted without file locks (Lustre without -o flock, NFS without a
lock manager, some CIFS and FUSE mounts): commands whose processes take turns with `flock`
refuse them in one line before any work; those that share work by claims (hard links) run.

No such mount is at hand, so `fcntl.flock` fails as it does there (fault injection of the OS
call, by a sitecustomize in every Python process the test starts); all else is real."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_cohort

from melanoma_mil.cli import main
from melanoma_mil.data.synthetic import make_bag_cohort
from melanoma_mil.errors import UserError
from melanoma_mil.locks import locked, shared_lock, try_lock

ROOT = Path(__file__).resolve().parents[1]
NO_FLOCK = """
import errno, fcntl, os

def _no_flock(fd, op):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

fcntl.flock = _no_flock
"""


def run_without_flock(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """``python -m melanoma_mil ARGV`` as a user runs it, every flock failing with ENOLCK."""
    inject = tmp_path / "inject"
    inject.mkdir(exist_ok=True)
    (inject / "sitecustomize.py").write_text(NO_FLOCK)
    path = os.pathsep.join([str(inject), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "melanoma_mil", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_refused(done: subprocess.CompletedProcess[str], out: Path) -> None:
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"error: output_dir '{out}': this filesystem does not support "
                                  "file locks (flock: No locks available); mount it with -o "
                                  "flock, or set output_dir to a folder"), done.stderr  # fmt: skip


@pytest.mark.parametrize("made", [False, True], ids=["new", "existing"])
def test_fit_refuses_a_folder_without_flock_before_building_the_store(
    tmp_path: Path, made: bool
) -> None:
    """Before: the bag store was built, the run folder half made (record, config, splits, a
    fold's lock), then a traceback at the first fold lock."""
    features, labels = make_bag_cohort(tmp_path / "coh", n_patients=12, dim=8)
    inputs = listing(tmp_path / "coh")
    out = tmp_path / "run"
    if made:
        out.mkdir()
    done = run_without_flock(tmp_path, "fit", f"data.features_dir={features}",
                             f"data.labels_csv={labels}", f"output_dir={out}", "cv.folds=2",
                             "trainer.max_epochs=1", "logger=none")  # fmt: skip
    assert_refused(done, out)
    assert out.is_dir() == made and (not made or not any(out.iterdir()))
    assert listing(tmp_path / "coh") == inputs  # no bag store in <features>/.bag_stores


def test_sweep_and_demo_refuse_a_folder_without_flock_before_any_work(tmp_path: Path) -> None:
    """Before: `sweep` made its folder and lock file, then a traceback."""
    features, labels = make_bag_cohort(tmp_path / "coh", n_patients=12, dim=8)
    sweep_file = tmp_path / "grid.yaml"
    sweep_file.write_text(
        yaml.safe_dump({"method": "grid", "parameters": {"seed": {"values": [1, 2]}}})
    )
    out = tmp_path / "sweep"
    done = run_without_flock(tmp_path, "sweep", str(sweep_file), f"data.features_dir={features}",
                             f"data.labels_csv={labels}", f"output_dir={out}",
                             "trainer.max_epochs=1", "logger=none")  # fmt: skip
    assert_refused(done, out)
    assert not out.exists()
    demo = tmp_path / "demo"
    assert_refused(run_without_flock(tmp_path, "demo", f"output_dir={demo}"), demo)
    assert not demo.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coh", "grid.yaml", "inject"]


def test_tile_and_extract_share_work_without_flock(tmp_path: Path) -> None:
    """Their claims are hard links, not locks: they run on such a mount, and are not refused."""
    tiles = make_cohort(tmp_path, 1, side=128)
    out = tmp_path / "tiled"
    done = run_without_flock(tmp_path, "tile", f"slides_dir={tmp_path / 'slides'}",
                             f"output_dir={out}", "workers=1", "tiling.mpp=1.0",
                             "tiling.tile_size=64")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (out / "tiling.csv").is_file()
    feats = tmp_path / "features"
    done = run_without_flock(tmp_path, "extract", f"coords_dir={tiles}", f"output_dir={feats}",
                             "encoder.name=resnet18_imagenet", "encoder.pretrained=false",
                             "device=cpu", "num_workers=0")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [p.name for p in feats.glob("*/*.h5")] == ["slide0.h5"]


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL])
def test_every_errno_of_a_mount_without_locks_is_refused_in_one_line(
    tmp_path: Path, code: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Lustre says ENOSYS, CIFS and FUSE mounts EOPNOTSUPP or EINVAL."""

    def no_flock(fd: int, op: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "run"
    assert main(["fit", f"output_dir={out}", "data.features_dir=f", "data.labels_csv=l"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: output_dir '{out}': this filesystem does not support file locks "
                   f"(flock: {os.strerror(code)}); mount it with -o flock, or set output_dir "
                   "to a folder on a local or lock-capable disk.\n")  # fmt: skip
    assert not out.exists()


def test_a_lock_taken_on_a_mount_without_locks_names_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock past the command's probe (a folder on another mount, a caller in code) fails in
    one line too, its descriptor closed; an errno that means something else stays an OSError."""
    fds = len(os.listdir("/proc/self/fd"))
    code = errno.ENOLCK

    def no_flock(fd: int, op: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock = tmp_path / "folds" / ".fold_0.lock"
    for take in (try_lock, shared_lock, lambda p: locked(p).__enter__()):
        with pytest.raises(UserError, match=f"^{re.escape(repr(str(lock.parent)))}: this filesy"):
            take(lock)
    assert len(os.listdir("/proc/self/fd")) == fds
    code = errno.EIO
    with pytest.raises(OSError, match="Input/output error"):
        try_lock(lock)


# flock (by Python or by HDF5, which locks every file it opens) of a file under $NOFLOCK_UNDER
# fails with ENOLCK, as on an NFS mount without a lock manager, unless it is under
# $NOFLOCK_EXCEPT (a lock-capable disk mounted inside it); other files lock as usual
SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int flock(int fd, int op) {
    const char *under = getenv("NOFLOCK_UNDER"), *except = getenv("NOFLOCK_EXCEPT");
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    path[n < 0 ? 0 : n] = 0;
    if (under != NULL && strncmp(path, under, strlen(under)) == 0
        && (except == NULL || strncmp(path, except, strlen(except)) != 0)) {
        errno = ENOLCK;
        return -1;
    }
    return ((int (*)(int, int))dlsym(RTLD_NEXT, "flock"))(fd, op);
}
"""


def run_with_inputs_without_flock(
    tmp_path: Path, inputs: Path, *argv: str, but: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m melanoma_mil ARGV`` with every flock of a file under ``inputs`` (but not
    under ``but``, a lock-capable mount inside it) failing in the C library call itself,
    HDF5's included (a compiled LD_PRELOAD shim)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not sys.platform.startswith("linux"):
        pytest.skip("needs a C compiler and Linux to fail flock below Python")
    shim = tmp_path / "noflock.so"
    if not shim.exists():
        (tmp_path / "noflock.c").write_text(SHIM)
        subprocess.run([compiler, "-shared", "-fPIC", "-o", str(shim), str(tmp_path / "noflock.c"),
                        "-ldl"], check=True)  # fmt: skip
    env = {**os.environ, "LD_PRELOAD": str(shim), "NOFLOCK_UNDER": str(inputs),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}  # fmt: skip
    if but is not None:
        env["NOFLOCK_EXCEPT"] = str(but)
    return subprocess.run([sys.executable, "-m", "melanoma_mil", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_inputs_on_a_mount_without_locks_are_read(tmp_path: Path) -> None:
    """HDF5 takes a lock to read a file: there every read failed (ENOLCK), so `fit` ended in a
    traceback and `extract` failed each slide telling the user to delete its good coords
    file. Our h5 files are written whole and renamed, never changed in place: they are now
    read without that lock."""
    inputs = tmp_path / "nfs"
    tiles = make_cohort(inputs, 1, side=128)
    feats = tmp_path / "features"
    done = run_with_inputs_without_flock(tmp_path, inputs, "extract", f"coords_dir={tiles}",
                                         f"output_dir={feats}", "encoder.name=resnet18_imagenet",
                                         "encoder.pretrained=false", "device=cpu",
                                         "num_workers=0")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert [p.name for p in feats.glob("*/*.h5")] == ["slide0.h5"]
    features, labels = make_bag_cohort(inputs / "coh", n_patients=12, dim=8)
    out = tmp_path / "run"
    done = run_with_inputs_without_flock(tmp_path, inputs, "fit", f"data.features_dir={features}",
                                         f"data.labels_csv={labels}", f"output_dir={out}",
                                         "cv.folds=2",
                                         "trainer.max_epochs=1", "logger=none")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (out / "cv_summary.json").is_file()


def test_fit_overwrite_refuses_a_folder_without_flock_beside_the_run_before_any_work(
    tmp_path: Path,
) -> None:
    """The run folder a lock-capable disk mounted in a folder without locks: the bag store may
    sit there (its builders take turns by claims), but `fit overwrite=true` builds and locks the
    replacement beside the run. Before: the store was built and that folder made, then a
    one-line error at its lock; now it is probed with output_dir, and nothing is made."""
    features, labels = make_bag_cohort(tmp_path / "coh", n_patients=12, dim=8)
    nfs = tmp_path / "nfs"
    out = nfs / "run"
    fit = ["fit", f"data.features_dir={features}", f"data.labels_csv={labels}",
           f"output_dir={out}", "cv.folds=2", "trainer.max_epochs=1", "logger=none"]  # fmt: skip
    done = run_with_inputs_without_flock(tmp_path, nfs, *fit, f"data.store_dir={nfs / 'a'}",
                                         but=out)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (out / "cv_summary.json").is_file() and len(list((nfs / "a").glob("*/*.npy"))) == 1
    before = listing(nfs)
    done = run_with_inputs_without_flock(tmp_path, nfs, *fit, f"data.store_dir={nfs / 'b'}",
                                         "overwrite=true", but=out)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: output_dir '{out}' is replaced by a new run built beside it: its "
                      f"folder '{nfs}': this filesystem does not support file locks (flock: No "
                      "locks available); mount it with -o flock, or set output_dir to a folder "
                      "on a local or lock-capable disk."], done.stderr  # fmt: skip
    assert listing(nfs) == before  # no store b, no .run.fit-new
