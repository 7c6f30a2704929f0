"""One trained run on many slides, shared by `heatmap` and `predict`: per slide the ensemble's
probabilities and attention, the heatmap files, and one table row that says what happened.

A bad slide never stops the others: its row says failed (no prediction) or no_heatmap (a
prediction, but its drawing failed), with the reason. A full disk stops the drawing (every
later drawing would fail too), not the predictions, which need no room; a re-run resumes.
"""

from __future__ import annotations

import json
import logging
import time
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from melanoma_mil.config import HeatmapConfig, check
from melanoma_mil.data.bags import read_attrs, read_bag
from melanoma_mil.errors import UserError
from melanoma_mil.features.identity import IDENTITY_FIELDS, plain
from melanoma_mil.ids import held_ids, id_path
from melanoma_mil.inference.attention import AttentionMap, write_attention, write_geojson
from melanoma_mil.inference.ensemble import Ensemble
from melanoma_mil.inference.inputs import ATTENTION_FILE, OWN_ENTRIES, SLIDE_FILES, SlideInput
from melanoma_mil.inference.work import WORK
from melanoma_mil.metrics import predicted
from melanoma_mil.outdir import claim_output, refuse_linked
from melanoma_mil.progress import progress
from melanoma_mil.rundir import TrainedRun, load_run
from melanoma_mil.tiling.coords import TileGrid, read_coords
from melanoma_mil.tiling.fingerprint import fingerprint_mismatch, slide_fingerprint
from melanoma_mil.tiling.slides import open_slide, read_mpp_csv
from melanoma_mil.tracking.loggers import check_logger
from melanoma_mil.viz.render import render_slide
from melanoma_mil.workshare import disk_full, disk_full_reason

log = logging.getLogger(__name__)
FAILED = ("failed", "no_heatmap")  # statuses that make the command exit 1
SHOWN = 5  # reasons (and slide ids per reason) printed when a command ends; the table has all
# feature-file attrs copied into attention.h5, so it says what the attention was computed on
RECORDED_ATTRS = (*IDENTITY_FIELDS, "cache_key", "level0_mpp", "mpp_source", "precision")
# table columns naming a slide's drawn files
FILE_COLUMNS = ("heatmap", "montage", "geojson")
# attention.h5 attr recording the settings its heatmap.png / montage.png were drawn with
DRAWING_ATTR = "drawing"


def drawing_settings(cfg: HeatmapConfig) -> str:
    """The settings that change a slide's drawn files, as recorded in its attention.h5: a
    resumed `heatmap` redraws a slide drawn with others rather than keep the old pictures."""
    return json.dumps({"top_k": cfg.top_k, "thumbnail_size": cfg.thumbnail_size}, sort_keys=True)


def check_common(cfg: HeatmapConfig) -> TrainedRun:
    """Validate the keys `heatmap` and `predict` share and open the run."""
    if not cfg.run_dir:
        raise UserError("run_dir is not set: pass run_dir=PATH to a `fit` output folder.")
    check(cfg)
    from melanoma_mil.features.hardware import resolve_device  # as the runners import it: lazily

    resolve_device(cfg.device)  # a bad one is said now, not once the slides have been tiled
    read_mpp_csv(cfg.mpp_csv)  # checked even when features_dir leaves it unused: a typo is said
    run = load_run(cfg.run_dir)
    check_logger(run.config)  # the run's W&B mode, used to log the slides once they are done
    return run


def claim_for_run(
    cfg: HeatmapConfig, run: TrainedRun, command: str, outputs: tuple[str, ...], write: bool
) -> None:
    """Make output_dir this command's folder for this run, or refuse it (see `outdir`);
    ``write=False`` checks before any work, ``True`` marks the folder before its outputs."""
    record = {"command": command, "run_id": run.run_id, "run_dir": str(run.run_dir.resolve())}
    out = Path(cfg.output_dir)
    # its own folders (evaluation), and links holding a slide's files (an earlier call's slide
    # folder: redrawn through, or counted as output); a link named by a slide of this call is
    # refused where its slides are known (`inputs.prepare_inputs`), before any work; another
    # (a user's figures/) is left alone. _work (tiles and features made on the fly) may be a
    # link to scratch space: only `tile` and `extract` write there, into folders of their own
    slides = held_ids(out, holding=SLIDE_FILES)
    refuse_linked(out, command, [*(n for n in OWN_ENTRIES[command] if n != WORK), *slides])
    claim_output(cfg.output_dir, record, cfg.overwrite, outputs, write)


def made_for(path: Path, run: TrainedRun) -> bool:
    """True if the attention.h5 at ``path`` was computed by ``run`` (resume skips only these)."""
    try:
        return read_attrs(path).get("run_id") == run.run_id
    except OSError:  # truncated or foreign: redone
        return False


def _failure(e: Exception) -> str:
    if isinstance(e, UserError):
        return str(e)
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"[:300]


