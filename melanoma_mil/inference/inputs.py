"""A trained run applied to slides: features made exactly as the run's, and the fold ensemble.

Features either come from a given cache folder, which must match the run's recorded encoder,
weights and tiling (a mismatch is refused: the models would silently score garbage), or are made
on the fly by `tile` and `extract` with the run's recorded settings in ``<output_dir>/_work``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from melanoma_mil.config import (
    EncoderConfig,
    ExtractConfig,
    HeatmapConfig,
    PredictConfig,
    TileConfig,
    TilingConfig,
    TissueConfig,
)
from melanoma_mil.data.bags import bag_files, bag_path, read_attrs
from melanoma_mil.errors import UserError
from melanoma_mil.features.identity import feature_identity, identity_mismatch, plain
from melanoma_mil.ids import id_path, id_problem
from melanoma_mil.io import sha256_file, write_text
from melanoma_mil.rundir import TrainedRun
from melanoma_mil.tiling.coords import read_coords
from melanoma_mil.tiling.fingerprint import fingerprint_mismatch
from melanoma_mil.tiling.slides import (
    DEFAULT_MPP_ADVICE,
    find_slides,
    mpp_contradicts,
    read_mpp_csv,
)

log = logging.getLogger(__name__)

WORK = "_work"


@dataclass(frozen=True)
class SlideInput:
    """One slide to analyse: where its pixels and features are, or why they are missing."""

    slide_id: str
    slide_path: Path | None
    features: Path | None
    reason: str = ""


def check_features(attrs: dict[str, Any], run: TrainedRun, path: Path) -> None:
    """Refuse a feature file whose identity (encoder, weights, transform, tiling) is not the run's:
    the models would silently score features that mean something else."""
    why = identity_mismatch(feature_identity(attrs), feature_identity(run.provenance))
    if why:
        raise UserError(
            f"{path} {why} (run '{run.run_dir}' was trained so); use features made like the "
            f"run's (cache {run.provenance.get('cache_key', '?')}) or drop features_dir to "
            "extract them."
        )


def encoder_config(run: TrainedRun, weights: str | None) -> EncoderConfig:
    """The run's encoder with its recorded weights; a weights file must match the recorded sha."""
    name, recorded = run.provenance.get("encoder"), run.provenance.get("encoder_weights")
    if not name or not recorded:
        raise UserError(
            f"run '{run.run_dir}' records no encoder in provenance.json, so features cannot be "
            "made for it; pass features_dir=FOLDER with features made like the run's."
        )
    if recorded == "random" or str(recorded).startswith("hub:"):
        if weights:
            raise UserError(
                f"run '{run.run_dir}' used {name} with weights '{recorded}', not a local file; "
                "drop encoder_weights."
            )
        return EncoderConfig(name=name, weights=None, pretrained=recorded != "random")
    path = Path(weights or run.provenance.get("encoder_weights_file") or "").expanduser()
    if not weights and not path.is_file():
        raise UserError(
            f"run '{run.run_dir}' used {name} with a local weights file (sha256 "
            f"{str(recorded)[:12]}...); pass encoder_weights=PATH to that file."
        )
    if not path.is_file():
        raise UserError(f"encoder_weights '{path}' not found: check the path.")
    digest = sha256_file(path)
    if digest != recorded:
        raise UserError(
            f"encoder_weights '{path}' has sha256 {digest[:12]}... but run '{run.run_dir}' "
            f"recorded {str(recorded)[:12]}...; pass the weights file its features were made with."
        )
    return EncoderConfig(name=name, weights=str(path), pretrained=False)


def tiling_config(run: TrainedRun) -> TilingConfig:
    """The run's recorded TilingConfig (user mask folders only when they still exist)."""
    raw = run.provenance.get("tiling")
    if not raw:
        raise UserError(
            f"run '{run.run_dir}' records no tiling in provenance.json; pass features_dir=FOLDER "
            "with features made like the run's."
        )
    values = json.loads(raw) if isinstance(raw, str) else dict(raw)
    tissue_keys = {f.name for f in dataclasses.fields(TissueConfig)}
    tissue = TissueConfig(
        **{k: v for k, v in (values.pop("tissue", None) or {}).items() if k in tissue_keys}
    )
    keys = {f.name for f in dataclasses.fields(TilingConfig)} - {"tissue"}
    cfg = TilingConfig(**{k: v for k, v in values.items() if k in keys}, tissue=tissue)
    if cfg.mask_dir and not Path(cfg.mask_dir).is_dir():
        log.info(
            "recorded tiling.mask_dir %s is gone: tissue is detected automatically", cfg.mask_dir
        )
        cfg.mask_dir = None
    return cfg


