"""The configs of the commands that take `fit`'s runs: `sweep` (fits of a grid), `compare`,
`heatmap`, `predict` and `evaluate`."""

from __future__ import annotations

from dataclasses import dataclass, field

from melanoma_mil.config.fit import ClinicalKeys, FitConfig
from melanoma_mil.config.slides import TileConfig
from melanoma_mil.config.tools import bounded, choice


@dataclass
class SweepConfig(FitConfig):
    """`sweep SWEEP.yaml`: every other key is a fit override applied to all runs."""

    output_dir: str = "runs/sweep"  # one fit per run in <output_dir>/<NNN>_<parameters>
    sweep_file: str | None = None
    # total runs (None: the whole grid; required for random/bayes)
    count: int | None = bounded(None, 1)


@dataclass
class CompareConfig:
    """`compare RUN_DIR ...`: paired comparison of fit runs on identical splits."""

    run_dirs: list[str] = field(default_factory=list)
    reference: str | None = None  # run dir (or its name) the others are compared to
    output_dir: str = "runs/compare"
    # patient-level bootstrap replicates (CIs and the paired test)
    bootstrap: int = bounded(2000, 100)
    seed: int = bounded(0, 0)  # numpy's generators refuse negative seeds
    overwrite: bool = False


@dataclass
class HeatmapConfig:
    """`heatmap`: per-tile attention of every fold model, drawn on the slide.

    Writes <output_dir>/<slide_id>/{attention.h5, heatmap.png, montage.png[, tiles.geojson]}
    and heatmaps.csv; slides whose attention.h5 exists (same slide file, mpp_csv row,
    precision, top_k and thumbnail_size) are skipped unless overwrite=true.
    """

    run_dir: str | None = None  # a `fit` output folder
    slides_dir: str | None = None
    manifest: str | None = None  # CSV with slide_id, path (instead of slides_dir)
    output_dir: str = "runs/heatmaps"
    slide_ids: list[str] = field(default_factory=list)  # empty: every slide found
    # a cache folder of <slide_id>.h5 made like the run's (checked); None: tile + extract into
    # <output_dir>/_work with the run's recorded tiling and encoder
    features_dir: str | None = None
    encoder_weights: str | None = None  # the weights file, when the run's encoder used one
    # CSV slide_id,mpp for slides that record no resolution (tiled into <output_dir>/_work)
    mpp_csv: str | None = None
    top_k: int = bounded(8, 1)  # montage: the k most and k least attended tiles
    thumbnail_size: int = bounded(2048, 64)  # long side (px) of the heatmap drawing
    geojson: bool = False  # tiles.geojson with scores, for QuPath
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # extraction autocast: run (as recorded)
    precision: str = choice("run", "run", "auto", "fp32", "bf16", "fp16")
    batch_size: int = bounded(64, 1)  # extraction batch (tiles)
    # tiling processes (None: 2) and extract's tile readers (None: extract's default)
    num_workers: int | None = bounded(None, 0)
    overwrite: bool = False
    extensions: list[str] = field(default_factory=lambda: list(TileConfig().extensions))


@dataclass
class PredictConfig(ClinicalKeys, HeatmapConfig):
    """`predict`: the fold-model ensemble (mean probability) on new slides.

    Writes <output_dir>/predictions.csv, with heatmaps=true each slide's heatmap files, and with
    patients_csv patient_predictions.csv.
    """

    output_dir: str = "runs/predict"
    heatmaps: bool = True
    # CSV with slide_id, patient_id: also score each patient's slides pooled into one bag (how
    # a data.bag_level=patient run was trained) into patient_predictions.csv
    patients_csv: str | None = None
    # with labels_csv (slide_id, label[, patient_id]) and/or clinical_csv: `evaluate` the
    # predictions into <output_dir>/report.html
    labels_csv: str | None = None


@dataclass
class EvaluateConfig(ClinicalKeys):
    """`evaluate`: classification, calibration and survival of predictions; report.html.

    predictions: fit's predictions.csv (out of fold), predict's predictions.csv or
    patient_predictions.csv. Rows are scored per patient (a patient's slides averaged) unless
    level=slide. Writes evaluation.json, roc.png, pr.png, calibration.png, km.png (with
    clinical_csv) and a self-contained report.html into output_dir.
    """

    predictions: str | None = None
    output_dir: str = "runs/evaluate"
    labels_csv: str | None = None  # slide_id, label[, patient_id]; the run's label_map applies
    level: str = choice("patient", "patient", "slide")
    # the `fit` run (classes, label_map, provenance); default: predictions' folder if a run
    run_dir: str | None = None
    heatmaps_dir: str | None = None  # <slide_id>/heatmap.png (default: predictions' column)
    top_heatmaps: int = bounded(6, 0)  # the highest and lowest scored slides' heatmaps
    bootstrap: int = bounded(2000, 100)  # patient bootstrap replicates for the 95% CIs
    calibration_bins: int = bounded(10, 2)
    seed: int = bounded(0, 0)  # numpy's generators refuse negative seeds
    overwrite: bool = False