def _attention_map(
    inp: SlideInput, ensemble: Ensemble, render: bool
) -> tuple[AttentionMap, TileGrid | None]:
    """The ensemble on one bag; its tile geometry is read only to draw (``render``), so bags
    without any (CLAM h5 / pt, which `fit` trains on) are still scored."""
    assert inp.features is not None
    feats, bag_coords = read_bag(inp.features)
    grid = read_coords(inp.features) if render else None
    coords = grid.coords if grid is not None else bag_coords
    if coords is not None and len(coords) != len(feats):
        raise UserError(
            f"{inp.features}: {len(feats)} features but {len(coords)} coords;"
            " re-run `extract` for this slide."
        )
    probs, attention = ensemble(feats)
    attrs = read_attrs(inp.features)
    amap = AttentionMap(
        slide_id=inp.slide_id,
        coords=np.zeros((0, 2), np.int64) if coords is None else coords,
        level0_size=grid.level0_size if grid is not None else 0,
        attention=attention,
        probs=probs,
        fold_names=ensemble.fold_names,
        classes=ensemble.classes,
        threshold=ensemble.threshold,
        attrs={
            "run_dir": str(ensemble.run.run_dir.resolve()),
            "run_id": ensemble.run.run_id,
            "slide_path": str(inp.slide_path or (grid.slide_path if grid else "")),
            "features": str(inp.features.resolve()),
            **{k: attrs[k] for k in RECORDED_ATTRS if k in attrs},
        },
    )
    return amap, grid


def render_files(
    inp: SlideInput, amap: AttentionMap, grid: TileGrid, cfg: HeatmapConfig
) -> dict[str, str]:
    """Heatmap files of one slide in <output_dir>/<slide_id>/; attention.h5 is written last, so
    its presence means the slide is done."""
    if inp.slide_path is None:
        raise UserError(
            f"slide file for '{inp.slide_id}' not found (recorded '{grid.slide_path}'); "
            "pass slides_dir or manifest."
        )
    why = fingerprint_mismatch(inp.slide_path, grid.fingerprint)
    if why:  # the same name in another folder: drawing on it would show another slide
        raise UserError(f"slide '{inp.slide_path}' {why}; pass the slides the features came from.")
    out = id_path(cfg.output_dir, inp.slide_id)
    # the file drawn on, so a resumed `heatmap` redoes the slide when its file changes
    # (the recorded one when there is one: it was just checked against the file)
    amap.attrs["slide_fingerprint"] = grid.fingerprint or slide_fingerprint(inp.slide_path)
    amap.attrs[DRAWING_ATTR] = drawing_settings(cfg)
    slide = open_slide(inp.slide_path)
    try:
        files = render_slide(
            slide, grid, amap.mean_attention, amap.title(), out, cfg.top_k, cfg.thumbnail_size
        )
    finally:
        slide.close()
    if cfg.geojson:
        files["geojson"] = out / "tiles.geojson"
        write_geojson(files["geojson"], amap)
    write_attention(out / ATTENTION_FILE, amap)
    return {k: str(v) for k, v in files.items()}


def analyse_slide(
    inp: SlideInput, ensemble: Ensemble, cfg: HeatmapConfig, render: bool
) -> tuple[dict[str, Any], AttentionMap | None, str]:
    """Ensemble probabilities and attention of one slide (+ its heatmap files when ``render``),
    and why no further slide can be drawn ("": the disk did not fill up).

    Never raises for a bad slide: status is ok, failed (no prediction) or no_heatmap (a
    prediction, but the drawing failed), and reason says why; an ok slide that cannot be drawn
    by design (``inp.no_drawing``: its bag holds no tile geometry) says so in reason.
    """
    row: dict[str, Any] = {
        "slide_id": inp.slide_id,
        "status": "failed",
        "n_tiles": 0,
        "reason": inp.reason,
    }
    if inp.features is None:
        return row, None, ""
    try:
        amap, grid = _attention_map(inp, ensemble, render and not inp.no_drawing)
    except Exception as e:  # one bad slide (unreadable bag...) must not stop the rest
        row["reason"] = _failure(e)
        log.warning("%s: FAILED: %s", inp.slide_id, row["reason"])
        return row, None, ""
    row.update(status="ok", reason=inp.no_drawing, n_tiles=amap.attention.shape[1])
    stop = ""
    if grid is not None:
        try:
            row.update(render_files(inp, amap, grid, cfg))
        except Exception as e:  # corrupt or missing slide file: the prediction still stands
            if disk_full(e):
                stop = disk_full_reason(e, id_path(cfg.output_dir, inp.slide_id))
            row.update(status="no_heatmap", reason=stop or _failure(e))
            log.warning("%s: no heatmap: %s", inp.slide_id, row["reason"])
    return row, amap, stop


def probability_columns(amap: AttentionMap) -> dict[str, Any]:
    """prob (binary: positive = last class) / prob_<class>, pred, per-fold prob_<fold>[_<class>]."""
    return ensemble_columns(amap.probs, amap.fold_names, amap.classes, amap.threshold)


