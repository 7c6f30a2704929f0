"""The table `extract` ends with: every slide of the cohort (done, empty, failed, not reached,
no coords file), printed and written as extract.csv into each cache folder it wrote; its exit
code says whether every slide is done."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from melanoma_mil.features.data import Job
from melanoma_mil.features.queue import SlideQueue
from melanoma_mil.runtable import show, write
from melanoma_mil.tiling.coords import TileGrid
from melanoma_mil.workshare import STOP_FIX

log = logging.getLogger(__name__)

CSV_COLUMNS = ["slide_id", "status", "n_tiles", "seconds", "tiles_per_s", "reader", "mpp_source",
               "reason", "path", "cache_key"]  # fmt: skip
WIDTHS = {"slide_id": 24, "status": 11, "n_tiles": 7, "seconds": 7, "tiles_per_s": 7,
          "reader": 15, "mpp_source": 15}  # fmt: skip
DONE = ("ok", "done", "skipped")
FINE = (*DONE, "empty")  # an empty slide has no bag to make: it does not fail the run
NO_COORDS = "tile failed or was not run for it: see tiling.csv"


def report(
    encoder: str,
    out_root: Path,
    queue: SlideQueue,
    jobs: list[Job],
    untiled: dict[str, Path],
    read_only: set[Path],
) -> int:
    """The whole cohort's table, printed and as extract.csv in each cache folder but those
    ``read_only`` (their table is kept as it is); ``untiled`` slides (no coords file) are listed
    and fail the run, as a failed slide does."""
    rows = [queue.rows.get(j.slide_id) or {"slide_id": j.slide_id, "status": "failed",
            "reason": "not reached"} for j in jobs]  # fmt: skip
    rows += [{"slide_id": sid, "status": "no coords", "reason": NO_COORDS, "path": str(p)}
             for sid, p in untiled.items()]  # fmt: skip
    df = pd.DataFrame(rows)
    for col in CSV_COLUMNS:
        if col not in df:
            df[col] = np.nan
    df["mpp_source"] = [_mpp_source(g) for g in queue.grids] + [""] * len(untiled)
    df = df[CSV_COLUMNS].sort_values("slide_id")
    show(df, f"extract {encoder}", CSV_COLUMNS[:-2], WIDTHS, (*DONE, "empty", "failed"))
    keys = sorted(df["cache_key"].dropna().unique())
    wrote = True
    for key in keys:  # each cache folder's table: its slides and those that never got a key
        if out_root / key in read_only:
            print(f"  table: {out_root / key / 'extract.csv'} left as it was (the folder is "
                  "read-only)", flush=True)  # fmt: skip
            continue
        sub = df[(df["cache_key"] == key) | df["cache_key"].isna()]
        wrote &= write(sub, out_root / key / "extract.csv")
    if not keys:
        wrote &= write(df, out_root / "extract.csv")
    for key in keys:  # what fit, predict and heatmap take
        print(f"features: data.features_dir={out_root / key}", flush=True)
    bad = df[~df["status"].isin(FINE)]
    for r in bad.itertuples():
        log.error("  %s %s: %s", r.status, r.slide_id, r.reason)
    if queue.stopped:
        log.error("extract stopped early: %s; %s", queue.stopped, STOP_FIX)
    return 1 if len(bad) or not wrote else 0


def _mpp_source(grid: TileGrid | str) -> str:
    return grid.mpp_source if isinstance(grid, TileGrid) else ""
