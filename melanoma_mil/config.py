"""Structured configs for every command: defaults -> YAML files -> dotlist overrides.

Each command has one dataclass schema. ``load_config`` merges the layers with OmegaConf so that
types are checked and an unknown key fails before any work, naming the closest valid key.
Sections are shared between commands (``EncoderConfig`` is used by extract, predict and demo).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from melanoma_mil.configtools import (
    bounded,
    choice,
    pattern,
    positive,
)
from melanoma_mil.configtools import check as check
from melanoma_mil.configtools import describe as describe
from melanoma_mil.configtools import load_config as load_config
from melanoma_mil.configtools import merge_overrides as merge_overrides
from melanoma_mil.configtools import to_checked as to_checked
from melanoma_mil.configtools import to_yaml as to_yaml

# numpy and Lightning take seeds in [0, 2**32) (Lightning silently draws a random one outside):
# room left for the offsets of repeats and folds (seed + 1000 x repeat + fold)
SEED_MAX = 4_000_000_000
# model.name choices live here, not in the model registry, so `--help` and config errors answer
# without importing torch; tests check that the registry holds exactly these names.
MODEL_NAMES = (
    "gated_attention",
    "abmil",
    "clam_sb",
    "clam_mb",
    "transmil",
    "dsmil",
    "topk",
    "mean",
    "max",
)
# weights stay float32: `fit` feeds bags as float32, so Lightning's bf16/16/64-true casts of the
# model fail at the first step ("mat1 and mat2 must have the same dtype")
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed")


# --------------------------------------------------------------------------- clinical evaluation
# survival groups: the predicted class, a split at the median probability, or K quantile groups
GROUPS_FORM = "predicted|median|quantiles:K"
GROUPS_RE = r"predicted|median|quantiles:([2-9]|[1-9][0-9]+)"


@dataclass
class ClinicalKeys:
    """The keys `fit` and `predict` share with `evaluate`: with clinical_csv they evaluate
    their own predictions into <output_dir>/report.html."""

    clinical_csv: str | None = None  # patient_id, time_column, event_column[, covariates]
    time_column: str = "time"
    event_column: str = "event"  # 1 = event, 0 = censored
    covariates: list[str] = field(default_factory=list)  # numeric or categorical columns
    groups: str = pattern("predicted", GROUPS_RE, GROUPS_FORM)
    # binary: the positive class is predicted when its probability is >= threshold
    threshold: float = bounded(0.5, 0.0, 1.0, open_low=True, open_high=True)


CLINICAL_KEYS = tuple(f.name for f in dataclasses.fields(ClinicalKeys))


# --------------------------------------------------------------------------- data / training
@dataclass
class DataConfig:
    """Where the bags and labels are, and how bags are formed and held in memory."""

    features_dir: str | None = None  # folder of <slide_id>.h5 (or CLAM pt_files/<slide_id>.pt)
    labels_csv: str | None = None  # columns slide_id, label[, patient_id]
    label_column: str = "label"
    # raw label -> class name; a raw label mapped to "drop" is excluded (counts are printed)
    label_map: dict[str, str] = field(default_factory=dict)
    # class order; the last class is the positive one for binary AUC. Empty: sorted labels.
    classes: list[str] = field(default_factory=list)
    bag_level: str = choice("slide", "slide", "patient")
    # labelled slides without a feature file: error, or skip them (listed)
    on_missing: str = choice("error", "error", "skip")
    # random subsample of training bags (None: all tiles)
    max_instances: int | None = bounded(None, 1)
    # dtype of the memory-mapped bag store: auto = float16 when every feature file is float16
    # (exact), else float32; float16 halves a float32 cache at a rounding cost
    dtype: str = choice("auto", "auto", "float32", "float16")
    # folder for bag stores (None: <features_dir>/.bag_stores; needed if that is read-only)
    store_dir: str | None = None
    # RAM (GB) the memory pre-check may count on (None: what the machine or job has free)
    memory_gb: float | None = positive(None)
    standardize: bool = True  # z-score each feature dim with training-fold statistics
    # none: plain cross-entropy; sampler: class-balanced sampling; loss: each bag's whole loss
    # (instance loss included) times its class weight (n / (classes x class count))
    balance: str = choice("none", "none", "sampler", "loss")
    num_workers: int = bounded(0, 0)


@dataclass
class CVConfig:
    """Patient-level stratified k-fold with an inner validation split for model selection."""

    folds: int = bounded(5, 2)
    # splits only (model init uses the top-level seed), so seed sweeps share folds
    seed: int = bounded(0, 0, SEED_MAX)
    # share of each training fold's patients used for validation
    val_fraction: float = bounded(0.2, 0, 0.5, open_low=True, open_high=True)
    repeats: int = bounded(1, 1)  # repeated CV with new split seeds
    splits_file: str | None = None  # splits.json written by fit, or CLAM splits_*.csv folder
    # train only these splits (indices, repeat-major; empty: all) into output_dir: several such
    # processes may share one run folder, the last to finish writes the results
    run_folds: list[int] = field(default_factory=list)


@dataclass
class ModelConfig:
    """MIL model (`model.name`) and its head's size; see README "Models"."""

    name: str = choice("gated_attention", *MODEL_NAMES)
    # tile embedding width; None: tied to the feature dim D, D/2 within [128, 512] (CLAM-small's
    # 512 for D >= 1024, 128 for small D; see README "Defaults")
    hidden_dim: int | None = bounded(None, 1)
    attention_dim: int | None = bounded(None, 1)  # None: hidden_dim / 2
    dropout: float = bounded(0.25, 0.0, 1.0, open_high=True)
    k_sample: int = bounded(8, 1)  # clam_sb/clam_mb instance loss: top/bottom-k tiles per bag
    # clam_sb/clam_mb/dsmil: bag loss weight, (1 - w) the instance loss
    bag_weight: float = bounded(0.7, 0.0, 1.0)
    top_k: int = bounded(1, 1)  # topk: tiles per bag that make its prediction (Campanella: 1)
    # topk: the first floor(topk_warmup x epochs) epochs train on the mean of all tile logits, so
    # that the tiles that decide a bag can rank on top before only top tiles are trained (0: none)
    topk_warmup: float = bounded(0.1, 0.0, 0.5)
    # an ensemble of this many independently initialised copies, trained side by side on the
    # same bags, predicting with the mean of their probabilities; None: 3 where trainer.max_epochs
    # is None and the fold is small enough to get its epochs raised (training/selection.py), else 1
    members: int | None = bounded(None, 1)

    def head_widths(self, in_dim: int) -> tuple[int, int]:
        """(hidden, attention) for features of width ``in_dim``: hidden = D/2 within [128, 512]
        (CLAM-small's 512 for D >= 1024; 128 for small D, where 512 overfits and costs 4x the
        compute), attention = hidden / 2, unless set."""
        hidden = self.hidden_dim or min(512, max(128, in_dim // 2))
        return hidden, self.attention_dim or max(1, hidden // 2)


@dataclass
class OptimConfig:
    # adam: weight decay as an L2 term in the gradient (Ilse et al.'s and CLAM's code), which
    # Adam's scaling makes strong on rarely used weights; adamw: decoupled weight decay
    optimizer: str = choice("adam", "adam", "adamw")
    lr: float = positive(5e-4)
    weight_decay: float = bounded(1e-4, 0.0)
    # none: a constant rate, which weight averaging (trainer.average_fraction) wants
    scheduler: str = choice("none", "cosine", "none")


# Lightning's strategy names: "auto" plus its StrategyRegistry (tests check they match), listed
# here so a typo fails at parse time, before a run folder exists, without importing Lightning
STRATEGIES = (
    "auto", "ddp", "ddp_fork", "ddp_notebook", "ddp_spawn", "ddp_find_unused_parameters_false",
    "ddp_find_unused_parameters_true", "ddp_fork_find_unused_parameters_false",
    "ddp_fork_find_unused_parameters_true", "ddp_notebook_find_unused_parameters_false",
    "ddp_notebook_find_unused_parameters_true", "ddp_spawn_find_unused_parameters_false",
    "ddp_spawn_find_unused_parameters_true", "deepspeed", "deepspeed_stage_1", "deepspeed_stage_2",
    "deepspeed_stage_2_offload", "deepspeed_stage_3", "deepspeed_stage_3_offload",
    "deepspeed_stage_3_offload_nvme", "fsdp", "fsdp_cpu_offload", "single_device", "single_tpu",
    "single_xla", "xla", "xla_debug",
)  # fmt: skip
# Lightning's accelerator names: "auto", "gpu" plus its AcceleratorRegistry (tests check them)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


@dataclass
class TrainerConfig:
    """Lightning Trainer settings (only the ones that matter for MIL)."""

    # None: 50 epochs, raised on small cohorts with selection=last to make at least 10,000
    # optimizer steps (training/selection.py); a number is taken as given
    max_epochs: int | None = bounded(None, 1)
    # early_stopping: on the fold's validation split; last: train on train + validation for
    # max_epochs, keep the last weights; auto: early_stopping only when every class has
    # min_val_bags validation bags (see training/selection.py)
    selection: str = choice("auto", "auto", "early_stopping", "last")
    min_val_bags: int = bounded(50, 1)
    # selection=last: test the mean of the weights at the end of this final fraction of the
    # epochs (stochastic weight averaging, Izmailov et al. 2018); 0 tests the last epoch's.
    # topk: no warm-up epoch is averaged, and early stopping runs at least `patience` epochs
    # past the warm-up (min_epochs is raised to that where lower)
    average_fraction: float = bounded(0.5, 0.0, 1.0)
    min_epochs: int = bounded(5, 0)
    patience: int = bounded(10, 1)
    # val_auc saturates on small validation sets
    monitor: str = choice("val_loss", "val_loss", "val_auc")
    accelerator: str = choice("auto", *ACCELERATORS)
    devices: int = bounded(1, 1)
    num_nodes: int = bounded(1, 1)  # machines of a multi-node DDP job (torchrun, SLURM)
    strategy: str = choice("auto", *STRATEGIES)  # ddp: one process per device
    # auto: bf16-mixed on GPUs that support it, else 32-true
    precision: str = choice("auto", *PRECISIONS)
    deterministic: bool = True
    # bags per optimizer step, over all devices (DDP adds one bag per device per step)
    accumulate_grad_batches: int = bounded(1, 1)


@dataclass
class WandbConfig:
    """W&B runs (logger=wandb); files go to <output_dir>/wandb."""

    project: str | None = None  # None: WANDB_PROJECT, else "melanoma-mil"
    entity: str | None = None  # None: WANDB_ENTITY, else your default entity
    # None: WANDB_MODE, else offline without an API key
    mode: str | None = choice(None, "online", "offline", "disabled", None)
    tags: list[str] = field(default_factory=list)


@dataclass
class FitConfig(ClinicalKeys):
    """`fit`: patient-level cross-validation of a MIL model on cached bags (with clinical_csv,
    `evaluate` of the out-of-fold predictions)."""

    output_dir: str = "runs/fit"
    experiment: str | None = None  # W&B group; default: output_dir's name
    seed: int = bounded(0, 0, SEED_MAX)
    overwrite: bool = False
    logger: str = choice("csv", "wandb", "csv", "none")
    data: DataConfig = field(default_factory=DataConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


# --------------------------------------------------------------------------- tiling
SLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".tif", ".tiff", ".scn", ".vms", ".vmu", ".bif")
SLIDE_EXTENSIONS += (".czi", ".dcm", ".btf", ".svslide")


@dataclass
class TissueConfig:
    """Tissue segmentation on a low-resolution thumbnail; unset (None) keys come from `preset`."""

    # faint: pale stain; fatty: adipose with thin septa
    preset: str = choice("default", "default", "faint", "fatty")
    thumbnail_mpp: float = positive(8.0)  # resolution of the segmentation thumbnail
    # fixed HSV saturation cut (0-1); None: Otsu
    saturation_threshold: float | None = bounded(None, 0.0, 1.0)
    # floor under Otsu (0-1), so blank slides yield no tissue
    min_saturation: float | None = bounded(None, 0.0, 1.0)
    blur: int | None = bounded(None, 0)  # median blur kernel (thumbnail px; even: +1)
    close_size: int | None = bounded(None, 0)  # morphological closing (thumbnail px)
    open_size: int | None = bounded(None, 0)  # morphological opening (thumbnail px)
    fill_holes: bool | None = None
    min_area_um2: float | None = bounded(None, 0.0)  # drop tissue components smaller than this


# Resolutions outside this range (um/px) are scanner defaults (72 dpi), typos or garbage.
PLAUSIBLE_MPP = (0.05, 50.0)
# A tile is one encoder input: most encoders shrink it to 224 px (a huge tile loses the detail
# the target mpp asked for) and CNNs run it whole (a batch's memory grows with its area).
MAX_TILE = 4096
MAX_TILE_WHY = (
    "a tile is one encoder input, most shrink it to 224 px; for a wider field of view per tile "
    "raise tiling.mpp instead"
)


@dataclass
class TilingConfig:
    mpp: float = bounded(0.5, *PLAUSIBLE_MPP)  # target microns per pixel (0.5 ~ 20x, 1.0 ~ 10x)
    tile_size: int = bounded(256, 8, MAX_TILE, why=MAX_TILE_WHY)  # pixels at the target mpp
    overlap: int = bounded(0, 0)  # pixels at the target mpp shared by neighbouring tiles
    min_tissue: float = bounded(0.5, 0.0, 1.0)  # keep a tile when this fraction is tissue
    default_mpp: float | None = bounded(None, *PLAUSIBLE_MPP)  # when a slide records none
    mask_dir: str | None = None  # user masks <slide_id>.png / .geojson replace the automatic one
    tissue: TissueConfig = field(default_factory=TissueConfig)


@dataclass
class TileConfig:
    """`tile`: tissue detection and a tile grid at a target resolution."""

    slides_dir: str | None = None
    manifest: str | None = None  # CSV with slide_id, path (instead of slides_dir)
    output_dir: str = "runs/tiles"
    # .dcm: a folder of DICOM WSI files is one slide
    extensions: list[str] = field(default_factory=lambda: list(SLIDE_EXTENSIONS))
    workers: int = bounded(2, 1)
    overwrite: bool = False
    # CSV slide_id,mpp: level-0 resolution per slide, over what the file says (or in its place)
    mpp_csv: str | None = None
    # a claim on a slide (<output_dir>/coords/<id>.lock) whose process is gone, or whose
    # heartbeat is older than this on another host, is taken over
    stale_after_s: float = positive(900.0)
    # a slide still being tiled after this many seconds (a read that never returns: a dead
    # network mount, a FIFO) has its process stopped and fails alone, so the cohort goes on;
    # 0 or null: no limit (then workers=1 tiles in the `tile` process itself; else in a child)
    # Not under tiling: it shapes no coords (tiling.* settings are recorded in each coords file)
    slide_timeout_s: float | None = bounded(3600.0, 0)
    tiling: TilingConfig = field(default_factory=TilingConfig)


# --------------------------------------------------------------------------- extraction
@dataclass
class EncoderConfig:
    name: str = "resnet50_trunc"  # melanoma_mil.encoders.REGISTRY name, or timm:<model>
    weights: str | None = None  # local weights file (state dict / checkpoint / safetensors)
    pretrained: bool = True  # hub / HF cache; false = random weights (recorded as "random")
    # load a weights file that pickles Python objects (e.g. a Lightning checkpoint's
    # hyper-parameters): unpickling runs code from the file, so only one you trust
    trust_weights: bool = False


@dataclass
class ExtractConfig:
    """`extract`: encode every tile of every slide into a cached feature bag.

    Writes <output_dir>/<cache_key>/<slide_id>.h5; reruns skip finished slides, and any number
    of processes or nodes can share one output_dir (each claims the next slide; a dead one's
    slide is taken over; every process ends with the whole cohort's table, extract.csv, and
    exits 0 only when every slide is done). encoder.name: resnet50_trunc
    (CLAM), resnet18_imagenet, vit_s16_imagenet, ciga_simclr_resnet18, retccl_resnet50,
    lunit_dino_vits16, uni, uni2_h, h_optimus_0, virchow2, virchow2_concat, phikon, gigapath,
    or timm:<model>.
    """

    slides_dir: str | None = None  # default: each coords file's recorded slide_path
    manifest: str | None = None
    coords_dir: str | None = None  # a `tile` output folder (its coords/ subfolder is used)
    output_dir: str = "runs/features"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    batch_size: int | None = bounded(None, 1)  # None: 64 on CPU, sized to the GPU's memory
    # reader processes (own slide handle each) overlapping reads with compute; 0: threads
    # in-process between forward passes (best on CPU-only). None: 0 on CPU; on GPU the CPUs this
    # process may use (sched_getaffinity) shared among the ranks on the node, at most 12
    num_workers: int | None = bounded(None, 0)
    # auto: cuda:<LOCAL_RANK or SLURM_LOCALID> among the visible GPUs (CUDA_VISIBLE_DEVICES)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto: the encoder's preferred where fast (bf16 on AMX CPUs)
    precision: str = choice("auto", "auto", "fp32", "bf16", "fp16")
    dtype: str = choice("float16", "float16", "float32")  # stored feature dtype
    # auto: decode JPEG-tiled TIFF/SVS levels directly (~3x cheaper reads) where probe tiles
    # match OpenSlide bit for bit, else read through OpenSlide. fast: also read levels with
    # non-integer downsamples (10x from 40x Aperio) directly at the nearest level pixel (<= 0.5
    # px off OpenSlide's resampling, ~12x faster there); its features go to their own cache
    # (key suffix -fast). openslide: always read through OpenSlide
    reader: str = choice("auto", "auto", "fast", "openslide")
    overwrite: bool = False
    extensions: list[str] = field(default_factory=lambda: list(TileConfig().extensions))
    # see tile's stale_after_s; claims are <output_dir>/<cache_key>/<slide_id>.lock
    stale_after_s: float = positive(900.0)
    # copy features back and write them on a separate thread (false: in line, for debugging)
    async_write: bool = True


# --------------------------------------------------------------------------- tracking
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


# --------------------------------------------------------------------------- interpretation
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


@dataclass
class DemoConfig:
    """`demo`: synthetic cohort -> tile -> extract -> fit -> heatmaps -> evaluate, end to end."""

    output_dir: str = "demo_output"
    n_slides: int = bounded(24, 2)
    slide_size: int = bounded(5632, 1024)  # level-0 px (0.5 um/px) of each synthetic slide
    seed: int = bounded(0, 0, SEED_MAX)  # also fit's seed
    overwrite: bool = False
    mpp: float = positive(1.0)  # tiling resolution (10x, the follow-up paper's best)
    tile_size: int = bounded(224, 8, MAX_TILE, why=MAX_TILE_WHY.replace("tiling.mpp", "mpp"))
    # no weights can be bundled: the demo uses a randomly initialised encoder, recorded as such
    encoder: EncoderConfig = field(
        default_factory=lambda: EncoderConfig(name="resnet18_imagenet", pretrained=False)
    )
    batch_size: int = bounded(32, 1)
    folds: int = bounded(3, 2)
    max_epochs: int = bounded(30, 1)
    lr: float = positive(1e-3)