def ensemble_columns(
    probs: np.ndarray, folds: list[str], classes: list[str], threshold: float = 0.5
) -> dict[str, Any]:
    """The columns of :func:`probability_columns` from fold probabilities [F, C] of one bag."""
    mean = probs.mean(0)
    binary = len(classes) == 2
    cols: dict[str, Any] = {"prob": float(mean[1])} if binary else {}
    cols.update({f"prob_{c}": float(p) for c, p in zip(classes, mean, strict=True)})
    cols["pred"] = classes[int(predicted(mean[None], threshold)[0])]
    for name, p in zip(folds, probs, strict=True):
        if binary:
            cols[f"prob_{name}"] = float(p[1])
        else:
            cols.update({f"prob_{name}_{c}": float(v) for c, v in zip(classes, p, strict=True)})
    return cols


def analyse_all(
    inputs: list[SlideInput], ensemble: Ensemble, cfg: HeatmapConfig, render: bool, desc: str
) -> tuple[pd.DataFrame, str]:
    """analyse_slide over all inputs with a progress bar: one row per slide, and why drawing
    stopped early ("": it did not). After a full disk the slides are scored, not drawn."""
    rows = []
    start, tiles = time.perf_counter(), 0
    stop = ""
    with progress(total=len(inputs), desc=desc, unit="slide") as bar:
        for inp in inputs:
            drawn = render and not stop
            row, amap, full = analyse_slide(inp, ensemble, cfg, drawn)
            if render and not drawn and row["status"] == "ok" and not inp.no_drawing:
                row.update(status="no_heatmap", reason=f"not drawn: {stop}")
            stop = stop or full
            if amap is not None:
                row.update(probability_columns(amap))
            rows.append(row)
            tiles += row["n_tiles"]
            # refresh=False: off a terminal, a line per LOG_INTERVAL_S, not one per slide
            bar.set_postfix(
                tiles_per_s=f"{tiles / (time.perf_counter() - start):.0f}", refresh=False
            )
            bar.update(1)
    return pd.DataFrame(rows), stop


def drawn_here(attention: Path) -> bool:
    """True if ``attention`` is the attention.h5 of a slide folder this command made: in a real
    folder (no link) that its recorded slide id names. A user's copy of a slide's folder
    (best/) or a link to one is the user's, never an earlier call's slide folder."""
    folder = attention.parent
    if folder.is_symlink():
        return False
    try:
        recorded = str(plain(read_attrs(attention).get("slide_id", "")))
    except OSError:  # unreadable: not known to be a slide's
        return False
    # NFC: a file system may give back a name in another Unicode form (macOS HFS+: NFD)
    return unicodedata.normalize("NFC", recorded) == unicodedata.normalize("NFC", folder.name)


def remove_unwritten(out: Path, table: pd.DataFrame, every: bool) -> None:
    """Delete the slide files (SLIDE_FILES) in ``out`` that this call did not write, of the
    slides in ``table`` (those it analysed) and, with ``every``, of every slide folder an
    earlier call made (`drawn_here`): a folder never mixes an earlier call's, or another slide
    file's, results with this call's. Only these names are touched, never a link (a dangling
    one too) nor through one; a folder is removed only once empty."""
    written = {Path(v).resolve() for c in FILE_COLUMNS if c in table for v in table[c].dropna()}
    # attention.h5 is written last of a slide's drawing: with its heatmap, never without it
    drawn = table.loc[table["heatmap"].notna(), "slide_id"] if "heatmap" in table else []
    written |= {(id_path(out, s) / ATTENTION_FILE).resolve() for s in drawn}
    folders = {
        d for s in table["slide_id"] if (d := id_path(out, s)).is_dir() and not d.is_symlink()
    }
    if every:
        earlier = (id_path(out, s) for s in held_ids(out, holding=(ATTENTION_FILE,)))
        folders |= {d for d in earlier if drawn_here(d / ATTENTION_FILE)}
    for folder in folders:
        for path in (folder / name for name in SLIDE_FILES):
            # a link is the user's (commands write files): replaced where redrawn, else kept
            if not path.is_symlink() and path.resolve() not in written:
                path.unlink(missing_ok=True)
        if not any(folder.iterdir()):
            folder.rmdir()


def print_failures(table: pd.DataFrame, csv: Path, command: str) -> None:
    """Say why slides failed (a few ids per reason, the first SHOWN reasons) when the command
    ends, so a cohort that failed, e.g. against the wrong feature cache, is explained without
    opening the table; progress-time warnings scroll away."""
    bad = table[table["status"].isin(FAILED)].fillna({"reason": ""})
    if bad.empty:
        return
    counts = ", ".join(f"{n} {s}" for s, n in bad["status"].value_counts().items())
    print(f"{command}: {counts} of {len(table)} slides; reasons (all in {csv}):")
    groups = list(bad.groupby(["status", "reason"], sort=False)["slide_id"])
    for (status, reason), ids in groups[:SHOWN]:
        more = f" and {len(ids) - SHOWN} more" if len(ids) > SHOWN else ""
        print(f"  {status} {', '.join(ids.iloc[:SHOWN])}{more}: {reason or 'no reason recorded'}")
    if len(groups) > SHOWN:
        rest = sum(len(ids) for _, ids in groups[SHOWN:])
        print(f"  ... {rest} more slides with {len(groups) - SHOWN} other reasons")
