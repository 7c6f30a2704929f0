"""`demo`: a synthetic cohort through the whole pipeline, tile -> extract -> fit -> heatmaps ->
evaluate (survival of the predicted groups against planted survival, report.html).

Immune-high slides carry planted lymphocyte-like clusters whose masks are known, so the demo
ends with a localisation score: the share of attention inside the planted regions over their
share of the tissue (1.0 = chance).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from melanoma_mil.config import (
    DemoConfig,
    EvaluateConfig,
    ExtractConfig,
    FitConfig,
    HeatmapConfig,
    TileConfig,
    TilingConfig,
    check,
)
from melanoma_mil.data.splits import make_splits
from melanoma_mil.demo.owned import claim
from melanoma_mil.demo.synth import generate_cohort, plan_cohort
from melanoma_mil.encoders import get_spec
from melanoma_mil.errors import UserError
from melanoma_mil.evaluation.evaluate import evaluate, summary_line
from melanoma_mil.evaluation.localisation import cohort_localisation
from melanoma_mil.features.run import run_extract
from melanoma_mil.inference.heatmap import run_heatmap
from melanoma_mil.io import write_text
from melanoma_mil.tiling.run import run_tile
from melanoma_mil.training.cv import run_fit

log = logging.getLogger(__name__)

# where the demo writes (folders end in '/'): a file of yours there stops any rerun
WRITES = (
    "cohort/slides/", "cohort/masks/", "cohort/synth.json", "cohort/labels.csv",
    "cohort/cohort.csv", "cohort/clinical.csv", "tiles/", "features/", "fit/", "heatmaps/",
    "evaluate/", "localisation.csv",
)  # fmt: skip

# where the stages check and redo their own half-done work: what a killed demo wrote there
# after its record's last touch is taken as its own (a rerun resumes over it)
RESUMABLE = ("tiles/", "features/")
FINAL = "evaluate/report.html"  # the last file a demo writes: recorded once it finished


def _step(name: str, call: Callable[[], Any], beat: Callable[[], None]) -> Any:
    """Run one stage, log its time and ``beat`` (so a kill right after it leaves every file of
    the stage recorded as the demo's); a nonzero exit code stops the demo."""
    started = time.perf_counter()
    result = call()
    beat()
    log.info("demo: %s done in %.0f s", name, time.perf_counter() - started)
    if isinstance(result, int) and result != 0:
        raise UserError(f"demo step '{name}' failed (exit {result}); see the messages above.")
    return result


def _features_dir(extract_out: Path) -> Path:
    """The cache folder `extract` wrote (<output_dir>/<cache_key>)."""
    caches = [p for p in extract_out.iterdir() if p.is_dir() and any(p.glob("*.h5"))]
    if len(caches) != 1:
        raise UserError(
            f"{extract_out}: expected one feature cache, found {len(caches)}; "
            "rerun the demo with overwrite=true."
        )
    return caches[0]


def _fit_config(cfg: DemoConfig, out: Path) -> FitConfig:
    """The demo's `fit` (data.features_dir is set once `extract` has made the cache)."""
    fit = FitConfig(output_dir=str(out / "fit"), seed=cfg.seed, logger="csv")
    fit.data.labels_csv = str(out / "cohort" / "labels.csv")
    fit.data.classes = ["immune_low", "immune_high"]
    fit.data.standardize = True  # random-encoder features vary on a tiny scale
    fit.cv.folds = cfg.folds
    fit.trainer.max_epochs = cfg.max_epochs
    fit.optim.lr = cfg.lr
    return fit


def check_demo(cfg: DemoConfig) -> None:
    """Every setting, alone and together (folds vs the cohort), before anything is written."""
    check(cfg)
    spec = get_spec(cfg.encoder.name)
    if cfg.encoder.weights and not Path(cfg.encoder.weights).expanduser().is_file():
        raise UserError(f"encoder.weights '{cfg.encoder.weights}' not found: check the path.")
    if cfg.encoder.pretrained and not cfg.encoder.weights and spec.hub is None:
        raise UserError(
            f"encoder '{spec.name}' has no hub copy of its weights: pass encoder.weights=PATH "
            "or encoder.pretrained=false."
        )
    fit = _fit_config(cfg, Path(cfg.output_dir))
    check(fit)
    if not _splits_fit(cfg.n_slides, cfg.folds, fit):
        patients = plan_cohort(cfg.n_slides, cfg.seed).groupby("label")["patient_id"].nunique()
        low = max(cfg.n_slides + 1, 2 * cfg.folds)  # each class needs a patient per fold
        more = next((n for n in range(low, low + 64) if _splits_fit(n, cfg.folds, fit)), None)
        fewer = [k for k in range(2, cfg.folds) if _splits_fit(cfg.n_slides, k, fit)]
        fix = f"Raise n_slides (n_slides={more} fits)" if more else "Raise n_slides"
        raise UserError(
            f"demo folds={cfg.folds} does not fit n_slides={cfg.n_slides}: it makes "
            f"{patients.to_dict()} patients (some have two slides), and each class needs a "
            f"patient in every test fold and 2 in every training fold. {fix}"
            + (f" or lower folds (folds={fewer[-1]} fits)." if fewer else ".")
        )


def _splits_fit(n_slides: int, folds: int, fit: FitConfig) -> bool:
    """Whether fit's splits into ``folds`` can be made on the demo cohort of ``n_slides``."""
    plan = plan_cohort(n_slides, fit.seed)
    bags = plan.assign(bag_id=plan["slide_id"], label=plan["label"].map(fit.data.classes.index))
    try:
        make_splits(bags, replace(fit.cv, folds=folds), fit.cv.seed, fit.data.classes)
    except UserError:
        return False
    return True


def run_demo(cfg: DemoConfig) -> int:
    """Generate the cohort and run every stage on it; print where each output is.

    Everything is checked first; output_dir must be new, empty or an earlier demo's,
    overwrite=true deletes only what a demo made there, and a file of the user's where the
    demo writes stops any rerun before it writes (see `demo.owned`)."""
    check_demo(cfg)
    out = Path(cfg.output_dir)
    ledger = claim(out, cfg.overwrite, WRITES, RESUMABLE)
    if not cfg.overwrite and FINAL in ledger.files:  # stopped any earlier, it resumes
        raise UserError(
            f"'{out}' already holds a finished demo; pass overwrite=true or choose "
            "another output_dir."
        )
    ledger.start()
    try:
        return _run(cfg, out, ledger.beat)
    finally:
        ledger.finish()


def _run(cfg: DemoConfig, out: Path, beat: Callable[[], None]) -> int:
    start = time.perf_counter()
    _step(
        "generate slides",
        lambda: generate_cohort(
            out / "cohort",
            n_slides=cfg.n_slides,
            seed=cfg.seed,
            size=cfg.slide_size,
            overwrite=cfg.overwrite,  # also remakes a cohort a killed demo left unrecorded
        ),
        beat,
    )
    slides = str(out / "cohort" / "slides")
    tiling = TilingConfig(mpp=cfg.mpp, tile_size=cfg.tile_size)
    tile = TileConfig(slides_dir=slides, output_dir=str(out / "tiles"), tiling=tiling)
    _step("tile", lambda: run_tile(tile), beat)
    extract = ExtractConfig(
        slides_dir=slides,
        coords_dir=str(out / "tiles"),
        output_dir=str(out / "features"),
        encoder=cfg.encoder,
        batch_size=cfg.batch_size,
    )
    _step("extract", lambda: run_extract(extract), beat)
    features = _features_dir(out / "features")
    fit = _fit_config(cfg, out)
    fit.data.features_dir = str(features)
    _step("fit", lambda: run_fit(fit), beat)
    heatmaps = out / "heatmaps"
    heatmap = HeatmapConfig(
        run_dir=fit.output_dir,
        slides_dir=slides,
        output_dir=str(heatmaps),
        features_dir=str(features),
    )
    _step("heatmaps", lambda: run_heatmap(heatmap), beat)
    _localisation(out, heatmaps)
    beat()
    ev = _step(
        "evaluate",
        lambda: evaluate(
            EvaluateConfig(
                predictions=str(out / "fit" / "predictions.csv"),
                clinical_csv=str(out / "cohort" / "clinical.csv"),
                covariates=["age", "sex"],
                run_dir=fit.output_dir,
                heatmaps_dir=str(heatmaps),
                output_dir=str(out / "evaluate"),
                seed=cfg.seed,
            )
        ),
        beat,
    )
    print(f"survival by predicted group (planted: immune-high live longer): {summary_line(ev)}")
    print(f"demo finished in {time.perf_counter() - start:.0f} s. Outputs in {out}/:")
    _list_outputs(features)
    return 0


def _localisation(out: Path, heatmaps: Path) -> None:
    """Score and print how much attention falls in the planted regions (localisation.csv)."""
    scores = cohort_localisation(out / "cohort" / "cohort.csv", heatmaps)
    write_text(out / "localisation.csv", scores.to_csv(index=False))
    high = scores[scores["label"] == "immune_high"]["localisation"]
    print(
        f"\nlocalisation on immune-high slides (attention share in planted regions / their "
        f"tissue share; 1.0 = chance): median {high.median():.2f}, "
        f"range {high.min():.2f}-{high.max():.2f} over {len(high)} slides"
    )


def _list_outputs(features: Path) -> None:
    for path, what in (
        ("cohort/", "synthetic slides, planted-region masks, labels.csv, clinical.csv"),
        ("tiles/qc/", "tissue + tile QC images"),
        (f"features/{features.name}/", "feature bags (h5)"),
        ("fit/", "cv_summary.json, predictions.csv, roc.png, fold models"),
        ("heatmaps/", "attention heatmaps and top/bottom tile montages per slide"),
        ("localisation.csv", "per-slide localisation score"),
        ("evaluate/", "report.html (one file, opens offline), evaluation.json, figures"),
    ):
        print(f"  {path:<28} {what}")
