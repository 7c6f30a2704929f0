"""Shared test factories: the session's tiny real pipeline (synthetic slides -> tile ->
extract with a random ResNet18 -> 2-fold fit) and small builders used by several test files."""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning, here and in every
# subprocess. On a loaded 2-core machine two spinning threads starved the other work and made
# small steps 5-20x slower (a 324-step batch-1 extract: 13-23 s against 3 s). How threads wait
# changes no result; a setting of the user's is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from melanoma_mil.config import (
    EncoderConfig,
    ExtractConfig,
    FitConfig,
    TileConfig,
    TilingConfig,
    load_config,
)
from melanoma_mil.demo.pyramid import write_pyramid
from melanoma_mil.demo.synth import generate_cohort
from melanoma_mil.features.run import run_extract
from melanoma_mil.pools import worker_context
from melanoma_mil.tiling.coords import TileGrid, write_coords
from melanoma_mil.tiling.run import run_tile
from melanoma_mil.training.cv import run_fit

CMU = Path(__file__).resolve().parents[2] / "shared/data/cmu_small_region.svs"

SLIDE_PX = 1024  # synthetic slides: 1024 px at 0.5 um/px
TILE = 64  # tiles: 64 px at 1.0 um/px = 128 level-0 px
T = TypeVar("T")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """Workers for pyproject's `-n auto`: one per core this process may run on, at most 8 (each
    builds its own session pipeline). Most tests are single-threaded Python and subprocess
    start-ups, so 2 workers on 2 cores ran the suite in 877 s against 1404 s for one. xdist's
    own count asks psutil for physical cores, which a 2-vCPU machine may report as 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cores or 1))


def pytest_configure(config: pytest.Config) -> None:
    """Before any pool starts it, have this process's forkserver (tile's and the demo's worker
    pools, and test_demo_recovery's demos) import the CLI once, so a demo forked from it starts
    without ~6 s of imports. A hook, not module code: a process a test starts that imports this
    file must not preload torch into its own pools' server."""
    worker_context("melanoma_mil.cli", "melanoma_mil.demo.run")


