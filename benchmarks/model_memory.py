"""Peak memory of every MIL model on one 100,000-tile x 1536-d bag: inference and a training step.

Each (model, mode) runs in a fresh subprocess. CPU: peak resident memory (ru_maxrss) minus the
resident memory after the bag was created, so the number is what the model adds on top of the
bag (586 MiB in float32). CUDA (--device cuda): torch.cuda.max_memory_allocated minus the bag,
under bf16 autocast as `fit` trains on GPUs. Modes: "infer" (inference_mode forward, what
heatmap/predict run) and "train" (forward + backward with the label, as a `fit` step). The
"topk warm-up" row is topk's training step during its first `model.topk_warmup` of the epochs,
which trains on every tile.

    python benchmarks/model_memory.py [--models ...] [--tiles 100000] [--dim 1536]
        [--device cpu|cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from melanoma_mil.config import MODEL_NAMES, ModelConfig
from melanoma_mil.models import build_model, feature_norm, set_progress


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


WARMUP = "topk warm-up"


def measure(name: str, mode: str, tiles: int, dim: int, device: str) -> dict[str, float]:
    """Runs in the child: build, one forward (+ backward), report peak memory and time."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name.split()[0]), dim, 2).to(device)
    if name == WARMUP:
        set_progress(model, 0, 10)  # the first of 10 epochs: warming up at the default 0.1
    x = torch.randn(tiles, dim, device=device)
    feature_norm(model).fit_stats([x[:1000]])  # as in `fit`: standardisation is not skipped
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = rss_mb()
    t0 = time.perf_counter()
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    if mode == "infer":
        with torch.inference_mode(), amp:
            out = model.eval()(x)
    else:
        y = torch.tensor(1, device=device)
        with amp:
            out = model.train()(x, y)
            loss = F.cross_entropy(out.logits.float()[None], y[None])
            if out.instance_loss is not None:
                loss = loss + out.instance_loss
        loss.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert torch.isfinite(out.logits.float()).all()
    return {"added_mb": peak - base, "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    p.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    p.add_argument("--tiles", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(*args.child, args.tiles, args.dim, args.device)))
        return
    bag_mb = args.tiles * args.dim * 4 / 2**20
    print(f"{args.tiles} tiles x {args.dim} (float32 bag {bag_mb:.0f} MB), {args.device}, "
          f"{args.threads} thread(s); memory added on top of the bag:")  # fmt: skip
    print(f"{'model':<16}" + "".join(f"{m + ' MB':>12}{m + ' s':>10}" for m in args.modes))
    for name in args.models + ([WARMUP] if "topk" in args.models else []):
        cells = []
        for mode in args.modes:
            if name == WARMUP and mode == "infer":  # inference never warms up: topk's row
                cells.append(f"{'-':>12}{'-':>10}")
                continue
            cmd = [sys.executable, __file__, "--child", name, mode, "--tiles", str(args.tiles),
                   "--dim", str(args.dim), "--device", args.device,
                   "--threads", str(args.threads)]  # fmt: skip
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode:  # say why and go on: one failing model must not hide the others
                print(f"{name} {mode} failed:\n{run.stderr[-2000:]}", flush=True)
                cells.append(f"{'failed':>12}{'-':>10}")
                continue
            res = json.loads(run.stdout)
            cells.append(f"{res['added_mb']:>12.0f}{res['seconds']:>10.1f}")
        print(f"{name:<16}" + "".join(cells), flush=True)


if __name__ == "__main__":
    main()
