"""`fit`'s config: its data, cross-validation, model, optimizer, trainer and W&B sections, and
the clinical keys `fit` and `predict` share with `evaluate`; with the fixed choices (model
names, precisions, Lightning's strategies and accelerators) listed without importing them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from melanoma_mil.config.tools import bounded, choice, pattern, positive

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
