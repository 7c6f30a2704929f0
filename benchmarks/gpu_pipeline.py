"""The CLI on a GPU end to end: `demo` (tile, extract, fit, heatmap, evaluate with every device
left on auto), then on the demo's feature cache `fit` (its config, trainer.accelerator set) and
`predict` with heatmaps, each on --device and on the CPU, to show that the GPU paths run and
agree with the CPU's.

Prints each command's wall seconds and the log lines that name a device or precision as it goes
(both fits' pooled AUC too), then the largest difference in any probability between the two
predicts of the demo's run, whether every predicted class agrees, and the CPU / --device time
ratios. Without CUDA it says so
and exits 0, unless --device cpu is given (a check of this script, nothing measured).

    python benchmarks/gpu_pipeline.py [--out DIR] [--device cuda|cpu] [--demo key=value ...]
    python benchmarks/gpu_pipeline.py --device cpu --demo n_slides=8 slide_size=2048 max_epochs=2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from melanoma_mil import rundir

# log lines that name a device or precision (not output paths, which hold "cuda" here)
SHOWN = ("trained on", "fold models on", " on cuda", " on cpu", "bf16", "precision")


def cli(args: list[str], log: Path) -> float:
    """`python -m melanoma_mil ARGS`, output into ``log``: wall seconds, printed at once (so a
    run cut by a time limit keeps what it measured); exits on a failure."""
    start = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.call([sys.executable, "-m", "melanoma_mil", *args], stdout=out, stderr=out)
    wall = time.perf_counter() - start
    print(f"{args[0]} ({log.stem}): {wall:.1f} s wall, exit {rc}", flush=True)
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        sys.exit(f"gpu_pipeline.py: '{args[0]}' exited {rc} after {wall:.0f} s ({log}):\n{tail}")
    return wall


def brief(line: str) -> str:
    """A fit's fold line as its device part (the same for every fold), other lines capped."""
    if "trained on" in line:
        return "fit folds " + line[line.index("trained on") :].rstrip(")")
    return line[:160]


def show(log: Path, *starts: str) -> None:
    """Print the log's lines that name a device or precision, once each, then those that begin
    with any of ``starts``."""
    lines = [ln.strip() for ln in log.read_text().splitlines()]
    named = sorted({brief(ln) for ln in lines if any(k in ln for k in SHOWN)})
    for line in [*named, *(ln for ln in lines if ln.startswith(starts))]:
        print(f"  {line}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/melanoma_mil_gpu_pipeline"))
    ap.add_argument(
        "--device", default="cuda", choices=("cuda", "cpu"), help="cpu: check the script"
    )
    ap.add_argument("--demo", nargs="*", default=[], help="extra demo key=value settings")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_pipeline.py: no CUDA device here, nothing measured (--device cpu: a check).")
        return
    a.out.mkdir(parents=True, exist_ok=True)
    demo = a.out / "demo"
    settings = ["demo", f"output_dir={demo}", "overwrite=true", *a.demo]
    walls = {"demo": cli(settings, a.out / "demo.log")}
    show(a.out / "demo.log")
    run = rundir.load_run(demo / "fit")  # the demo's fit: its settings and feature cache
    tables = {}
    for device in dict.fromkeys([a.device, "cpu"]):
        fit = a.out / f"fit_{device}"
        accelerator = "cpu" if device == "cpu" else "gpu"
        walls[f"fit {device}"] = cli(
            ["fit", "--config", str(run.run_dir / rundir.CONFIG), f"output_dir={fit}",
             f"trainer.accelerator={accelerator}", "overwrite=true"],
            a.out / f"{fit.name}.log",
        )  # fmt: skip
        show(a.out / f"{fit.name}.log", "pooled AUC")
        out = a.out / f"predict_{device}"
        walls[f"predict {device}"] = cli(
            ["predict", f"run_dir={run.run_dir}", f"slides_dir={demo / 'cohort' / 'slides'}",
             f"features_dir={run.config.data.features_dir}", f"output_dir={out}",
             f"device={device}", "overwrite=true"],
            a.out / f"{out.name}.log",
        )  # fmt: skip
        show(a.out / f"{out.name}.log")
        tables[device] = pd.read_csv(out / "predictions.csv").set_index("slide_id").sort_index()
        drawn = len(list(out.glob("*/heatmap.png")))
        print(f"  {len(tables[device])} slides, {drawn} heatmaps drawn", flush=True)
    gpu, cpu = tables[a.device], tables["cpu"]
    probs = [c for c in gpu.columns if c.startswith("prob")]
    gap = (gpu[probs] - cpu[probs]).abs().to_numpy().max()
    same = (gpu["pred"] == cpu["pred"]).mean()
    print(f"predict {a.device} vs cpu: max |prob difference| {gap:.2e} over {len(probs)} columns;")
    print(f"  predicted class agrees on {same:.0%} of {len(gpu)} slides")
    for name in ("fit", "predict"):
        ratio = walls[f"{name} cpu"] / walls[f"{name} {a.device}"]
        print(f"{name} cpu / {a.device} wall ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
