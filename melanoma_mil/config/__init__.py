"""Structured configs for every command: defaults -> YAML files -> dotlist overrides.

Each command has one dataclass schema. ``load_config`` merges the layers with OmegaConf so that
types are checked and an unknown key fails before any work, naming the closest valid key.
Sections are shared between commands (``EncoderConfig`` is used by extract, predict and demo).

Modules: `fit` (fit and its sections, the clinical keys), `slides` (tile, extract), `runs`
(sweep, compare, heatmap, predict, evaluate), `demo`; `tools` (declaring, loading, checking),
`files` (YAML files read), `values` (values refused per layer). Import every schema from here.
"""

from melanoma_mil.config.demo import DemoConfig
from melanoma_mil.config.fit import (
    ACCELERATORS,
    CLINICAL_KEYS,
    GROUPS_FORM,
    GROUPS_RE,
    MODEL_NAMES,
    PRECISIONS,
    SEED_MAX,
    STRATEGIES,
    ClinicalKeys,
    CVConfig,
    DataConfig,
    FitConfig,
    ModelConfig,
    OptimConfig,
    TrainerConfig,
    WandbConfig,
)
from melanoma_mil.config.runs import (
    CompareConfig,
    EvaluateConfig,
    HeatmapConfig,
    PredictConfig,
    SweepConfig,
)
from melanoma_mil.config.slides import (
    MAX_TILE,
    MAX_TILE_WHY,
    PLAUSIBLE_MPP,
    SLIDE_EXTENSIONS,
    EncoderConfig,
    ExtractConfig,
    TileConfig,
    TilingConfig,
    TissueConfig,
)
from melanoma_mil.config.tools import (
    check,
    describe,
    load_config,
    merge_overrides,
    to_checked,
    to_yaml,
)

__all__ = [
    "ACCELERATORS",
    "CLINICAL_KEYS",
    "CVConfig",
    "ClinicalKeys",
    "CompareConfig",
    "DataConfig",
    "DemoConfig",
    "EncoderConfig",
    "EvaluateConfig",
    "ExtractConfig",
    "FitConfig",
    "GROUPS_FORM",
    "GROUPS_RE",
    "HeatmapConfig",
    "MAX_TILE",
    "MAX_TILE_WHY",
    "MODEL_NAMES",
    "ModelConfig",
    "OptimConfig",
    "PLAUSIBLE_MPP",
    "PRECISIONS",
    "PredictConfig",
    "SEED_MAX",
    "SLIDE_EXTENSIONS",
    "STRATEGIES",
    "SweepConfig",
    "TileConfig",
    "TilingConfig",
    "TissueConfig",
    "TrainerConfig",
    "WandbConfig",
    "check",
    "describe",
    "load_config",
    "merge_overrides",
    "to_checked",
    "to_yaml",
]
