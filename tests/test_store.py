"""The memory-mapped bag store: built once, reused, safe under races; the memory pre-check."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import read_only_bind

from melanoma_mil.cli import main
from melanoma_mil.config import FitConfig, load_config
from melanoma_mil.data.bags import read_bag
from melanoma_mil.data.cohort import build_cohort
from melanoma_mil.data.memory import BASE_CPU, GB, estimate, verdict
from melanoma_mil.data.store import STORES, BagStore, open_store
from melanoma_mil.data.synthetic import make_bag_cohort
from melanoma_mil.errors import UserError
from melanoma_mil.workshare import DEFAULT_STALE_S, me


def fit_config(features: Path, labels: Path, *extra: str) -> FitConfig:
    return load_config(
        FitConfig,
        [],
        [f"data.features_dir={features}", f"data.labels_csv={labels}", *extra],
    )


def store_of(features: Path, labels: Path, *extra: str) -> BagStore:
    cfg = fit_config(features, labels, *extra)
    return open_store(build_cohort(cfg.data).members, cfg)


def stores(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


@pytest.fixture()
def cohort(tmp_path: Path) -> tuple[Path, Path]:
    return make_bag_cohort(tmp_path, n_patients=10, dim=8)


def test_bags_equal_the_files_and_the_store_is_reused(cohort) -> None:
    features, labels = cohort
    store = store_of(features, labels)
    assert store.dtype == torch.float16  # every file is float16: the store keeps it, exactly
    assert store.folder.parent == features / STORES
    for slide_id, bag in store.bags.items():
        want = read_bag(features / f"{slide_id}.h5")[0]
        assert torch.equal(bag, torch.from_numpy(want))
        assert bag.untyped_storage().data_ptr() == store.features.untyped_storage().data_ptr()
    built = (store.folder / "features.npy").stat().st_mtime_ns
    again = store_of(features, labels)
    assert again.folder == store.folder and len(stores(features / STORES)) == 1
    assert (store.folder / "features.npy").stat().st_mtime_ns == built
    sub = pd.read_csv(labels).iloc[:4]  # a smaller cohort of the same files reuses it too
    sub.to_csv(labels.with_name("sub.csv"), index=False)
    assert store_of(features, labels.with_name("sub.csv")).folder == store.folder


def test_changed_file_or_dtype_gets_its_own_store(cohort) -> None:
    features, labels = cohort
    first = store_of(features, labels).folder
    wide = store_of(features, labels, "data.dtype=float32")
    assert wide.dtype == torch.float32 and wide.folder != first
    with h5py.File(features / "P0003.h5", "a") as f:
        f["features"][0, 0] = 42.0
    changed = store_of(features, labels)
    assert changed.folder not in (first, wide.folder)
    assert float(changed.bags["P0003"][0, 0]) == 42.0


def test_float32_files_stay_float32_unless_asked(tmp_path: Path) -> None:
    features, labels = make_bag_cohort(tmp_path, n_patients=6, dim=8, dtype="float32")
    exact = store_of(features, labels)
    assert exact.dtype == torch.float32
    assert torch.equal(exact.bags["P0001"], torch.from_numpy(read_bag(features / "P0001.h5")[0]))
    assert store_of(features, labels, "data.dtype=float16").dtype == torch.float16


def test_patient_bags_are_views_and_the_store_pickles_small(tmp_path: Path) -> None:
    features, labels = make_bag_cohort(tmp_path, n_patients=5, dim=8, slides_per_patient=3)
    store = store_of(features, labels, "data.bag_level=patient")
    base = store.features.untyped_storage().data_ptr()
    for pid, bag in store.bags.items():
        parts = [read_bag(features / f"{pid}_S{s}.h5")[0] for s in range(3)]
        assert torch.equal(bag, torch.from_numpy(np.concatenate(parts)))
        assert bag.untyped_storage().data_ptr() == base  # no copy
    blob = pickle.dumps(store)
    assert len(blob) < 4096  # the path and spans, not the features
    clone = pickle.loads(blob)
    assert all(torch.equal(clone.bags[b], store.bags[b]) for b in store.bags)


def _damage(folder: Path, how: str) -> None:
    """Damage the store in ``folder``: its index.json replaced by ``how``, or (``cut``) its
    features.npy cut short, as a copy that did not finish leaves it."""
    if how == "cut":
        data = (folder / "features.npy").read_bytes()
        (folder / "features.npy").write_bytes(data[: len(data) // 2])
    else:
        (folder / "index.json").write_text(how)


@pytest.mark.parametrize("index", ["[1]", "{not json", "cut"])
def test_a_damaged_store_is_named_and_kept(cohort, index: str) -> None:
    """A features.npy cut short used to be mapped, ending the run on 'mmap length is greater
    than file size'."""
    features, labels = cohort
    folder = store_of(features, labels).folder
    _damage(folder, index)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(UserError, match="is damaged: its (index.json|features.npy).*delete that"):
        store_of(features, labels)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files


