"""Features made on the fly for `predict` and `heatmap`: the slides are tiled and encoded by
`tile` and `extract` with the run's recorded settings into <output_dir>/_work, which is this
command's own cache (stale entries are rebuilt, never a user's files)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from melanoma_mil.config import (
    ExtractConfig,
    HeatmapConfig,
    PredictConfig,
    TileConfig,
    TilingConfig,
)
from melanoma_mil.data.bags import read_attrs
from melanoma_mil.errors import UserError
from melanoma_mil.features.cache import settings_mismatch
from melanoma_mil.features.folder import PRECISION_FILE, folder_precision_of
from melanoma_mil.ids import id_path
from melanoma_mil.inference.inputs import (
    WORK,
    SlideInput,
    check_features,
    encoder_config,
    slide_mismatch,
    tiling_config,
)
from melanoma_mil.io import read_h5, write_text
from melanoma_mil.outdir import refuse_linked, refuse_unwritable
from melanoma_mil.rundir import TrainedRun
from melanoma_mil.tiling.coords import read_coords
from melanoma_mil.tiling.fingerprint import fingerprint_mismatch
from melanoma_mil.tiling.qc import CELLS
from melanoma_mil.tiling.slides import mpp_outdated, read_mpp_csv

log = logging.getLogger(__name__)


def _said(status: str, why: str) -> str:
    """A slide's reason from a tile / extract row's status and reason: the status prefixes it
    unless it is 'failed' (the slide's own status already says so)."""
    # never empty: a slide without a reason here would be scored
    said = why if status == "failed" and why else f"{status}: {why}"
    if "tiling." in said:  # tile's advice names keys these commands do not take
        said += (
            "; predict and heatmap tile with the run's tiling settings: to change "
            "them, run `tile` and `extract` yourself and pass features_dir="
        )
    return said


def _reasons(csvs: list[Path]) -> dict[str, str]:
    """slide_id -> reason (`_said`), from the tiling.csv / extract.csv rows that were not ok."""
    reasons: dict[str, str] = {}
    for csv in csvs:
        if csv.is_file():
            df = pd.read_csv(csv, dtype={"slide_id": str}, keep_default_na=False)
            for r in df[~df["status"].isin(["ok", "done", "skipped"])].itertuples():
                reasons.setdefault(str(r.slide_id), _said(str(r.status), str(r.reason)))
    return reasons


def _empty_reasons(coords: Path, slides: Iterable[str]) -> dict[str, str]:
    """slide_id -> reason of the ``slides`` tiled with zero tiles, as `tile` recorded it in their
    coords file: on a re-run tile's row says 'skipped', and extract's only 'no tiles in the
    coords file', where the first run said why (e.g. no tissue found)."""
    reasons: dict[str, str] = {}
    for sid in slides:
        path = id_path(coords, sid, ".h5")
        try:
            grid = read_coords(path) if path.is_file() else None
        except UserError:  # unreadable: extract says so
            continue
        if grid is not None and not len(grid.coords) and grid.empty_reason:
            reasons[sid] = _said("empty", grid.empty_reason)
    return reasons


def _made_from(path: Path, slide: Path, tiling: dict[str, Any], mpp: float | None) -> bool:
    """True if the coords or features at ``path`` were made from this very slide file (path and
    fingerprint) with this tiling, at the level-0 mpp that mpp_csv gives it now (the slide's own
    when it gives none: coords from a dropped mpp_csv row are rebuilt, never failed by `tile`)."""
    try:
        grid = read_coords(path)
    except UserError:  # unreadable leftover
        return False
    same_path = Path(grid.slide_path).resolve() == slide.resolve()
    same_file = fingerprint_mismatch(slide, grid.fingerprint) is None
    same_mpp = not mpp_outdated(grid.level0_mpp, grid.mpp_source, mpp)
    return same_path and same_file and same_mpp and grid.tiling == tiling


def extract_settings(run: TrainedRun, cfg: HeatmapConfig) -> tuple[str, str]:
    """The precision and stored dtype `extract` is asked for in ``_work``."""
    precision = str(run.provenance.get("precision", "auto"))
    dtype = str(run.provenance.get("feature_dtype", "float16"))
    return (precision if cfg.precision == "run" else cfg.precision), dtype


def _stored_otherwise(path: Path, precision: str, dtype: str) -> bool:
    """True if `extract` would refuse the features at ``path`` for another stored dtype or
    precision (its own rule, `settings_mismatch`) and so fail the slide: in this command's own
    cache they are rebuilt instead."""
    try:
        with read_h5(path) as f:
            attrs, stored = dict(f.attrs), f["features"].dtype
    except (OSError, KeyError, AttributeError):  # unreadable, or no array: extract says so
        return False
    asked = {"feature_dtype": dtype, "precision_requested": precision, "precision": precision}
    return settings_mismatch(attrs, stored, asked) is not None


def _other_precision(cache: Path, precision: str, dtype: str) -> list[Path]:
    """Every slide's features in ``cache`` made at another precision than the one asked, and
    the folder's precision record with them: extract keeps one precision per folder
    (`features.folder`), so in this command's own cache a new one rebuilds it all."""
    had = folder_precision_of(cache)  # a _work cache from before records: its bags' precision
    if precision == "auto" or had in (None, precision):
        return []
    bags = [p for p in sorted(cache.glob("[!.]*.h5")) if _stored_otherwise(p, precision, dtype)]
    return [*bags, cache / PRECISION_FILE]


def stale_files(
    work: Path,
    slides: dict[str, Path],
    tiling: TilingConfig,
    mpps: dict[str, float],
    settings: tuple[str, str],
) -> list[Path]:
    """The coords and features in ``work`` of each slide that were made from another file,
    path, tiling or mpp_csv value (``mpps``), and the features extracted at another precision or
    stored at another dtype than ``settings`` (`extract_settings`): `clear_stale` deletes them
    so `tile` and `extract` rebuild them (`tile` itself refuses coords of another path, to
    protect a user's). Found before any is deleted, so their folders are checked first."""
    from melanoma_mil.tiling.run import resolved_tiling

    wanted = resolved_tiling(tiling)
    caches = [c for c in (work / "features").glob("*") if c.is_dir()]
    files = [p for c in caches for p in _other_precision(c, *settings)]
    for sid, slide in slides.items():
        coords = id_path(work / "tiles" / "coords", sid, ".h5")
        feats = [p for c in caches if (p := id_path(c, sid, ".h5")).is_file()]
        made = [p for p in (coords, *feats) if p.is_file()]
        if all(_made_from(p, slide, wanted, mpps.get(sid)) for p in made):
            made = [p for p in feats if _stored_otherwise(p, *settings)]  # re-extract only
        files += made
    return list(dict.fromkeys(files))


def clear_stale(work: Path, files: list[Path]) -> None:
    """Delete `stale_files` from ``work``, this command's own cache folder."""
    for p in files:
        p.unlink(missing_ok=True)
    rebuilt = sorted({p.stem for p in files if p.suffix == ".h5"})
    if rebuilt:
        log.info(
            "%s: rebuilding %s, made from another file, tiling or precision", work, rebuilt[:5]
        )


def _tile_and_extract(
    run: TrainedRun, usable: dict[str, Path], cfg: HeatmapConfig, work: Path, tiling: TilingConfig
) -> bool:
    """`tile` then `extract` ``usable`` into ``work``; False if no slide had tiles to extract.
    Never with overwrite: coords and features still made from the same file and tiling are
    reused, and `clear_stale` and extract's cache checks rebuild the others."""
    from melanoma_mil.features.run import run_extract
    from melanoma_mil.tiling.run import run_tile

    encoder = encoder_config(run, cfg.encoder_weights)
    manifest = work / "slides.csv"
    # absolute, not resolved: a symlinked slide is tiled under the link's own path, whose
    # fingerprint (it hashes the file name) is the one checked when its features are scored
    table = pd.DataFrame(
        {"slide_id": list(usable), "path": [str(p.absolute()) for p in usable.values()]}
    )
    write_text(manifest, table.to_csv(index=False))
    workers = max(1, 2 if cfg.num_workers is None else cfg.num_workers)
    tile = TileConfig(
        manifest=str(manifest),
        output_dir=str(work / "tiles"),
        workers=workers,
        mpp_csv=cfg.mpp_csv,
        tiling=tiling,
        extensions=list(cfg.extensions),
    )
    run_tile(tile, advise_default_mpp=False)
    if not any(id_path(work / "tiles" / "coords", s, ".h5").is_file() for s in usable):
        return False
    precision, dtype = extract_settings(run, cfg)
    run_extract(
        ExtractConfig(
            coords_dir=str(work / "tiles"),
            output_dir=str(work / "features"),
            encoder=encoder,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            device=cfg.device,
            precision=precision,
            dtype=dtype,
            reader="fast" if run.provenance.get("read_mode") == "fast" else "auto",
        )
    )
    return True


def _refuse_links(work: Path, command: str) -> None:
    """Refuse a link at this command's cache ``work``, at its tiles/ or features/, or at an
    encoder's cache in features/: `clear_stale` deletes coords and features there, and `tile`
    rewrites tiling.csv, so a user's tiling or features where a link points would be replaced.
    A linked _work itself (scratch space) is fine."""
    out = work.parent.parent  # output_dir, whose _work holds ``work``
    refuse_linked(work.parent, command, [work.name], out)
    refuse_linked(work, command, ["tiles", "features"], out)
    features = work / "features"
    caches = [p.name for p in features.iterdir()] if features.is_dir() else []
    refuse_linked(features, command, caches, out)


def _has_tiles(coords: Path) -> bool:
    """Whether the kept coords file ``coords`` (read by `stale_files` already) has tiles."""
    try:
        return len(read_coords(coords).coords) > 0
    except UserError:  # unreadable since: tiled and encoded again
        return True


def _written(work: Path, slides: Iterable[str], stale: list[Path]) -> list[Path]:
    """The folders `tile` and `extract` write in ``work`` for ``slides``, with ``work`` and
    _work: checked before any slide is tiled (`extract` checks its cache folders only once they
    are). coords and qc only if a slide is left to tile, features if one is left to encode
    (a ``stale`` file is deleted, and so is left; a slide tiled with zero tiles never has a
    bag): a complete read-only cache is only read."""
    tiles, features = work / "tiles", work / "features"
    caches = sorted(p for p in features.iterdir() if p.is_dir()) if features.is_dir() else []

    def kept(path: Path) -> bool:
        return path.is_file() and path not in stale

    untiled = {s for s in slides if not kept(id_path(tiles / "coords", s, ".h5"))}
    unencoded = [
        s
        for s in slides
        if not any(kept(id_path(c, s, ".h5")) for c in caches)
        and (s in untiled or _has_tiles(id_path(tiles / "coords", s, ".h5")))
    ]
    made = [tiles / name for name in ("coords", "qc", CELLS)] if untiled else []
    return [work.parent, work, tiles, *made, *([features, *caches] if unencoded else [])]


def extracted_inputs(
    run: TrainedRun, slides: dict[str, Path | None], cfg: HeatmapConfig, own_masks: bool = True
) -> list[SlideInput]:
    """Tile and extract the slides with the run's recorded settings into <output_dir>/_work.

    ``own_masks=False`` drops the run's tiling.mask_dir: its masks are named by the training
    slides' ids, and new slides that share an id would be tiled with another slide's mask.
    """
    tiling = tiling_config(run)
    if not own_masks:
        tiling.mask_dir = None
    # the cache key names a folder: checked like an id, so a doctored provenance stays inside
    work = id_path(Path(cfg.output_dir) / WORK, str(run.provenance.get("cache_key", "features")))
    command = "predict" if isinstance(cfg, PredictConfig) else "heatmap"
    _refuse_links(work, command)
    usable = {s: p for s, p in slides.items() if p is not None}
    if not usable:
        return [SlideInput(s, None, None, "slide file not found") for s in slides]
    stale = stale_files(work, usable, tiling, read_mpp_csv(cfg.mpp_csv), extract_settings(run, cfg))
    refuse_unwritable(_written(work, usable, stale), command)
    clear_stale(work, stale)
    extracted = _tile_and_extract(run, usable, cfg, work, tiling)
    caches = sorted(p for p in (work / "features").glob("*") if p.is_dir())
    # slides tile or extract failed in this call, or left without tiles: never scored
    reasons = _reasons([work / "tiles" / "tiling.csv"])
    reasons.update(_empty_reasons(work / "tiles" / "coords", set(usable) - set(reasons)))
    extract = _reasons([c / "extract.csv" for c in caches] if extracted else [])
    reasons = {**extract, **reasons}
    inputs = []
    for sid, slide in slides.items():
        found = [p for c in caches if (p := id_path(c, sid, ".h5")).is_file()]
        why = "slide file not found" if slide is None else reasons.get(sid, "")
        if not why and not found:
            why = "no features made"
        if not why:
            check_features(read_attrs(found[0]), run, found[0])
            why = slide_mismatch(slide, found[0]) or ""
        features = None if why else found[0]
        inputs.append(SlideInput(sid, slide, features, why))
    return inputs
