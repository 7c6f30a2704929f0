"""The bag store on a disk that fills while it is built: an error naming the file, not a
process killed by SIGBUS. A real small tmpfs (root only)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import mounted_tmpfs
from test_tile_disk import _fill

from melanoma_mil.data.store_layout import Source, scan
from melanoma_mil.data.synthetic import make_bag_cohort

WRITE = """
import sys
from pathlib import Path
from melanoma_mil.data.store_build import _write
from melanoma_mil.data.store_layout import Source, scan
from melanoma_mil.errors import UserError
from melanoma_mil.workshare import Claim
features, tmp, lock = Path(sys.argv[1]), Path(sys.argv[2]), Claim(Path(sys.argv[3]))
sources = [Source.of(p.stem, p) for p in sorted(features.glob("*.h5"))]
assert lock.acquire()
try:
    _write(tmp, sources, scan(sources), "float32", lock)
except UserError as e:
    print(e)
    sys.exit(3)
"""


@pytest.mark.parametrize("full", [False, True])
def test_a_disk_that_fills_after_the_check_is_one_line_naming_the_folder(
    tmp_path: Path, full: bool
) -> None:
    """features.npy is written through a memory map: a disk that filled after `build`'s
    free-space check (another process writing) killed the process with SIGBUS, no message, its
    temp folder left. Now one line naming the store's folder and data.store_dir, not the temp
    file (removed by then). `_write` runs here as `build` runs it once that check has passed, on a
    tmpfs with less room than the store needs, or (``full``) none at all: then the file's header
    fails first, which named no file at all, so the CLI blamed output_dir."""
    features, _ = make_bag_cohort(tmp_path, n_patients=10, dim=256)
    disk = tmp_path / "disk"
    if not mounted_tmpfs(disk, "256k"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        tmp = disk / ".store.tmp"
        tmp.mkdir()
        if full:
            _fill(disk, 0)
        layout = scan([Source.of(p.stem, p) for p in features.glob("*.h5")])
        assert sum(layout.rows.values()) * layout.dim * 4 > shutil.disk_usage(disk).free
        done = subprocess.run(
            [sys.executable, "-c", WRITE, str(features), str(tmp), str(tmp_path / ".lock")],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )  # fmt: skip
        assert done.returncode == 3, (done.returncode, done.stderr[-2000:])
        said = done.stdout.strip()
        assert len(said.splitlines()) == 1 and f"in '{disk}', which filled" in said
        assert os.strerror(errno.ENOSPC) in said and "data.store_dir=PATH" in said
        assert ".tmp" not in said
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_reserve_allocates_every_block_of_a_sparse_file(tmp_path: Path) -> None:
    """The kernel's fallocate, not glibc's block-by-block emulation: a sparse file has its whole
    size allocated after it (or reserve says the file system has none)."""
    from melanoma_mil.fsutil import reserve

    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(8 << 20)
        assert os.fstat(f.fileno()).st_blocks * 512 < 8 << 20
        if not reserve(f.fileno(), 8 << 20):
            pytest.skip("this file system has no fallocate")
        assert os.fstat(f.fileno()).st_blocks * 512 >= 8 << 20


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_store_without_room_suggests_float16_only_where_it_halves_it(
    tmp_path: Path, dtype: str
) -> None:
    """A float16 store was told to pass data.dtype=float16 (half the size) too."""
    from melanoma_mil.data.store_build import _check_disk
    from melanoma_mil.errors import UserError

    with pytest.raises(UserError, match="data.store_dir=PATH on a disk with room") as e:
        _check_disk(tmp_path, 10**18, dtype)
    assert ("data.dtype=float16" in str(e.value)) == (dtype == "float32")