def test_store_dir_is_used(cohort, tmp_path: Path) -> None:
    features, labels = cohort
    store = store_of(features, labels, f"data.store_dir={tmp_path / 'stores'}")
    assert store.folder.parent == tmp_path / "stores" and not (features / STORES).exists()


def test_lock_drafts_of_a_killed_builder_are_removed_when_a_store_is_built(
    cohort: tuple[Path, Path],
) -> None:
    """A builder killed between writing its lock draft and linking it leaves the draft; the
    next build removes it (a live claimant's draft stays)."""
    features, labels = cohort
    root = features / STORES
    root.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = root / ".anystore.lock.abc123.claiming"
    gone.write_text(json.dumps({**me(), "pid": dead.pid, "start": None}))
    live = root / ".anystore.lock.def456.claiming"
    live.write_text(json.dumps(me()))
    store_of(features, labels)
    assert not gone.exists() and live.exists()


RACE = """
import sys
import time
from melanoma_mil.config import FitConfig, load_config
from melanoma_mil.data.cohort import build_cohort
from melanoma_mil.data.store import open_store
keys = [f"data.features_dir={sys.argv[1]}", f"data.labels_csv={sys.argv[2]}", *sys.argv[3:]]
cfg = load_config(FitConfig, [], keys)
store = open_store(build_cohort(cfg.data).members, cfg)
print(store.folder, float(store.features.double().sum()))
"""