# Modules holding the suite's longest tests (real DDP, torchrun, demo runs, killed processes),
# run first: xdist hands each worker a contiguous half of the collection and an idle worker
# steals from the tail of the other's queue, so a long test left near the end keeps one
# worker busy while the other idles. Order is all that changes; every test still runs.
SLOW_FIRST = (
    "test_demo.py",
    "test_demo_recovery.py",
    "test_fit.py",
    "test_model_runs.py",
    "test_noflock.py",
    "test_hostile_runs.py",
    "test_extract_share.py",
    "test_sweep_resume.py",
    "test_tile_children.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Move the modules in `SLOW_FIRST` to the front, each kept whole and in its own order."""
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny training steps gain nothing from intra-op threads, and on a loaded machine two
    spinning OpenMP threads make them 10-30x slower (a 25-epoch fit of tests/test_fit.py: 145 s
    against 9 s). Only for training: extract reads tiles in torch.get_num_threads() threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_thread_env() -> dict[str, str]:
    """The environment for a training subprocess: one intra-op thread (see one_torch_thread)."""
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for this test (see one_torch_thread)."""
    with one_torch_thread():
        yield


@dataclass(frozen=True)
class Pipeline:
    root: Path

    @property
    def cohort(self) -> pd.DataFrame:
        return pd.read_csv(self.root / "cohort" / "cohort.csv")

    @property
    def slides(self) -> Path:
        return self.root / "cohort" / "slides"

    @property
    def features(self) -> Path:
        return next(p for p in (self.root / "features").iterdir() if p.is_dir())

    @property
    def run_dir(self) -> Path:
        return self.root / "run"


def tiny_pipeline(factory: pytest.TempPathFactory) -> Pipeline:
    """12 synthetic slides tiled, encoded and fitted (2 folds), once per test session."""
    root = factory.getbasetemp() / "viz_pipeline"
    pipe = Pipeline(root)
    if (pipe.run_dir / "cv_summary.json").is_file():
        return pipe
    generate_cohort(root / "cohort", n_slides=12, size=SLIDE_PX, workers=1)
    tiling = TilingConfig(mpp=1.0, tile_size=TILE)
    tiles = root / "tiles"
    assert (
        run_tile(
            TileConfig(slides_dir=str(pipe.slides), output_dir=str(tiles), workers=1, tiling=tiling)
        )
        == 0
    )
    encoder = EncoderConfig(name="resnet18_imagenet", pretrained=False)
    extract = ExtractConfig(
        coords_dir=str(tiles),
        output_dir=str(root / "features"),
        encoder=encoder,
        batch_size=32,
        num_workers=0,
        device="cpu",
    )
    assert run_extract(extract) == 0
    fit = load_config(
        FitConfig,
        [],
        [
            f"data.features_dir={pipe.features}",
            f"data.labels_csv={root / 'cohort/labels.csv'}",
            f"output_dir={pipe.run_dir}",
            "cv.folds=2",
            "trainer.max_epochs=2",
            "logger=none",
            "trainer.accelerator=cpu",
        ],
    )
    assert run_fit(fit) == 0
    return pipe


@pytest.fixture(scope="session")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """The tiny real pipeline, built once per session and shared (read-only) by every test."""
    return tiny_pipeline(tmp_path_factory)


# --------------------------------------------------------------------------- slides
def tissue_image(size: int = 2048, seed: int = 0) -> np.ndarray:
    """White glass with a textured pink/purple ellipse of 'tissue' (JPEG-friendly detail)."""
    rng = np.random.default_rng(seed)
    tex = ndimage.gaussian_filter(rng.standard_normal((size, size, 3)), (6, 6, 0))
    tex = 170 + 60 * tex / tex.std()
    tissue = np.clip(tex * [1.0, 0.55, 0.85], 0, 255)
    yy, xx = np.mgrid[0:size, 0:size]
    inside = ((yy - size * 0.5) / (size * 0.3)) ** 2 + ((xx - size * 0.45) / (size * 0.33)) ** 2 < 1
    img = np.full((size, size, 3), 245.0)
    img[inside] = tissue[inside]
    return img.astype(np.uint8)


@pytest.fixture(scope="session")
def pyramid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A 0.25 um/px slide with levels at downsample 1, 2, 4 and its source pixels (read-only)."""
    path = tmp_path_factory.mktemp("pyr") / "slides" / "syn.tiff"
    path.parent.mkdir()
    img = tissue_image()
    write_pyramid(path, img, mpp=0.25, n_levels=3)
    return path, img


def textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Random 16-px colour blocks plus noise: every JPEG tile differs, none is blank."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    img = np.kron(blocks, np.ones((16, 16, 1), np.uint8))[:h, :w]
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def make_cohort(root: Path, n: int, side: int = 384, tile: int = 64, seed: int = 0) -> Path:
    """``n`` pyramidal slides with a regular grid of ``tile`` px tiles; returns the tile dir."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        blocks = rng.integers(0, 255, (side // 32, side // 32, 3), dtype=np.uint8)
        img = np.kron(blocks, np.ones((32, 32, 1), np.uint8))
        slide = root / "slides" / f"slide{i}.tif"
        slide.parent.mkdir(parents=True, exist_ok=True)
        write_pyramid(slide, img, mpp=0.5, n_levels=2)
        write_grid(root / "tiles", slide, side, tile)
    return root / "tiles"


def write_grid(tiles: Path, slide: Path, side: int, tile: int, mpp: float = 0.5) -> TileGrid:
    """A coords file (as `tile` writes) of a regular ``tile`` px grid over a ``side`` px slide."""
    xs = np.arange(0, side - tile + 1, tile)
    coords = np.array([(x, y) for y in xs for x in xs], np.int64)
    tiling = {"mpp": mpp, "tile_size": tile, "overlap": 0}
    grid = TileGrid(coords, str(slide), 0, 1.0, tile, tile, mpp, mpp, tiling)
    write_coords(tiles / "coords" / f"{slide.stem}.h5", grid)
    return grid


def inference_cfg(schema: type[T], pipe: Pipeline, out: Path, *extra: str) -> T:
    """A small `predict` / `heatmap` config (``schema``) on the session's run, CPU, no workers."""
    keys = [f"run_dir={pipe.run_dir}", f"output_dir={out}", "device=cpu", "num_workers=0",
            "batch_size=32", "thumbnail_size=128", "top_k=2"]  # fmt: skip
    return load_config(schema, [], [*keys, *extra])


def slide_folder(pipe: Pipeline, root: Path, source: str) -> Path:
    """A folder holding one slide, named S, that is a copy of the session's ``source``."""
    folder = root / source
    folder.mkdir(parents=True)
    shutil.copy(pipe.slides / f"{source}.tiff", folder / "S.tiff")
    return folder


def mounted_tmpfs(path: Path, size: str) -> bool:
    """Mount a tmpfs of ``size`` at the new folder ``path`` (a small disk to fill); False where
    this process may not (not root, no mount)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)  # fmt: skip
    return done.returncode == 0


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """`mounted_tmpfs` at ``path`` for the block, unmounted after it; skips the test where this
    process may not mount."""
    if not mounted_tmpfs(path, size):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def room_for_one_and_a_half(disk: Path, drawn: Path) -> None:
    """Fill ``disk`` (a small tmpfs) but room for 1.5 times the slide folder ``drawn``, as an
    earlier run would have: the second slide drawn there fills it."""
    size = sum(p.stat().st_size for p in drawn.iterdir())
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(bytes(free - size * 3 // 2 - 16384))


@contextmanager
def read_only_bind(folder: Path) -> Iterator[None]:
    """``folder`` (made if missing) read-only for the block, by a read-only bind mount of itself:
    root ignores permission bits, so only a mount refuses root a write. Skips the test where
    this process may not mount."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to bind-mount a read-only folder")
    folder.mkdir(parents=True, exist_ok=True)
    bound = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    try:
        if bound.returncode == 0:
            ro = subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)],
                                capture_output=True)  # fmt: skip
        if bound.returncode or ro.returncode:
            pytest.skip("cannot bind-mount a read-only folder here")
        yield
    finally:
        # a file of it still mapped (a bag store) keeps the mount busy: detached then, freed
        # by the kernel once unmapped, rather than left mounted after the test
        if bound.returncode == 0 and subprocess.run(["umount", str(folder)]).returncode:
            subprocess.run(["umount", "--lazy", str(folder)], check=False)


def untagged_copy(slide: Path, to: Path) -> Path:
    """``slide``'s level 0 as a tiled JPEG TIFF at ``to`` without resolution tags (no mpp)."""
    import openslide
    import tifffile

    with openslide.OpenSlide(str(slide)) as src:
        image = np.asarray(src.read_region((0, 0), 0, src.dimensions).convert("RGB"))
    to.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(to) as tif:
        tif.write(image, tile=(256, 256), photometric="rgb", compression="jpeg")
    return to
