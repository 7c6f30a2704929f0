"""`extract` over many small slides: what each slide costs beyond its tiles.

Cohorts of small slides (biopsies, TMA cores) make per-slide overhead visible: opening the slide,
the coords file, the h5, and with reader processes (the GPU default) starting and stopping them.
Runs the `extract` command in a fresh process per reader mode, as a user would, on the same
generated slides; prints tiles/s over the slides' own times (extract.csv) and over the whole
command (imports and start-up included), against the encoder's pure forward speed.

    python benchmarks/extract_many_slides.py [--slides 8] [--size 2048] [--modes 0 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from extract_throughput import TILE, forward_rate, make_slide

from melanoma_mil.config import EncoderConfig
from melanoma_mil.encoders import build_encoder, resolve_precision
from melanoma_mil.features.hardware import keep_freed_memory


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--size", type=int, default=2048, help="slide side, px")
    ap.add_argument("--modes", type=int, nargs="+", default=[0, 2], help="num_workers values")
    ap.add_argument("--encoder", default="resnet18_imagenet")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    per_slide = (args.size // TILE) ** 2
    n = per_slide * args.slides
    keep_freed_memory()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        coords = root / "tiles" / "coords"
        coords.mkdir(parents=True)
        for i in range(args.slides):
            make_slide(root / f"s{i}", args.size)
            (root / f"s{i}" / "tiles" / "coords" / "bench.h5").rename(coords / f"slide{i}.h5")
        enc = build_encoder(EncoderConfig(name=args.encoder, pretrained=False))
        precision = resolve_precision("auto", enc.spec, torch.device("cpu"))
        fwd = forward_rate(enc.module, n, args.batch, precision)
        print(
            f"{args.slides} slides x {per_slide} tiles of {TILE} px, {args.encoder} ({precision}), "
            f"batch {args.batch}, {torch.get_num_threads()} threads; forward {fwd:.1f} tiles/s"
        )
        for workers in args.modes:
            out = root / f"features{workers}"
            cmd = [
                sys.executable, "-m", "melanoma_mil", "extract", f"coords_dir={root / 'tiles'}",
                f"output_dir={out}", f"encoder.name={args.encoder}", "encoder.pretrained=false",
                f"batch_size={args.batch}", f"num_workers={workers}", "device=cpu",
            ]  # fmt: skip
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            wall = time.perf_counter() - start
            slides = sum(pd.read_csv(p)["seconds"].sum() for p in out.glob("*/extract.csv"))
            mode = f"{workers} reader processes" if workers else "reader threads"
            print(
                f"  {mode:20s}: {n / slides:6.1f} tiles/s over the slides (extract/forward "
                f"{n / slides / fwd:.2f}, {1e3 * (slides / args.slides - per_slide / fwd):.0f} ms "
                f"per slide beyond the forward); whole command {wall:.1f} s"
            )


if __name__ == "__main__":
    main()