def test_two_processes_racing_share_one_store(tmp_path: Path) -> None:
    features, labels = make_bag_cohort(tmp_path, n_patients=60, dim=64, n_instances=(200, 400))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen([sys.executable, "-c", RACE, str(features), str(labels)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    results = {o.strip() for o, _ in outs}
    assert len(results) == 1  # the same store, the same numbers
    folder = Path(results.pop().split()[0])
    root = features / STORES
    assert [p.name for p in root.iterdir()] == [folder.name]  # no lock, no temp folder left
    # a builder killed mid-way leaves its lock (a dead pid) and its temp folder: both are
    # cleared by the next run
    shutil.rmtree(folder)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = {**me(), "pid": dead.pid, "start": None}
    (root / f".{folder.name}.lock").write_text(json.dumps(owner))
    (root / f".{folder.name}.{dead.pid}.tmp").mkdir()
    assert store_of(features, labels).folder == folder
    assert [p.name for p in root.iterdir()] == [folder.name]


def _builder_caught_writing(
    features: Path, labels: Path, root: Path, log: Path, *extra: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """A real build of the cohort's store in a subprocess, stopped (SIGSTOP) once its temp
    folder holds the reserved features.npy, and that folder (its pid in the name)."""
    with log.open("w") as err:
        args = [sys.executable, "-c", RACE, str(features), str(labels), f"data.store_dir={root}"]
        proc = subprocess.Popen([*args, *extra], stdout=err, stderr=err)
    try:
        deadline = time.monotonic() + 300  # a hung builder fails the test instead of hanging it
        ours = f".*.{proc.pid}.tmp"  # another builder's may be there already
        while not (tmps := [p for p in root.glob(ours) if (p / "features.npy").is_file()]):
            try:  # polled, not timed: its 600 bags take seconds to write
                proc.wait(timeout=0.01)
            except subprocess.TimeoutExpired:
                assert time.monotonic() < deadline, "the builder made no temp folder"
                continue
            raise AssertionError(f"the builder ended first: {log.read_text()[-2000:]}")
        proc.send_signal(signal.SIGSTOP)
        assert proc.poll() is None and tmps[0].is_dir(), "the build ended before it was caught"
        assert tmps[0].name.endswith(f".{proc.pid}.tmp")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, tmps[0]


def test_temp_folders_of_killed_builders_go_and_live_ones_stay(tmp_path: Path) -> None:
    """A builder SIGKILLed mid-build leaves a full-size temp folder: a build of another store
    in the same store_dir removes it once its builder is dead (the store's lock is stale), and
    keeps a live builder's (here or on another host) and every folder that is not ours."""
    features, labels = make_bag_cohort(tmp_path, n_patients=600, dim=8, n_instances=(20, 40))
    root = tmp_path / "stores"
    root.mkdir()
    proc, building = _builder_caught_writing(features, labels, root, tmp_path / "builder.log")
    lock = root / f".{building.name.split('.')[1]}.lock"
    try:
        size = (building / "features.npy").stat().st_size
        elsewhere = root / ".float32-7slides-0123456789ab.77.tmp"  # a live builder on another host
        elsewhere.mkdir()
        (elsewhere / "features.npy").write_bytes(b"x")
        owner = {**me(), "host": "node7", "machine": "other", "pid": 77}
        (root / ".float32-7slides-0123456789ab.lock").write_text(json.dumps(owner))
        names = [".results.123.tmp", ".float16-3slides-0123456789ab.9.tmp",
                 ".float16-3slides-abc.9.tmp", "float16-3slides-0123456789ab.9.tmp"]  # fmt: skip
        yours = [root / name for name in names]  # not ours: one holds files no builder writes
        for folder in yours:
            folder.mkdir()
            (folder / "notes.txt").write_text("mine")
        other = store_of(features, labels, f"data.store_dir={root}", "data.dtype=float32")
        assert other.folder.parent == root
        assert (building / "features.npy").stat().st_size == size  # a live builder's: kept
    finally:
        proc.kill()  # SIGKILL mid-build
        proc.wait()
    assert building.is_dir() and lock.is_file()
    sub = tmp_path / "sub.csv"  # another cohort: another store, built next
    pd.read_csv(labels).iloc[:4].to_csv(sub, index=False)
    store_of(features, sub, f"data.store_dir={root}")
    assert not building.exists()
    assert not lock.exists()  # taken from the dead builder, released
    assert elsewhere.is_dir() and all((f / "notes.txt").read_text() == "mine" for f in yours)
    # the other host's builder died: its lock's heartbeat stops, and after stale_after it goes
    then = time.time() - 2 * DEFAULT_STALE_S
    os.utime(root / ".float32-7slides-0123456789ab.lock", (then, then))
    pd.read_csv(labels).iloc[4:8].to_csv(sub, index=False)  # in no store yet: built
    store_of(features, sub, f"data.store_dir={root}")
    assert not elsewhere.exists() and all(f.is_dir() for f in yours)


def test_a_run_that_only_reuses_a_store_removes_killed_builders_temp_folders(
    tmp_path: Path,
) -> None:
    """Runs that all reuse a complete store build nothing: a builder SIGKILLed earlier in the
    same store_dir must not leave its full-size temp folder there forever. The reuse removes
    it (its builder is dead) and keeps a live builder's, with its lock."""
    features, labels = make_bag_cohort(tmp_path, n_patients=600, dim=8, n_instances=(20, 40))
    root = tmp_path / "stores"
    root.mkdir()
    sub = tmp_path / "sub.csv"
    pd.read_csv(labels).iloc[:4].to_csv(sub, index=False)
    reused = store_of(features, sub, f"data.store_dir={root}").folder
    live, building = _builder_caught_writing(
        features, labels, root, tmp_path / "live.log", "data.dtype=float32"
    )
    try:
        dead, left = _builder_caught_writing(features, labels, root, tmp_path / "dead.log")
        dead.kill()  # SIGKILL mid-build: its temp folder and its lock stay behind
        dead.wait()
        dead_lock = root / f".{left.name.split('.')[1]}.lock"
        assert left.is_dir() and dead_lock.is_file()
        size = (building / "features.npy").stat().st_size
        assert store_of(features, sub, f"data.store_dir={root}").folder == reused
        assert not left.exists() and not dead_lock.exists()
        assert (building / "features.npy").stat().st_size == size  # a live builder's: kept
        assert (root / f".{building.name.split('.')[1]}.lock").is_file()
    finally:
        live.kill()
        live.wait()


def _dead_build(root: Path, name: str) -> tuple[Path, Path]:
    """The temp folder and lock a builder of store ``name`` left when it was killed (a real
    process, dead by now)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp = root / f".{name}.{dead.pid}.tmp"
    tmp.mkdir()
    (tmp / "features.npy").write_bytes(b"x" * 1000)
    lock = root / f".{name}.lock"
    lock.write_text(json.dumps({**me(), "pid": dead.pid, "start": None}))
    return tmp, lock


def test_a_dead_build_that_cannot_be_removed_is_one_warning_not_a_failed_run(
    cohort, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Files the run may not remove (another user's, immutable: EPERM even for root) leave a
    dead build's temp folder or lock in place: the run goes on, says so once, and removes the
    dead builds it can."""
    features, labels = cohort
    root = tmp_path / "stores"
    reused = store_of(features, labels, f"data.store_dir={root}").folder
    stuck, _ = _dead_build(root, "float16-9slides-0123456789ab")
    _, locked = _dead_build(root, "float32-9slides-0123456789ab")
    gone, _ = _dead_build(root, "float16-8slides-0123456789ab")
    fixed = [stuck / "features.npy", locked]
    if subprocess.run(["chattr", "+i", *map(str, fixed)], check=False).returncode != 0:
        pytest.skip("needs root and a file system with immutable files (chattr +i)")
    try:
        with caplog.at_level(logging.INFO, logger="melanoma_mil.data.store_build"):
            assert store_of(features, labels, f"data.store_dir={root}").folder == reused
    finally:
        subprocess.run(["chattr", "-i", *map(str, fixed)], check=True)
    assert not gone.exists() and (stuck / "features.npy").is_file() and locked.is_file()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    assert str(stuck) in warnings[0].getMessage() and "Operation not permitted" in caplog.text
    assert f"removed {stuck}" not in caplog.text


def test_estimate_is_plain_arithmetic() -> None:
    need = estimate(ranks=2, largest_bag=10_000, dim=1024, itemsize=2, store_rows=1_000_000)
    per_instance = 1024 + 4 * 512 + 9 * 256
    train = 10_000 * (1024 + 2 * per_instance) * 4
    assert need.per_rank == int(BASE_CPU + train)
    assert need.private == 2 * need.per_rank and need.store == 1_000_000 * 1024 * 2
    capped = estimate(
        ranks=1, largest_bag=10_000, dim=1024, itemsize=2, store_rows=10, max_instances=1000
    )
    assert capped.per_rank < need.per_rank
    workers = estimate(ranks=2, largest_bag=100, dim=8, itemsize=4, store_rows=10, num_workers=3)
    assert workers.shm == 2 * 3 * 2 * 100 * 8 * 4
    # an ensemble keeps every member's activations until the step's backward
    three = estimate(ranks=2, largest_bag=10_000, dim=1024, itemsize=2, store_rows=10, members=3)
    assert three.per_rank == int(BASE_CPU + 10_000 * (1024 + 2 * 3 * per_instance) * 4)


def test_verdict_names_the_numbers_and_the_fix() -> None:
    need = estimate(ranks=8, largest_bag=200_000, dim=1536, itemsize=2, store_rows=10**8)
    error, _ = verdict(need, int(16 * GB), "MemAvailable")
    assert error is not None
    assert f"{need.private / GB:.1f} GB" in error and "16.0 GB" in error
    assert "trainer.devices" in error and "data.max_instances" in error
    small = estimate(ranks=1, largest_bag=1000, dim=1024, itemsize=4, store_rows=10**8)
    error, warning = verdict(small, int(64 * GB), "MemAvailable")
    assert error is None and warning is not None and "data.dtype=float16" in warning
    assert verdict(small, int(1000 * GB), "MemAvailable") == (None, None)
    shm = estimate(ranks=1, largest_bag=10**5, dim=1024, itemsize=2, store_rows=1, num_workers=4)
    error, _ = verdict(shm, int(64 * GB), "MemAvailable", shm=64 * 2**20)
    assert error is not None and "/dev/shm" in error and "data.num_workers=0" in error


def _fit_cli(features: Path, labels: Path, out: Path, *extra: str) -> list[str]:
    return [
        "fit",
        f"data.features_dir={features}",
        f"data.labels_csv={labels}",
        f"output_dir={out}",
        "trainer.accelerator=cpu",
        "logger=none",
        "cv.folds=2",
        "trainer.max_epochs=1",
        *extra,
    ]


def test_run_bigger_than_the_machine_fails_before_loading(cohort, tmp_path, capsys) -> None:
    features, labels = cohort
    # a slide of 20 million tiles: declared in the file, never written (h5 reads it as zeros)
    with h5py.File(features / "P0009.h5", "a") as f:
        del f["features"]
        f.create_dataset("features", shape=(20_000_000, 8), dtype="float16", chunks=(4096, 8))
    rc = main(
        _fit_cli(
            features,
            labels,
            tmp_path / "run",
            "trainer.devices=2",
            "trainer.accumulate_grad_batches=2",
        )
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    line = next(ln for ln in err.splitlines() if ln.startswith("error:"))
    assert "GB of private memory" in line and "20000000 tiles" in line and "available" in line
    assert not stores(features / STORES)  # nothing was built or loaded


def test_memory_budget_key_is_honoured(cohort, tmp_path, capsys) -> None:
    features, labels = cohort
    rc = main(_fit_cli(features, labels, tmp_path / "run", "data.memory_gb=0.2"))
    err = capsys.readouterr().err
    assert rc == 2 and "0.2 GB is available (data.memory_gb)" in err
    with pytest.raises(UserError, match="data.memory_gb"):
        load_config(FitConfig, [], ["data.memory_gb=0"])


SHARE = """
import sys
import time
from pathlib import Path
from melanoma_mil.config import FitConfig, load_config
from melanoma_mil.data.cohort import build_cohort
from melanoma_mil.data.datamodule import BagDataModule
from melanoma_mil.data.store import open_store

def rss():
    rows = dict(ln.split(":", 1) for ln in Path("/proc/self/status").read_text().splitlines())
    return [int(rows[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")]

keys = [f"data.features_dir={sys.argv[1]}", f"data.labels_csv={sys.argv[2]}"]
cfg = load_config(FitConfig, [], keys)
cohort = build_cohort(cfg.data)
store = open_store(cohort.members, cfg)
ids = list(store.bags)
dm = BagDataModule(store, dict.fromkeys(ids, 0), ids, [], [])
before = rss()
for bags, _, _ in dm.train_dataloader():  # every bag, as a training step gets it
    bags[0].float().sum()
after = rss()
print(after[0] - before[0], after[1] - before[1], store.nbytes())
"""


def test_reading_every_bag_costs_page_cache_not_private_memory(tmp_path: Path) -> None:
    features, labels = make_bag_cohort(tmp_path, n_patients=40, dim=512, n_instances=(1000, 1500))
    store = store_of(features, labels)  # built here; the process below only opens it
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-c", SHARE, str(features), str(labels)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    anon, file, nbytes = map(int, proc.stdout.split())
    assert nbytes == store.nbytes()
    assert file > 0.9 * nbytes  # the bags were read through the shared mapping...
    assert anon < 0.1 * 2 * nbytes  # ...not into private memory (float32: 2 x nbytes)


@pytest.mark.parametrize("bad", ["strings", "scalar", "group", "pt_dict", "pt_garbage"])
def test_malformed_files_are_named_before_anything_is_built(bad: str, cohort) -> None:
    features, labels = cohort
    (features / "P0003.h5").unlink()
    name = "P0003.pt" if bad.startswith("pt") else "P0003.h5"
    (features / "pt_files").mkdir()
    if bad == "pt_dict":
        torch.save({"features": torch.zeros(4, 8)}, features / "pt_files" / name)
    elif bad == "pt_garbage":
        (features / "pt_files" / name).write_bytes(b"not a torch file")
    else:
        with h5py.File(features / name, "w") as f:
            if bad == "group":
                f.create_group("features")
            else:
                f["features"] = np.array([[b"a"] * 8] * 3) if bad == "strings" else np.float32(1)
    with pytest.raises(UserError, match=name):
        store_of(features, labels)
    assert not stores(features / STORES)


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


def test_read_only_cache_needs_store_dir(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    if not _mount_tmpfs(ro, "size=8m"):
        pytest.skip("needs root to mount a tmpfs (a real read-only folder)")
    try:
        features, labels = make_bag_cohort(ro, n_patients=6, dim=8)
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        with pytest.raises(UserError, match="data.store_dir"):
            store_of(features, labels)
        store = store_of(features, labels, f"data.store_dir={tmp_path / 'stores'}")
        assert store.folder.parent == tmp_path / "stores" and store.bags["P0001"].shape[1] == 8
    finally:
        subprocess.run(["umount", str(ro)], check=False)


def _shared_store(
    features: Path, labels: Path, where: str, tmp_path: Path
) -> tuple[Path, list[str]]:
    """A complete store of the cohort built where a lab would share it (``where``: data.store_dir
    or the default beside the features) and the keys that find it there."""
    keys = [f"data.store_dir={tmp_path / 'stores'}"] if where == "store_dir" else []
    return store_of(features, labels, *keys).folder, keys


def _listing(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("where", ["store_dir", "default"])
def test_a_complete_store_in_a_read_only_folder_is_used_as_is(
    cohort, tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A lab's pre-built store on a read-only mount (or another user's 755 folder) is mapped as
    it is: no lock, no 'last used' stamp, no pruning or clearing of what it cannot remove, one
    log line; two processes read it at once."""
    features, labels = cohort
    folder, keys = _shared_store(features, labels, where, tmp_path)
    root = folder.parent
    legacy = root / "float16-3bags-0123456789ab"  # a stale store (older format), unused for days
    shutil.copytree(folder, legacy)
    index = json.loads((legacy / "index.json").read_text())
    (legacy / "index.json").write_text(json.dumps({**index, "format": 1}))
    _age(legacy, 2)
    _dead_build(root, "float32-9slides-0123456789ab")  # a killed builder's temp folder and lock
    before = _listing(root)
    with read_only_bind(root):
        with caplog.at_level(logging.INFO, logger="melanoma_mil.data"):
            store = store_of(features, labels, *keys)
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        args = [sys.executable, "-c", RACE, str(features), str(labels), *keys]
        procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env) for _ in range(2)]  # fmt: skip
        outs = [p.communicate(timeout=300) for p in procs]
    assert store.folder == folder
    for slide_id, bag in store.bags.items():
        assert torch.equal(bag, torch.from_numpy(read_bag(features / f"{slide_id}.h5")[0]))
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    assert {o.strip() for o, _ in outs} == {f"{folder} {float(store.features.double().sum())}"}
    assert _listing(root) == before  # nothing made, stamped or removed
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert [ln for ln in lines if str(root) in ln] == [
        f"bag store: {folder} (reused; its folder is read-only: used as is)"
    ], lines


@pytest.mark.parametrize("why", ["dtype", "edited"])
@pytest.mark.parametrize("where", ["store_dir", "default"])
def test_no_store_to_reuse_in_a_read_only_folder_is_one_line_before_training(
    cohort, tmp_path: Path, where: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A store that is missing (another dtype) or stale (a feature file edited since) cannot be
    built in a read-only store folder: `fit` says so in one line naming the folder and the fix,
    exit 2, before any fold trains, and leaves the folder as it was."""
    features, labels = cohort
    folder, keys = _shared_store(features, labels, where, tmp_path)
    root = folder.parent
    if why == "edited":
        with h5py.File(features / "P0003.h5", "a") as f:
            f["features"][0, 0] = 42.0
    extra = [*keys, "data.dtype=float32"] if why == "dtype" else keys
    before = _listing(root)
    out = tmp_path / "run"
    with read_only_bind(root):
        rc = main(_fit_cli(features, labels, out, *extra))
    captured = capsys.readouterr()
    errors = [ln for ln in captured.err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1, captured.err
    assert f"'{root}' is read-only" in errors[0] and "no bag store of" in errors[0]
    assert "data.store_dir=PATH" in errors[0] and " GB" in errors[0]
    assert "epoch" not in captured.out + captured.err
    assert not list(out.rglob("*.ckpt"))
    assert _listing(root) == before


CUT = "is damaged: its features.npy cannot be mapped (mmap length is greater than file size"
REBUILD = "delete it and run `fit` once to build it again."


@pytest.mark.parametrize(
    "how, problem, owner",
    [("index", "'{folder}' is incomplete: it has no index.json;", REBUILD),
     ("cut", "'{folder}' " + CUT, REBUILD),
     ("subset", "'{folder}' " + CUT, REBUILD),  # a store of more files than this cohort's
     ("json", "'{folder}' is damaged: its index.json cannot be read (Expecting", REBUILD),
     ("stopped", "is incomplete: only a build's temp folder '{temp}' is there;",
      "run `fit` once to build it there (a build under way: wait for it).")],
)  # fmt: skip
def test_a_damaged_store_in_a_read_only_folder_is_named_before_training(
    cohort, tmp_path: Path, how: str, problem: str, owner: str, capsys: pytest.CaptureFixture
) -> None:
    """Before: 'holds no bag store of these feature files' (a cut features.npy: a traceback).
    Now the one line names the store's folder, what is wrong with which file, and the fix."""
    features, labels = cohort
    folder, keys = _shared_store(features, labels, "store_dir", tmp_path)
    temp = folder.parent / f".{folder.name}.12345.tmp"
    if how == "index":
        (folder / "index.json").unlink()
    elif how == "stopped":
        folder.rename(temp)
    else:
        _damage(folder, "{not json" if how == "json" else "cut")
    if how == "subset":
        labels = tmp_path / "subset.csv"
        pd.read_csv(cohort[1]).iloc[:8].to_csv(labels, index=False)
    before = _listing(folder.parent)
    out = tmp_path / "run"
    with read_only_bind(folder.parent):
        rc = main(_fit_cli(features, labels, out, *keys))
    captured = capsys.readouterr()
    errors = [ln for ln in captured.err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1, captured.err
    assert errors[0].startswith(f"error: data.store_dir '{folder.parent}' is read-only (for this "
                                "user) and its bag store of these feature files "
                                + problem.format(folder=folder, temp=temp)), errors[0]  # fmt: skip
    assert errors[0].endswith("; pass data.store_dir=PATH, a writable folder with room for 0.00 "
                              f"GB, or have the folder's owner {owner}"), errors[0]  # fmt: skip
    assert "epoch" not in captured.out + captured.err and not list(out.rglob("*.ckpt"))
    assert _listing(folder.parent) == before


def test_another_users_store_folder_is_used_as_is(cohort, tmp_path: Path) -> None:
    """A store_dir of another user's (755) is read-only to this one: its complete store is
    mapped as is, and a missing one is the one-line error, not a failed lock."""
    features, labels = cohort
    folder = store_of(features, labels, f"data.store_dir={tmp_path / 'stores'}").folder
    before = _listing(folder.parent)
    # user nobody, able to read everything (as a lab's group can) but to write nothing of root's
    caps = "+dac_read_search"
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
              f"--inh-caps={caps}", f"--ambient-caps={caps}"]  # fmt: skip
    if os.geteuid() != 0 or subprocess.run([*nobody, "true"], check=False).returncode != 0:
        pytest.skip("needs root and setpriv to run a process as another user")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    args = [*nobody, sys.executable, "-c", RACE, str(features), str(labels)]
    runs = [
        [*args, f"data.store_dir={folder.parent}", *extra] for extra in ([], ["data.dtype=float32"])
    ]
    reused, missing = (subprocess.run(a, capture_output=True, text=True, env=env) for a in runs)
    assert reused.returncode == 0, reused.stderr[-2000:]
    assert reused.stdout.split()[0] == str(folder)
    assert missing.returncode != 0
    assert f"'{folder.parent}' is read-only (for this user)" in missing.stderr, missing.stderr
    assert _listing(folder.parent) == before


def test_an_edit_whose_mtime_was_set_back_gets_its_own_store(cohort) -> None:
    """`cp -p` or `touch -r` restores the mtime; the kernel-set ctime still tells the edit."""
    features, labels = cohort
    path = features / "P0003.h5"
    before = path.stat()
    first = store_of(features, labels).folder
    with h5py.File(path, "a") as f:
        f["features"][0, 0] = 42.0
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    changed = store_of(features, labels)
    assert changed.folder != first
    assert float(changed.bags["P0003"][0, 0]) == 42.0


def _age(store: Path, days: float) -> None:
    then = time.time() - days * 86400
    os.utime(store / "index.json", (then, then))


def test_stores_that_can_never_be_reused_go_once_unused_for_a_day(cohort, tmp_path) -> None:
    features, labels = cohort
    old = store_of(features, labels).folder
    other_labels = tmp_path / "other.csv"  # another cohort's store, in the same folder
    pd.read_csv(labels).iloc[:4].to_csv(other_labels, index=False)
    with h5py.File(features / "P0009.h5", "a") as f:
        f["features"][0, 0] = 7.0
    other = store_of(features, other_labels, "data.dtype=float32").folder  # no P0009 in it
    legacy = old.parent / "float16-3bags-0123456789ab"  # as named before slide counts
    shutil.copytree(old, legacy)
    index = json.loads((legacy / "index.json").read_text())
    (legacy / "index.json").write_text(json.dumps({**index, "format": 1}))
    new = store_of(features, labels).folder
    assert old.is_dir() and legacy.is_dir()  # opened within the day: kept
    for folder in (old, other, legacy):
        _age(folder, 2)
    assert store_of(features, labels).folder == new
    assert not old.exists() and not legacy.exists()
    assert other.is_dir() and new.is_dir() and len({old, other, new}) == 3
    assert not [p for p in old.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_stale_store_whose_lock_is_held_is_left(cohort) -> None:
    features, labels = cohort
    old = store_of(features, labels).folder
    with h5py.File(features / "P0001.h5", "a") as f:
        f["features"][0, 0] = 7.0
    _age(old, 2)
    (old.parent / f".{old.name}.lock").write_text(json.dumps(me()))  # a live peer's claim
    store_of(features, labels)
    assert old.is_dir()


def test_a_stale_store_whose_dead_lock_cannot_be_removed_is_one_warning(
    cohort, caplog: pytest.LogCaptureFixture
) -> None:
    """A stale store's lock left by a killed process that the run may not remove (another
    user's, immutable: EPERM even for root) keeps that store; the run goes on and says so."""
    features, labels = cohort
    old = store_of(features, labels).folder
    with h5py.File(features / "P0001.h5", "a") as f:
        f["features"][0, 0] = 7.0
    _age(old, 2)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = old.parent / f".{old.name}.lock"
    lock.write_text(json.dumps({**me(), "pid": dead.pid, "start": None}))
    if subprocess.run(["chattr", "+i", str(lock)], check=False).returncode != 0:
        pytest.skip("needs root and a file system with immutable files (chattr +i)")
    try:
        with caplog.at_level(logging.WARNING, logger="melanoma_mil.data.store_build"):
            assert store_of(features, labels).folder != old
    finally:
        subprocess.run(["chattr", "-i", str(lock)], check=True)
    assert old.is_dir()
    assert [r.getMessage() for r in caplog.records if str(old) in r.getMessage()], caplog.text
    assert len(caplog.records) == 1 and "Operation not permitted" in caplog.text


def test_a_store_of_a_newer_format_is_left_to_the_version_that_made_it(cohort) -> None:
    """Two package versions may share a store_dir: the older one cannot tell whether a newer
    format's store is still reusable, so it must not remove it."""
    features, labels = cohort
    first = store_of(features, labels).folder
    newer = first.parent / "float16-3slides-fedcba987654"  # named as `prune` looks for
    shutil.copytree(first, newer)
    index = json.loads((newer / "index.json").read_text())
    (newer / "index.json").write_text(json.dumps({**index, "format": index["format"] + 1}))
    _age(newer, 2)
    store_of(features, labels)
    assert newer.is_dir()
