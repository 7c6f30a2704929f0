"""`extract` on a GPU: end-to-end tiles/s against the encoder's own forward, and GPU utilisation.

For resnet50_trunc (CLAM's baseline) and a ViT-L/16 (UNI's architecture), random weights: the
forward on random tensors at the batch `extract` chooses (the ceiling), then `run_extract` on a
synthetic JPEG-tiled slide (reader processes, writer thread, bf16 weights, all defaults), while
a thread samples GPU utilisation (NVML through torch, else nvidia-smi). Prints extract/forward
(the pipeline's overhead: 1.0 = the GPU never waits for reads, copies or writes) and the mean
utilisation during extraction, with reader processes reading parts of a batch (the default)
and whole batches (as before), and the slide's read rate on one core. Without CUDA it says so
and exits 0.

    python benchmarks/extract_gpu.py [--size 8192] [--encoders resnet50_trunc uni] [--seconds 10]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import torch
from extract_throughput import TILE, make_slide

from melanoma_mil.config import EncoderConfig, ExtractConfig
from melanoma_mil.encoders import build_encoder, resolve_precision
from melanoma_mil.features import placement
from melanoma_mil.features.data import SlideBatches
from melanoma_mil.features.hardware import choose_batch
from melanoma_mil.features.run import run_extract
from melanoma_mil.tiling.coords import read_coords


def utilisation() -> float | None:
    try:
        return float(torch.cuda.utilization())
    except Exception:  # no pynvml: ask nvidia-smi
        if shutil.which("nvidia-smi") is None:
            return None
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
             "-i", str(torch.cuda.current_device())],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        try:
            return float(out.stdout.split()[0])
        except (IndexError, ValueError):
            return None


class Sampler(threading.Thread):
    """GPU utilisation every 0.2 s until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            u = utilisation()
            if u is not None:
                self.samples.append(u)


def forward_rate(name: str, batch: int, seconds: float) -> tuple[float, str]:
    enc = build_encoder(EncoderConfig(name=name, pretrained=False), device="cuda")
    precision = resolve_precision("auto", enc.spec, enc.device)
    enc.low_precision_weights(precision, TILE)
    x = torch.randint(0, 256, (batch, 3, TILE, TILE), dtype=torch.uint8, device="cuda")
    enc.encode(x, TILE, precision)
    torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        enc.encode(x, TILE, precision)
        n += batch
    torch.cuda.synchronize()
    return n / (time.perf_counter() - start), precision


def read_rate(root: Path) -> float:
    """tiles/s of reading the slide in this process, one core: a reader process's ceiling."""
    grid = read_coords(root / "tiles" / "coords" / "bench.h5")  # as make_slide wrote it
    data = SlideBatches(root / "slides" / "bench.tif", grid, 256)
    data.open()
    start = time.perf_counter()
    n = sum(len(data.read(i)) for i in range(len(data)))
    data.close()
    return n / (time.perf_counter() - start)


def extract_rate(cfg: ExtractConfig, root: Path, name: str) -> tuple[float, float, str]:
    """(tiles/s of the slide as `extract` reports it, mean GPU utilisation, reader)."""
    sampler = Sampler()
    sampler.start()
    assert run_extract(cfg) == 0
    sampler.done.set()
    sampler.join()
    row = pd.read_csv(next((root / "f").glob(f"{name}-*/extract.csv"))).iloc[0]
    util = sum(sampler.samples) / len(sampler.samples) if sampler.samples else float("nan")
    return row["n_tiles"] / row["seconds"], util, row["reader"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=8192, help="slide side in px (256-px tiles)")
    ap.add_argument("--encoders", nargs="+", default=["resnet50_trunc", "uni"])
    ap.add_argument("--seconds", type=float, default=10.0, help="of the forward alone")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("extract_gpu: no CUDA device here, nothing measured (run it on a GPU machine).")
        return
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, slide {args.size}^2 px")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_slide(root, args.size)
        print(f"  reading alone: {read_rate(root):.0f} tiles/s on one core")
        for name in args.encoders:
            cfg = ExtractConfig(coords_dir=str(root / "tiles"), output_dir=str(root / "f"),
                                encoder=EncoderConfig(name=name, pretrained=False),
                                overwrite=True)  # fmt: skip
            probe = build_encoder(cfg.encoder, device="cuda")
            precision = resolve_precision("auto", probe.spec, probe.device)
            batch = choose_batch(cfg, probe, precision, TILE)
            del probe
            torch.cuda.empty_cache()
            fwd, precision = forward_rate(name, batch, args.seconds)
            print(f"  {name} ({precision}, batch {batch}): forward {fwd:.0f} tiles/s")
            parts = len(placement.read_parts(batch, TILE * TILE * 3))
            default = placement.READ_PART_BYTES
            for label, most in ((f"{parts} parts a batch", default), ("whole batches", 1 << 62)):
                placement.READ_PART_BYTES = most  # whole batches: how reads were split before
                rate, util, reader = extract_rate(cfg, root, name)
                print(f"    extract, reader processes read {label:<16}: {rate:6.0f} tiles/s, "
                      f"extract/forward {rate / fwd:.2f}, GPU utilisation {util:3.0f}%, "
                      f"reader {reader}")  # fmt: skip
            placement.READ_PART_BYTES = default


if __name__ == "__main__":
    main()
