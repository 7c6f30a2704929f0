"""`heatmap`: per-tile attention of every fold model of a trained run, drawn on its slides.

Per slide, in ``<output_dir>/<slide_id>/``: attention.h5 (coords, fold-mean attention, one
column per fold, probabilities), heatmap.png (percentile-normalised attention over the
thumbnail, tissue outline, predicted probability), montage.png (top- and bottom-k tiles at full
resolution) and, with geojson=true, tiles.geojson for QuPath.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from melanoma_mil.config import HeatmapConfig
from melanoma_mil.data.bags import read_attrs
from melanoma_mil.errors import UserError
from melanoma_mil.features.identity import plain
from melanoma_mil.ids import held_ids, id_path, id_problem
from melanoma_mil.inference.analyse import (
    ATTENTION_FILE,
    DRAWING_ATTR,
    FAILED,
    analyse_all,
    check_common,
    claim_for_run,
    drawing_settings,
    made_for,
    print_failures,
    probability_columns,
    remove_unwritten,
)
from melanoma_mil.inference.attention import read_attention
from melanoma_mil.inference.ensemble import Ensemble
from melanoma_mil.inference.inputs import prepare_inputs
from melanoma_mil.inference.work import extract_settings
from melanoma_mil.io import write_text
from melanoma_mil.outdir import read_marker, refuse_folders_at
from melanoma_mil.rundir import TrainedRun
from melanoma_mil.tiling.fingerprint import fingerprint_mismatch
from melanoma_mil.tiling.slides import mpp_outdated, read_mpp_csv
from melanoma_mil.tracking.loggers import log_slides
from melanoma_mil.workshare import STOP_FIX

# outside the slides' folders, which `inputs.prepare_inputs` checks once its slides are known
OUTPUTS = ("heatmaps.csv",)
log = logging.getLogger(__name__)
FILES = {"heatmap": "heatmap.png", "montage": "montage.png", "geojson": "tiles.geojson"}


def skipped_row(out: Path, slide_id: str) -> dict[str, Any] | None:
    """heatmaps.csv's row of a slide done by an earlier call: its result read back from its
    attention.h5 and its files, so a resumed table still holds every slide's result (None: the
    file is unreadable, and the slide is redone)."""
    folder = id_path(out, slide_id)
    try:
        amap = read_attention(folder / ATTENTION_FILE)
    except (OSError, KeyError, ValueError):
        return None
    row: dict[str, Any] = {
        "slide_id": slide_id,
        "status": "skipped",
        "n_tiles": len(amap.coords),
        "reason": f"{ATTENTION_FILE} of this run exists (overwrite=true redoes it)",
        **probability_columns(amap),
    }
    row.update({k: str(folder / n) for k, n in FILES.items() if (folder / n).is_file()})
    return row


def earlier_rows(out: Path, run: TrainedRun, called: set[str]) -> pd.DataFrame:
    """heatmaps.csv's rows of earlier calls for the slides this call leaves alone whose
    attention.h5 (of this run) is still there: a call on a few slides rewrote the table with
    theirs only, and the other slides drawn in output_dir were no longer listed."""
    try:
        earlier = pd.read_csv(out / "heatmaps.csv", dtype={"slide_id": str})
    except (OSError, ValueError):  # none, or unreadable: this call's rows make it anew
        return pd.DataFrame()
    ids = earlier["slide_id"].astype(str) if "slide_id" in earlier else pd.Series(dtype=str)
    keep = [
        sid not in called and not id_problem(sid) and made_for(out / sid / ATTENTION_FILE, run)
        for sid in ids
    ]
    return earlier[keep] if keep else pd.DataFrame()


def unchanged(
    attention: Path, slide: Path | None, mpp: float | None, precision: str = "auto"
) -> bool:
    """True if ``slide``, the file found now for the slide, is the one ``attention`` was drawn
    on (its recorded fingerprint), at the level-0 mpp its mpp_csv row ``mpp`` gives now and
    from features extracted at ``precision`` (auto: any, as `extract` reuses them); else the
    slide is redone, also when ``attention`` records no fingerprint (made before they were
    recorded), so a resumed call never reports another file's, or other settings', result."""
    try:
        attrs = read_attrs(attention)  # once: a rerun reads every slide's attention.h5
    except OSError:
        return False
    recorded = str(plain(attrs.get("slide_fingerprint", "")))
    if slide is None or not recorded or fingerprint_mismatch(slide, recorded) is not None:
        return False
    made = float(attrs.get("level0_mpp", float("nan")))
    if mpp_outdated(made, str(plain(attrs.get("mpp_source", ""))), mpp):
        return False
    had = plain(attrs.get("precision"))
    return precision == "auto" or had is None or had == precision


def drawn_alike(attention: Path, cfg: HeatmapConfig) -> bool:
    """True if ``attention``'s slide was drawn with this call's drawing settings (top_k,
    thumbnail_size); else it is redrawn, also when it records none (an older version's), so a
    rerun with other settings never keeps pictures made with the old ones."""
    try:
        recorded = plain(read_attrs(attention).get(DRAWING_ATTR, ""))
    except OSError:
        return False
    return recorded == drawing_settings(cfg)


def drawn_files(
    out: Path, run: TrainedRun, cfg: HeatmapConfig
) -> Callable[[str, Path | None], dict[str, str] | None]:
    """For a slide id and the slide file found now: the files an earlier call drew for it that
    a resumed call keeps (by `FILES` key), or None where it is to be drawn again: one of this
    call's files is missing (removed to have it redrawn, or geojson=true added), or they were
    not made from this slide file, mpp_csv row and precision (`unchanged`). `heatmap` and a
    resumed `predict` both keep slides by it."""
    names = {k: n for k, n in FILES.items() if k != "geojson" or cfg.geojson}
    # mpp_csv rows and precision make the features in _work; a features_dir's are used as they are
    mpps = {} if cfg.features_dir else read_mpp_csv(cfg.mpp_csv)
    precision = "auto" if cfg.features_dir else extract_settings(run, cfg)[0]

    def kept(sid: str, slide: Path | None) -> dict[str, str] | None:
        folder = id_path(out, sid)
        files = {k: folder / n for k, n in names.items()}
        if not all(f.is_file() for f in files.values()):
            return None
        if not unchanged(folder / ATTENTION_FILE, slide, mpps.get(sid), precision):
            return None
        return {k: str(f) for k, f in files.items()}

    return kept


def run_heatmap(cfg: HeatmapConfig) -> int:
    """Heatmaps for every slide; 0 if none failed, else 1 (after finishing the others)."""
    from melanoma_mil.features.hardware import resolve_device

    run = check_common(cfg)
    out = Path(cfg.output_dir)
    refuse_folders_at(out, "heatmap", ("heatmaps.csv",))  # a user's folder
    claim_for_run(cfg, run, "heatmap", OUTPUTS, write=False)
    marked = read_marker(out) is not None  # else no earlier call's slide folders are known
    # slide folders only (`held_ids`): a user's hidden copy (.old/) of one names no slide
    found = [] if cfg.overwrite else held_ids(out, holding=(ATTENTION_FILE,))
    attention = {sid: id_path(out, sid) / ATTENTION_FILE for sid in found}
    done = {
        sid: row
        for sid, path in attention.items()
        if made_for(path, run) and drawn_alike(path, cfg) and (row := skipped_row(out, sid))
    }
    drawn = drawn_files(out, run, cfg)

    def finished(sid: str, slide: Path | None) -> bool:
        return sid in done and drawn(sid, slide) is not None

    inputs, skipped_ids = prepare_inputs(run, cfg, skip=finished)
    claim_for_run(cfg, run, "heatmap", OUTPUTS, write=True)
    skipped = pd.DataFrame([done[s] for s in skipped_ids])
    table, stop = pd.DataFrame(), ""
    if inputs:
        ensemble = Ensemble(run, resolve_device(cfg.device))
        table, stop = analyse_all(inputs, ensemble, cfg, render=True, desc="heatmap")
        # overwrite: no slide folder keeps an earlier call's files; else only redone ones
        remove_unwritten(out, table, every=cfg.overwrite and marked)
    frames = [t for t in (table, skipped) if not t.empty]
    if not frames:
        raise UserError(f"no slides to draw: none found, or all already in '{out}'.")
    table = pd.concat(frames, ignore_index=True).sort_values("slide_id")
    counts = table["status"].value_counts().to_dict()
    called = {i.slide_id for i in inputs} | set(skipped_ids)
    # with overwrite the other slides' files are gone (`remove_unwritten`), and so their rows
    earlier = pd.DataFrame() if cfg.overwrite else earlier_rows(out, run, called)
    listed = table if earlier.empty else pd.concat([table, earlier]).sort_values("slide_id")
    write_text(out / "heatmaps.csv", listed.to_csv(index=False))
    log_slides(run.config, run.run_dir, table, out, "heatmap")
    print(
        f"heatmap: {counts} -> {out}/<slide_id>/ (heatmap.png, montage.png, {ATTENTION_FILE});"
        f" table {out / 'heatmaps.csv'}"
    )
    print_failures(table, out / "heatmaps.csv", "heatmap")
    if stop:
        log.error("heatmap stopped early: %s; %s", stop, STOP_FIX)
    return 1 if table["status"].isin(FAILED).any() else 0
