"""Training-epoch time of `fit` vs a bare loop over bags in RAM (the limit) and a disk loop.

One process, one generated cohort, same model, optimizer and bag order for all three:
  bare   plain torch loop over float32 bags already in RAM (what no framework can beat),
  fit    our Lightning module + DataModule over the memory-mapped bag store (what `fit` runs
         each epoch, validation excluded),
  disk   plain loop that reads each bag from its h5 file every epoch (what CLAM does).
The three alternate for --rounds rounds (drift in machine speed hits all alike); prints every
warm epoch (after the first of a round), the best of each, and the ratios.

    python benchmarks/train_throughput.py [--bags 200 --min-n 2000 --max-n 10000 --dim 1024]
    python benchmarks/train_throughput.py --bags 2000 --min-n 50 --max-n 500 --target 1.3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

from melanoma_mil.config import DataConfig, FitConfig, ModelConfig, OptimConfig
from melanoma_mil.data.bags import read_bag
from melanoma_mil.data.cohort import build_cohort
from melanoma_mil.data.datamodule import BagDataModule
from melanoma_mil.data.store import open_store
from melanoma_mil.data.synthetic import make_bag_cohort
from melanoma_mil.models import build_model
from melanoma_mil.training.module import MILModule

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


class EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # GPU work is asynchronous: time what has run
        self.start = clock()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(clock() - self.start)


def seeded_model(dim: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(), dim, 2)


def plain_epochs(
    get_bag: Callable[[int], torch.Tensor], labels: list[int], model: torch.nn.Module, epochs: int
) -> list[float]:
    """Seconds per epoch of a bare torch loop (AdamW as `fit`), bags in a seeded random order."""
    model.train()
    torch.manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-5, foreach=True)
    times = []
    for _ in range(epochs):
        start = clock()
        for i in torch.randperm(len(labels)).tolist():
            out = model(get_bag(i))
            loss = F.cross_entropy(out.logits[None], torch.tensor([labels[i]]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.append(clock() - start)
    return times


def fit_epochs(
    store,
    ids: list[str],
    labels: dict[str, int],
    epochs: int,
    accelerator: str = "cpu",
    precision: str = "32-true",
    callbacks: tuple[L.Callback, ...] = (),
) -> list[float]:
    """Seconds per training epoch of `fit`'s module and DataModule, with `fit`'s CSV logger
    writing every step (validation off: it is not part of the epoch compared)."""
    L.seed_everything(0, verbose=False)
    dm = BagDataModule(store, labels, ids, [], [])
    module = MILModule.create(store.dim, 2, ModelConfig(), OptimConfig(), None, epochs)
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as logs:
        trainer = L.Trainer(
            max_epochs=epochs,
            accelerator=accelerator,
            devices=1,
            precision=precision,
            logger=CSVLogger(logs),
            log_every_n_steps=1,
            enable_checkpointing=False,
            callbacks=[timer, *callbacks],
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_progress_bar=False,
            enable_model_summary=False,
            deterministic=True,
        )
        trainer.fit(module, datamodule=dm)
    return timer.times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bags", type=int, default=200)
    ap.add_argument("--min-n", type=int, default=2000)
    ap.add_argument("--max-n", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="bare/fit/disk alternations")
    ap.add_argument("--no-disk", action="store_true", help="skip the h5-reading loop")
    ap.add_argument("--target", type=float, default=1.15, help="fit / bare target printed")
    ap.add_argument("--out", type=Path, default=Path("/tmp/melanoma_mil_bench_train"))
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall",
                    help="cpu: process CPU seconds (steadier on a loaded machine)")  # fmt: skip
    a = ap.parse_args()
    global clock
    clock = CLOCKS[a.clock]
    root = a.out / f"{a.bags}x{a.min_n}-{a.max_n}x{a.dim}"
    if not (root / "labels.csv").is_file():
        make_bag_cohort(root, n_patients=a.bags, dim=a.dim, n_instances=(a.min_n, a.max_n))
    data = DataConfig(features_dir=str(root / "features"), labels_csv=str(root / "labels.csv"))
    cohort = build_cohort(data)
    store = open_store(cohort.members, FitConfig(data=data))
    ids = list(store.bags)
    in_ram = {b: store.bags[b].float() for b in ids}  # the bare loop's bags: float32 copies
    label_of = dict(zip(cohort.bags["bag_id"], cohort.bags["label"].astype(int), strict=True))
    labels = [label_of[b] for b in ids]
    paths = [cohort.members[b][0][1] for b in ids]
    tiles = sum(store.bags[b].shape[0] for b in ids)
    print(
        f"cohort: {len(ids)} bags, {tiles} tiles x {a.dim} (float16 on disk and in the store), "
        f"{torch.get_num_threads()} threads, {a.clock} clock, "
        f"{a.rounds} rounds of {a.epochs} epochs each, "
        "warm = best epoch after the first of each round"
    )

    bare, ours, disk = [], [], []
    for _ in range(a.rounds):  # alternate, so a drift in machine speed hits all three alike
        bare += plain_epochs(lambda i: in_ram[ids[i]], labels, seeded_model(a.dim), a.epochs)[1:]
        ours += fit_epochs(store, ids, label_of, a.epochs)[1:]
        if a.no_disk:
            continue
        disk += plain_epochs(
            lambda i: torch.from_numpy(read_bag(paths[i])[0]).float(),
            labels,
            seeded_model(a.dim),
            a.epochs,
        )[1:]
    runs = [("bare", bare), ("fit", ours)] + ([] if a.no_disk else [("disk", disk)])
    print("warm epochs (s): " + "; ".join(
        f"{n} {', '.join(f'{t:.2f}' for t in ts)}" for n, ts in runs
    ))  # fmt: skip
    best = {n: min(ts) for n, ts in runs}
    names = {"bare": "bare loop, bags in RAM", "fit": "fit (Lightning)",
             "disk": "loop reading h5 each epoch"}  # fmt: skip
    for n, t in best.items():
        print(f"{names[n]:<28} {t:7.2f} s/epoch  {tiles / t:9.0f} tiles/s  "
              f"{t / best['bare']:5.2f}x bare")  # fmt: skip
    ratio = best["fit"] / best["bare"]
    tail = "" if a.no_disk else f"; disk / fit = {best['disk'] / best['fit']:.2f}"
    print(f"fit / bare = {ratio:.3f} (target <= {a.target}){tail}")


if __name__ == "__main__":
    main()
