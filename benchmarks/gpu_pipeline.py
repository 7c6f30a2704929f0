"""The CLI on a GPU end to end: `demo` (tile, extract, fit, heatmap, evaluate with every device
left on auto), then on the demo's feature cache `fit` (its config, trainer.accelerator set) and
`predict` with heatmaps, each on --device and on the CPU, to show that the GPU paths run and
agree with the CPU's.

Prints each command's wall seconds, the CPU / --device time ratios, both fits' pooled AUC, the
largest difference in any probability between the two predicts of the demo's run, whether every
predicted class agrees, and the log lines that name a device or precision. Without CUDA it says so
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

SHOWN = (
    "trained on",
    "fold models on",
    "device",
    "cuda",
    "bf16",
    "precision",
)  # log lines worth printing


def cli(args: list[str], log: Path) -> float:
    """`python -m melanoma_mil ARGS`, output into ``log``: wall seconds (exits on a failure)."""
    start = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.call([sys.executable, "-m", "melanoma_mil", *args], stdout=out, stderr=out)
    wall = time.perf_counter() - start
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        sys.exit(f"gpu_pipeline.py: '{args[0]}' exited {rc} after {wall:.0f} s ({log}):\n{tail}")
    return wall


def device_lines(log: Path) -> list[str]:
    """The log lines that say which device and precision a command used."""
    lines = [ln.strip() for ln in log.read_text().splitlines() if any(k in ln for k in SHOWN)]
    folds = {
        "fit folds " + ln[ln.index("trained on") :].rstrip(")")
        for ln in lines
        if "trained on" in ln
    }
    return sorted(folds | {ln[:160] for ln in lines if "trained on" not in ln})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/melanoma_mil_gpu_pipeline"))
    ap.add_argument(
        "--device", default="cuda", choices=("cuda", "cpu"), help="cpu: check the script"
    )
    ap.add_argument("--demo", nargs="*", default=[], help="extra demo key=value settings")
    a = ap.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_pipeline.py: no CUDA device here, nothing measured (--device cpu: a check).")
        return
    a.out.mkdir(parents=True, exist_ok=True)
    demo = a.out / "demo"
    settings = ["demo", f"output_dir={demo}", "overwrite=true", *a.demo]
    walls = {"demo": cli(settings, a.out / "demo.log")}
    (cache,) = [p for p in (demo / "features").iterdir() if p.is_dir()]
    tables, aucs = {}, {}
    for device in dict.fromkeys([a.device, "cpu"]):
        fit = a.out / f"fit_{device}"
        accelerator = "cpu" if device == "cpu" else "gpu"
        walls[f"fit {device}"] = cli(
            ["fit", "--config", str(demo / "fit" / "config.yaml"), f"output_dir={fit}",
             f"trainer.accelerator={accelerator}", "overwrite=true"],
            a.out / f"{fit.name}.log",
        )  # fmt: skip
        aucs[device] = [ln for ln in (a.out / f"{fit.name}.log").read_text().splitlines()
                        if ln.startswith("pooled AUC")]  # fmt: skip
        out = a.out / f"predict_{device}"
        walls[f"predict {device}"] = cli(
            ["predict", f"run_dir={demo / 'fit'}", f"slides_dir={demo / 'cohort' / 'slides'}",
             f"features_dir={cache}", f"output_dir={out}", f"device={device}", "overwrite=true"],
            a.out / f"{out.name}.log",
        )  # fmt: skip
        tables[device] = pd.read_csv(out / "predictions.csv").set_index("slide_id").sort_index()
        drawn = len(list(out.glob("*/heatmap.png")))
        print(f"predict {device}: {len(tables[device])} slides, {drawn} heatmaps drawn")
    for name, wall in walls.items():
        print(f"{name}: {wall:.1f} s wall")
    for name in ("demo", *(f"{c}_{a.device}" for c in ("fit", "predict"))):
        print(f"{name} device lines:", *device_lines(a.out / f"{name}.log"), sep="\n  ")
    for device, lines in aucs.items():
        print(f"fit {device}:", *lines)
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
