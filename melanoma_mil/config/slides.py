"""The configs of the commands that read slides: `tile` (tissue, tiling) and `extract` (the
encoder and how its features are computed and stored)."""

from __future__ import annotations

from dataclasses import dataclass, field

from melanoma_mil.config.tools import bounded, choice, positive

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