def _cache_folder(features_dir: Path, run: TrainedRun) -> Path:
    """``features_dir`` itself, or the run's cache subfolder of an `extract` output_dir."""
    if not features_dir.is_dir():
        raise UserError(f"features_dir '{features_dir}' is not a folder: check the path.")
    if bag_files(features_dir):
        return features_dir
    key = str(run.provenance.get("cache_key", ""))
    if key and id_problem(key) is None and (features_dir / key).is_dir():
        return features_dir / key
    caches = sorted(p.name for p in features_dir.iterdir() if p.is_dir() and any(p.glob("*.h5")))
    if caches:
        raise UserError(
            f"features_dir '{features_dir}' holds feature caches {caches[:4]} but not the run's "
            f"('{key}'); point features_dir at features made like the run's, or drop it to "
            "extract them on the fly."
        )
    return features_dir


def _select(
    found: dict[str, Path | None], wanted: list[str], source: str
) -> dict[str, Path | None]:
    if not wanted:
        return found
    missing = [s for s in wanted if s not in found]
    if missing:
        raise UserError(f"slide_ids {missing[:5]} not found in {source}; check slide_ids.")
    return {s: found[s] for s in wanted}


def _recorded_slide(path: Path) -> str:
    try:
        return str(plain(read_attrs(path).get("slide_path", "")))
    except OSError:  # reported when the slide's features are read
        return ""


def find_input_slides(cfg: HeatmapConfig, features: Path | None) -> dict[str, Path | None]:
    """slide_id -> slide file: slides_dir / manifest, else the paths a feature cache recorded."""
    if cfg.slides_dir or cfg.manifest:
        found: dict[str, Path | None] = dict(
            find_slides(cfg.slides_dir, cfg.manifest, cfg.extensions)
        )
        return _select(found, list(cfg.slide_ids), "slides_dir / manifest")
    if features is None:
        raise UserError("no slides given: set slides_dir=FOLDER or manifest=CSV.")
    files = bag_files(features)
    if not files:
        raise UserError(
            f"no feature files (<slide_id>.h5, or CLAM's h5_files/ or pt_files/) in "
            f"'{features}'; check features_dir."
        )
    recorded = {s: _recorded_slide(p) for s, p in sorted(files.items())}
    # exists, not is_file: a DICOM slide is a folder
    found = {s: Path(p) if p and Path(p).exists() else None for s, p in recorded.items()}
    return _select(found, list(cfg.slide_ids), f"features_dir '{features}'")


def recorded_fingerprint(path: Path) -> str:
    """The slide fingerprint an h5 (a bag, an attention.h5) records; '' if none or unreadable
    (an unreadable bag is reported when it is read)."""
    try:
        return str(plain(read_attrs(path).get("slide_fingerprint", "")))
    except OSError:
        return ""


def slide_mismatch(slide: Path | None, features: Path) -> str | None:
    """Why ``features`` were not made from the file at ``slide``, or None (also with no slide
    to check): scored, they would report another slide's prediction under this slide's id."""
    if slide is None:
        return None
    why = fingerprint_mismatch(slide, recorded_fingerprint(features))
    if why is None:
        return None
    return f"slide '{slide}' {why}; pass the slides that {features} was made from"


def no_geometry(path: Path) -> str:
    """Why no heatmap can be drawn from the bag at ``path`` ('' if one can): CLAM bags and
    .pt files hold no tile geometry (the attrs `tile` writes)."""
    try:
        read_coords(path)
    except UserError:
        return f"{path} holds no tile geometry (the attrs `tile` writes): no heatmap can be drawn"
    return ""


def cached_inputs(
    run: TrainedRun, slides: dict[str, Path | None], folder: Path, render: bool
) -> list[SlideInput]:
    """Inputs from a feature cache; every file is checked against the run before any work, and
    for drawing (``render``) a cache whose bags all lack tile geometry is refused."""
    inputs = []
    flat = 0  # bags without tile geometry
    for sid, slide in slides.items():
        path = bag_path(folder, sid)
        if path is None:
            why = f"no features for it in '{folder}' (drop features_dir to extract on the fly)"
            inputs.append(SlideInput(sid, slide, None, why))
            continue
        try:
            attrs = read_attrs(path)
        except OSError as e:  # a truncated or foreign file fails this slide only
            inputs.append(SlideInput(sid, slide, None, f"{path}: unreadable h5 ({e})"))
            continue
        check_features(attrs, run, path)
        why = slide_mismatch(slide, path)
        if not why and render and (why := no_geometry(path)):
            flat += 1
        inputs.append(SlideInput(sid, slide, None, why) if why else SlideInput(sid, slide, path))
    if inputs and flat == len(inputs):
        raise UserError(
            f"{inputs[0].reason}: features_dir '{folder}' holds bags without tile geometry "
            "(CLAM h5/pt); pass heatmaps=false to `predict` to score them, or drop features_dir "
            "to tile and extract the slides."
        )
    return inputs


