"""GPU training epoch of `fit` vs a bare torch loop: bags/s and GPU utilisation (needs CUDA).

One process, one generated cohort, the same model, optimizer, precision (bf16 autocast where
supported, as `fit` picks) and bag order:
  bare       plain loop over float32 bags already in GPU memory (the limit),
  resident   `fit`'s module + DataModule with the whole bag store copied to the GPU once
             (the default when it takes at most half the free GPU memory),
  pinned     the same with the store left in host memory: each bag goes through pinned memory
             with a non-blocking copy (what runs when the store does not fit on the GPU).
Variants alternate for --rounds rounds. GPU utilisation is sampled every 0.1 s (NVML through
torch.cuda.utilization, else nvidia-smi) while each epoch runs. Without CUDA it says so and
exits 0: nothing here measures CPUs.

    python benchmarks/fit_gpu.py [--bags 2000 --min-n 50 --max-n 500 --dim 1024]
    python benchmarks/fit_gpu.py --bags 300 --min-n 2000 --max-n 20000 --dim 1536
"""

from __future__ import annotations

import argparse
import os
import subprocess
import threading
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from train_throughput import fit_epochs, seeded_model

from melanoma_mil.config import DataConfig, FitConfig
from melanoma_mil.data import datamodule
from melanoma_mil.data.cohort import build_cohort
from melanoma_mil.data.store import open_store
from melanoma_mil.data.synthetic import make_bag_cohort

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # `fit` trains deterministically


def utilisation() -> int | None:
    try:
        return int(torch.cuda.utilization())
    except Exception:  # no NVML bindings: ask nvidia-smi
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 "-i", str(torch.cuda.current_device())],
                capture_output=True, text=True, timeout=5,
            )  # fmt: skip
            return int(out.stdout.split()[0])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return None


class Sampler(L.Callback):
    """GPU utilisation samples while training epochs run (also usable around a bare loop)."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            u = utilisation()
            if u is not None:
                self.samples.append(u)

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.current_epoch > 0:  # the first epoch warms up (and copies the store)
            self.start()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.current_epoch > 0:
            torch.cuda.synchronize()
            self.stop()

    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else float("nan")


def bare_epochs(
    bags: list[torch.Tensor], labels: list[int], dim: int, epochs: int, sampler: Sampler
) -> list[float]:
    """A plain loop over bags in GPU memory, AdamW and autocast as `fit` uses them."""
    device = bags[0].device
    model = seeded_model(dim).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-5, foreach=True)
    ys = torch.tensor(labels, device=device)
    bf16 = torch.cuda.is_bf16_supported()
    torch.manual_seed(1)
    times = []
    for epoch in range(epochs):
        if epoch:
            sampler.start()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in torch.randperm(len(labels)).tolist():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                out = model(bags[i])
            loss = F.cross_entropy(out.logits.float()[None], ys[i : i + 1])
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if epoch:
            sampler.stop()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bags", type=int, default=2000)
    ap.add_argument("--min-n", type=int, default=50)
    ap.add_argument("--max-n", type=int, default=500)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/melanoma_mil_bench_gpu"))
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("fit_gpu.py: no CUDA device here, nothing measured (this benchmark is GPU-only).")
        return
    root = a.out / f"{a.bags}x{a.min_n}-{a.max_n}x{a.dim}"
    if not (root / "labels.csv").is_file():
        make_bag_cohort(root, n_patients=a.bags, dim=a.dim, n_instances=(a.min_n, a.max_n))
    data = DataConfig(features_dir=str(root / "features"), labels_csv=str(root / "labels.csv"))
    cohort = build_cohort(data)
    store = open_store(cohort.members, FitConfig(data=data))
    ids = list(store.bags)
    label_of = dict(zip(cohort.bags["bag_id"], cohort.bags["label"].astype(int), strict=True))
    labels = [label_of[b] for b in ids]
    on_gpu = [store.bags[b].to("cuda").float() for b in ids]
    precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    print(
        f"{torch.cuda.get_device_name()}; {len(ids)} bags of {a.min_n}-{a.max_n} tiles x "
        f"{a.dim} (store {store.nbytes() / 1e9:.2f} GB float16), {precision}, "
        f"{a.rounds} rounds of {a.epochs} epochs, warm = epochs after the first"
    )
    results: dict[str, tuple[list[float], list[Sampler]]] = {}
    share = datamodule.GPU_STORE_SHARE
    for _ in range(a.rounds):
        for name in ("bare", "resident", "pinned"):
            sampler = Sampler()
            if name == "bare":
                times = bare_epochs(on_gpu, labels, a.dim, a.epochs, sampler)
            else:
                datamodule.GPU_STORE_SHARE = share if name == "resident" else 0.0
                store.device_features.clear()
                times = fit_epochs(
                    store, ids, label_of, a.epochs, "gpu", precision, callbacks=(sampler,)
                )
            warm, samplers = results.setdefault(name, ([], []))
            warm += times[1:]
            samplers.append(sampler)
    bare = min(results["bare"][0])
    for name, (times, samplers) in results.items():
        best = min(times)
        util = sum(s.mean() for s in samplers) / len(samplers)
        print(f"{name:<9} {best:7.2f} s/epoch  {len(ids) / best:8.0f} bags/s  "
              f"GPU utilisation {util:5.1f}%  {best / bare:5.2f}x bare")  # fmt: skip


if __name__ == "__main__":
    main()
