"""A trained run applied to slides: features made exactly as the run's, and the fold ensemble.

Features either come from a given cache folder, which must match the run's recorded encoder,
weights and tiling (a mismatch is refused: the models would silently score garbage), or are made
on the fly by `tile` and `extract` with the run's recorded settings in ``<output_dir>/_work``
(see `work`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from os.path import lexists
from pathlib import Path
from typing import Any

from melanoma_mil.config import (
    EncoderConfig,
    HeatmapConfig,
    PredictConfig,
    TilingConfig,
    TissueConfig,
)
from melanoma_mil.data.bags import bag_files, bag_path, read_attrs
from melanoma_mil.errors import UserError
from melanoma_mil.features.identity import feature_identity, identity_mismatch, plain
from melanoma_mil.ids import (
    check_slide_id,
    check_spellings,
    held_ids,
    id_problem,
    rename_or_move,
)
from melanoma_mil.io import sha256_file
from melanoma_mil.outdir import read_marker, refuse_in_the_way, refuse_unknown
from melanoma_mil.rundir import EVALUATION, REPORT, TrainedRun
from melanoma_mil.tiling.coords import read_coords
from melanoma_mil.tiling.find import find_slides
from melanoma_mil.tiling.fingerprint import fingerprint_mismatch

log = logging.getLogger(__name__)

WORK = "_work"  # the tiles and features a call makes on the fly (`inference.work`)
PATIENTS = "patient_predictions.csv"
ATTENTION_FILE = "attention.h5"
# all of a slide's files in <output_dir>/<slide_id>/, attention.h5 written last
SLIDE_FILES = (ATTENTION_FILE, "heatmap.png", "montage.png", "tiles.geojson")
# what each command makes in output_dir beside the slides' folders: no slide's folder
OWN_ENTRIES = {
    "predict": ("predictions.csv", PATIENTS, REPORT, EVALUATION, WORK),
    "heatmap": ("heatmaps.csv", WORK),
}


@dataclass(frozen=True)
class SlideInput:
    """One slide to analyse: where its pixels and features are, or why they are missing."""

    slide_id: str
    slide_path: Path | None
    features: Path | None
    reason: str = ""
    # why the slide is scored but not drawn (its bag holds no tile geometry), '' if drawn
    no_drawing: str = ""


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
    # the very file the run's features were made from (its sha256): trusted then
    return EncoderConfig(name=name, weights=str(path), pretrained=False, trust_weights=True)


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


def find_input_slides(
    cfg: HeatmapConfig, features: Path | None, render: bool
) -> dict[str, Path | None]:
    """slide_id -> slide file: slides_dir / manifest, else the paths a feature cache recorded,
    whose file names are then the slide ids, checked as a manifest's against output_dir where
    each slide gets a folder (``render``)."""
    # slide folders drawn by earlier calls: a user's folder beside them holds none of their files
    held = held_ids(cfg.output_dir, holding=SLIDE_FILES) if render else []
    if cfg.slides_dir or cfg.manifest:
        found: dict[str, Path | None] = dict(
            find_slides(cfg.slides_dir, cfg.manifest, cfg.extensions, cfg.output_dir, held=held)
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
    for sid, path in files.items():  # their names are the slide ids
        check_slide_id(sid, f"feature file '{path}' (rename it to <slide_id>.h5 or remove it)")
    recorded = {s: _recorded_slide(p) for s, p in sorted(files.items())}
    # exists, not is_file: a DICOM slide is a folder
    found = {s: Path(p) if p and Path(p).exists() else None for s, p in recorded.items()}
    source = f"features_dir '{features}'"
    chosen = _select(found, list(cfg.slide_ids), source)
    if render:
        check_spellings(
            list(chosen), source, cfg.output_dir, rename_or_move("feature files"), held=held
        )
    return chosen


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
    run: TrainedRun, slides: dict[str, Path | None], folder: Path, render: bool, must_draw: bool
) -> list[SlideInput]:
    """Inputs from a feature cache; every file is checked against the run before any work.
    For drawing (``render``), a bag without tile geometry fails its slide when ``must_draw``
    (`heatmap`) and is scored undrawn otherwise (`predict`); a cache of only such bags is
    refused."""
    inputs = []
    flat: list[str] = []  # why each bag without tile geometry cannot be drawn
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
        if not why and render and (undrawn := no_geometry(path)):
            flat.append(undrawn)
            if not must_draw:
                inputs.append(SlideInput(sid, slide, path, no_drawing=undrawn))
                continue
            why = undrawn
        inputs.append(SlideInput(sid, slide, None, why) if why else SlideInput(sid, slide, path))
    if inputs and len(flat) == len(inputs):
        raise UserError(
            f"{flat[0]}: features_dir '{folder}' holds bags without tile geometry (CLAM h5/pt); "
            "pass heatmaps=false to `predict` to score them, or drop features_dir to tile and "
            "extract the slides."
        )
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
    render = not isinstance(cfg, PredictConfig) or cfg.heatmaps
    found = find_input_slides(cfg, folder, render)
    if render and not cfg.overwrite:
        _refuse_unknown_files(Path(cfg.output_dir), list(found))
    skipped = sorted(s for s, p in found.items() if skip is not None and skip(s, p))
    slides = {s: p for s, p in found.items() if s not in skipped}
    if not slides:
        return [], skipped
    if folder is not None:
        must_draw = not isinstance(cfg, PredictConfig)  # `heatmap` exists to draw
        inputs = cached_inputs(run, slides, folder, render, must_draw)
        drawn = [i.slide_id for i in inputs if i.features is not None and not i.no_drawing]
        _refuse_files_at_folders(cfg, drawn if render else [])
        return inputs, skipped
    from melanoma_mil.inference.work import extracted_inputs  # it builds on this module

    _refuse_files_at_folders(cfg, list(slides) if render else [])  # before tiling them
    return extracted_inputs(run, slides, cfg, own_masks), skipped


def _refuse_unknown_files(out: Path, ids: list[str]) -> None:
    """In an output_dir no call has marked yet, refuse the slide files (`SLIDE_FILES`, a link
    too) in the folders of ``ids``, this call's slides: it would replace them, or remove them
    if not redrawn, and no earlier call is known to have made them. Other folders there (a
    user's figures/ holding a heatmap.png) are never written: left alone, not refused."""
    if read_marker(out) is not None:  # the command's, checked by `outdir.claim_output`
        return
    found = [f"{sid}/{name}" for sid in ids for name in SLIDE_FILES if lexists(out / sid / name)]
    refuse_unknown(out, found)


def _refuse_files_at_folders(cfg: HeatmapConfig, drawn: list[str]) -> None:
    """Refuse a slide this call draws whose folder would be one of the command's own entries
    (`OWN_ENTRIES`: 'predictions.csv.svs' crashed the call after all its work), and a file of
    the user's named as such a folder, before any work: else that slide fails on it after its
    features are made (`outdir.refuse_in_the_way`)."""
    command = "predict" if isinstance(cfg, PredictConfig) else "heatmap"
    own = {name.casefold(): name for name in OWN_ENTRIES[command]}  # case: macOS, Windows
    for sid in drawn:
        if sid.casefold() in own:
            raise UserError(
                f"slide '{sid}': its folder in output_dir would be '{Path(cfg.output_dir) / sid}'"
                f", where `{command}` writes its {own[sid.casefold()]}; rename the slide file, "
                "or list it under another slide_id in a manifest."
            )
    refuse_in_the_way(cfg.output_dir, command, drawn)