def _reasons(csvs: list[Path]) -> dict[str, str]:
    """slide_id -> reason, from the tiling.csv / extract.csv rows that were not ok. The row's
    status prefixes the reason unless it is 'failed' (the slide's own status already says so);
    tile's advice to set tiling.default_mpp is dropped: this command tiles with the run's
    recorded tiling and takes no tiling keys, only mpp_csv."""
    reasons: dict[str, str] = {}
    for csv in csvs:
        if csv.is_file():
            df = pd.read_csv(csv, dtype={"slide_id": str}, keep_default_na=False)
            for r in df[~df["status"].isin(["ok", "done", "skipped"])].itertuples():
                why = str(r.reason).replace(DEFAULT_MPP_ADVICE, "")
                # never empty: a slide without a reason here would be scored
                why = why if r.status == "failed" and why else f"{r.status}: {why}"
                reasons.setdefault(str(r.slide_id), why)
    return reasons


def _made_from(path: Path, slide: Path, tiling: dict[str, Any], mpp: float | None) -> bool:
    """True if the coords or features at ``path`` were made from this very slide file (path and
    fingerprint) with this tiling, at the level-0 mpp that mpp_csv gives it now (if any)."""
    try:
        grid = read_coords(path)
    except UserError:  # unreadable leftover
        return False
    same_path = Path(grid.slide_path).resolve() == slide.resolve()
    same_file = fingerprint_mismatch(slide, grid.fingerprint) is None
    same_mpp = not mpp_contradicts(grid.level0_mpp, mpp)
    return same_path and same_file and same_mpp and grid.tiling == tiling


def clear_stale(
    work: Path, slides: dict[str, Path], tiling: TilingConfig, mpps: dict[str, float]
) -> None:
    """Delete the coords and features in ``work`` of each slide that were made from another file,
    path, tiling or mpp_csv value (``mpps``), so `tile` and `extract` rebuild them (`tile` itself
    refuses coords of another path, to protect a user's). ``work`` is this command's own cache
    folder."""
    from melanoma_mil.tiling.run import resolved_tiling

    wanted = resolved_tiling(tiling)
    caches = [c for c in (work / "features").glob("*") if c.is_dir()]
    cleared = []
    for sid, slide in slides.items():
        coords = id_path(work / "tiles" / "coords", sid, ".h5")
        feats = [p for c in caches if (p := id_path(c, sid, ".h5")).is_file()]
        files = [p for p in (coords, *feats) if p.is_file()]
        if all(_made_from(p, slide, wanted, mpps.get(sid)) for p in files):
            continue
        for p in files:
            p.unlink(missing_ok=True)
        cleared.append(sid)
    if cleared:
        log.info("%s: rebuilding %s, made from another file or tiling", work, cleared[:5])


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
    run_tile(
        TileConfig(
            manifest=str(manifest),
            output_dir=str(work / "tiles"),
            workers=workers,
            mpp_csv=cfg.mpp_csv,
            tiling=tiling,
            extensions=list(cfg.extensions),
        )
    )
    if not any(id_path(work / "tiles" / "coords", s, ".h5").is_file() for s in usable):
        return False
    precision = str(run.provenance.get("precision", "auto"))
    run_extract(
        ExtractConfig(
            coords_dir=str(work / "tiles"),
            output_dir=str(work / "features"),
            encoder=encoder,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            device=cfg.device,
            precision=precision if cfg.precision == "run" else cfg.precision,
            dtype=str(run.provenance.get("feature_dtype", "float16")),
            reader="fast" if run.provenance.get("read_mode") == "fast" else "auto",
        )
    )
    return True


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
    usable = {s: p for s, p in slides.items() if p is not None}
    if not usable:
        return [SlideInput(s, None, None, "slide file not found") for s in slides]
    clear_stale(work, usable, tiling, read_mpp_csv(cfg.mpp_csv))
    extracted = _tile_and_extract(run, usable, cfg, work, tiling)
    caches = sorted(p for p in (work / "features").glob("*") if p.is_dir())
    tables = [work / "tiles" / "tiling.csv"]
    tables += [c / "extract.csv" for c in caches] if extracted else []
    reasons = _reasons(tables)  # slides tile or extract failed in this call: never scored
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


def prepare_inputs(
    run: TrainedRun,
    cfg: HeatmapConfig,
    skip: Callable[[str, Path | None], bool] | None = None,
    own_masks: bool = True,
) -> tuple[list[SlideInput], list[str]]:
    """The slides of ``cfg`` with features that match the run, and the ids that ``skip`` (given
    each id and the slide file found for it) leaves out; ``own_masks=False``: the slides are not
    the run's (see :func:`extracted_inputs`)."""
    folder = _cache_folder(Path(cfg.features_dir), run) if cfg.features_dir else None
    found = find_input_slides(cfg, folder)
    skipped = sorted(s for s, p in found.items() if skip is not None and skip(s, p))
    slides = {s: p for s, p in found.items() if s not in skipped}
    if not slides:
        return [], skipped
    if folder is not None:
        render = not isinstance(cfg, PredictConfig) or cfg.heatmaps
        return cached_inputs(run, slides, folder, render), skipped
    return extracted_inputs(run, slides, cfg, own_masks), skipped
