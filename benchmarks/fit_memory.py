"""Private memory of a 2-rank DDP `fit` (CPU, gloo): shared memory-mapped store vs per-rank RAM.

Runs the real command, ``python -m melanoma_mil fit ... trainer.devices=2 trainer.strategy=ddp``,
on a generated cohort whose bags take --gb GB as float32 and on a tiny cohort, samples every
0.1 s the RssAnon (private, anonymous memory) of every process of the run from /proc, and
prints the peak of the ranks' summed RssAnon for each cohort, their difference, and that
difference over the float32 size of the bags (target < 0.3; loading every bag into each rank's
RAM as float32 gives >= 2.0 on 2 ranks). ``--pythonpath`` runs another checkout (e.g. before
the store) with the same cohorts; ``--compare RUN`` checks predictions.csv against another run,
``--single`` against a 1-device run with the same ``trainer.accumulate_grad_batches``.

    python benchmarks/fit_memory.py [--gb 1.0 --devices 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pandas as pd

from melanoma_mil.data.synthetic import make_bag_cohort

TILES = (200, 300)  # tiles per bag; bags x 250 x dim x 4 bytes = the float32 size


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _tree(root: int) -> list[int]:
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += kids.get(pid, [])
    return out


def _rss_anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(cmd: list[str], env: dict[str, str], cwd: str | None) -> tuple[int, int, float]:
    """(peak summed RssAnon over the run's processes, most processes seen at once, seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak, most = 0, 0
    while proc.poll() is None:
        pids = [p for p in _tree(proc.pid) if _rss_anon(p)]
        peak, most = max(peak, sum(_rss_anon(p) for p in pids)), max(most, len(pids))
        time.sleep(0.1)
    log = proc.stdout.read().decode() if proc.stdout else ""
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}):\n{log[-3000:]}")
    return peak, most, time.perf_counter() - start


def float32_bytes(features: Path) -> int:
    """The cohort's bags as float32: tiles x dim x 4, from the files' shapes."""
    total = 0
    for path in features.glob("*.h5"):
        with h5py.File(path, "r") as f:
            n, d = f["features"].shape
            total += n * d * 4
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gb", type=float, default=1.0, help="float32 size of the big cohort")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--accumulate", type=int, default=None,
                    help="trainer.accumulate_grad_batches (default: --devices)")  # fmt: skip
    ap.add_argument("--single", action="store_true",
                    help="also fit the big cohort on 1 device and compare")  # fmt: skip
    ap.add_argument("--out", type=Path, default=Path("/tmp/melanoma_mil_bench_memory"))
    ap.add_argument("--pythonpath", default=None, help="checkout to run (default: this one)")
    ap.add_argument("--compare", type=Path, default=None, help="run dir to compare predictions")
    a = ap.parse_args()
    n_bags = round(a.gb * 1e9 / (sum(TILES) / 2 * a.dim * 4))
    cohorts = {
        "tiny": (12, (20, 60)),
        "big": (n_bags, TILES),
    }
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if a.pythonpath:
        env["PYTHONPATH"] = a.pythonpath
    tag = "other" if a.pythonpath else "this"
    peaks, sizes = {}, {}
    for name, (bags, tiles) in cohorts.items():
        root = a.out / f"{name}_{bags}x{tiles[0]}-{tiles[1]}x{a.dim}"
        if not (root / "labels.csv").is_file():
            make_bag_cohort(root, n_patients=bags, dim=a.dim, n_instances=tiles)
        out = a.out / f"run_{tag}_{name}"
        shutil.rmtree(out, ignore_errors=True)  # this script's own scratch run from before
        cmd = [
            sys.executable, "-m", "melanoma_mil", "fit",
            f"data.features_dir={root / 'features'}", f"data.labels_csv={root / 'labels.csv'}",
            f"output_dir={out}", "logger=none", "cv.folds=2",
            "trainer.max_epochs=1", "trainer.min_epochs=1", "trainer.accelerator=cpu",
            f"trainer.devices={a.devices}", "trainer.strategy=ddp",
            f"trainer.accumulate_grad_batches={a.accumulate or a.devices}",
        ]  # fmt: skip
        peak, procs, secs = run(cmd, env, a.pythonpath)  # `-m` imports from the cwd
        peaks[name] = peak
        f32 = float32_bytes(root / "features")
        sizes[name] = f32
        print(f"{name:>4}: {bags} bags, ~{f32 / 1e9:.2f} GB as float32; {procs} processes; "
              f"peak summed RssAnon {peak / 1e9:.2f} GB; {secs:.0f} s")  # fmt: skip
        if name != "big":
            continue
        mine = pd.read_csv(out / "predictions.csv")
        if a.compare:
            ref = pd.read_csv(a.compare / "predictions.csv")
            print(f"predictions vs {a.compare}: {'identical' if mine.equals(ref) else 'DIFFER'}")
        if a.single:
            one = a.out / f"run_{tag}_big_1device"
            shutil.rmtree(one, ignore_errors=True)
            single = [c for c in cmd if not c.startswith(("output_dir=", "trainer.devices="))]
            run([*single, f"output_dir={one}", "trainer.devices=1"], env, a.pythonpath)
            ref = pd.read_csv(one / "predictions.csv")
            same = "identical" if mine.equals(ref) else "DIFFER"
            print(f"predictions of {a.devices} ranks vs 1 process (same accumulation): {same}")
    f32 = sizes["big"]
    extra = peaks["big"] - peaks["tiny"]
    print(f"{a.devices} ranks: private memory above the tiny cohort {extra / 1e9:.3f} GB = "
          f"{extra / f32:.3f} x the float32 bags (target < 0.3)")  # fmt: skip


if __name__ == "__main__":
    main()
