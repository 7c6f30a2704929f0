"""`extract`: real OpenSlide reads into h5 bags; resume, kill, locks, ranks, cache keys."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CMU, make_cohort, write_grid

from melanoma_mil.cli import main
from melanoma_mil.config import EncoderConfig, ExtractConfig
from melanoma_mil.errors import UserError
from melanoma_mil.features import run as features_run
from melanoma_mil.features.run import run_extract
from melanoma_mil.outdir import MARKER
from melanoma_mil.tiling.coords import TileGrid, read_coords, write_coords

ROOT = Path(__file__).resolve().parents[1]
CONTRACT_ATTRS = {
    "encoder", "encoder_weights", "encoder_pretrained", "embed_dim", "transform", "precision",
    "cache_key", "package_version", "tile_size", "target_mpp", "level0_mpp", "patch_level",
    "downsample", "read_size", "level0_size", "slide_path", "tiling",
}  # fmt: skip


def cfg_for(tiles: Path, out: Path, name: str = "resnet18_imagenet", **kw: object) -> ExtractConfig:
    kw.setdefault("num_workers", 0)
    kw.setdefault("batch_size", 16)
    return ExtractConfig(
        coords_dir=str(tiles),
        output_dir=str(out),
        encoder=EncoderConfig(name=name, pretrained=False),
        device="cpu",
        **kw,  # type: ignore[arg-type]
    )


def bags(out: Path) -> dict[str, Path]:
    return {p.stem: p for p in out.glob("*/*.h5")}


def report(out: Path) -> pd.DataFrame:
    (csv,) = out.glob("*/extract.csv")
    return pd.read_csv(csv).set_index("slide_id")


def test_generated_slides_give_bags_with_contract_attrs_and_a_rerun_skips(tmp_path: Path) -> None:
    tiles = make_cohort(tmp_path, 2)
    out = tmp_path / "features"
    assert run_extract(cfg_for(tiles, out, num_workers=1)) == 0
    found = bags(out)
    assert sorted(found) == ["slide0", "slide1"]
    for sid, path in found.items():
        grid = read_coords(tiles / "coords" / f"{sid}.h5")
        with h5py.File(path, "r") as f:
            assert f["features"].shape == (36, 512) and f["features"].dtype == np.float16
            assert np.array_equal(f["coords"][:], grid.coords)
            assert set(f.attrs) >= CONTRACT_ATTRS
            assert f.attrs["encoder"] == "resnet18_imagenet"
            assert f.attrs["encoder_weights"] == "random" and not f.attrs["encoder_pretrained"]
            assert f.attrs["cache_key"] == path.parent.name
            assert f.attrs["tile_size"] == 64 and f.attrs["slide_path"] == grid.slide_path
            assert np.isfinite(f["features"][:]).all() and f["features"][:].std() > 0
    assert set(report(out)["status"]) == {"ok"}
    stamps = {sid: p.stat().st_mtime_ns for sid, p in found.items()}

    assert run_extract(cfg_for(tiles, out)) == 0
    assert set(report(out)["status"]) == {"skipped"}
    assert {sid: p.stat().st_mtime_ns for sid, p in bags(out).items()} == stamps

    # re-tiled with other tissue settings: the stale bag is reported, kept, then replaced on request
    grid = read_coords(tiles / "coords" / "slide1.h5")
    write_coords(tiles / "coords" / "slide1.h5", replace(grid, coords=grid.coords[::2]))
    assert run_extract(cfg_for(tiles, out)) == 1
    assert "overwrite=true" in report(out).loc["slide1", "reason"]
    assert found["slide1"].stat().st_mtime_ns == stamps["slide1"]
    assert run_extract(cfg_for(tiles, out, overwrite=True)) == 0
    with h5py.File(found["slide1"], "r") as f:
        assert f["features"].shape == (18, 512)


def test_a_resumed_run_reports_progress_over_the_slides_left_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The bar's total leaves out cached slides: a run resuming a nearly finished cohort ends at
    100% and its ETA is for what is left, not for tiles it will never encode."""
    tiles = make_cohort(tmp_path, 3)
    out = tmp_path / "features"
    assert run_extract(cfg_for(tiles, out)) == 0
    bags(out)["slide1"].unlink()
    capsys.readouterr()
    assert run_extract(cfg_for(tiles, out)) == 0
    said = capsys.readouterr()
    last = [line for line in said.err.splitlines() if "tile/s" in line][-1]
    assert "36/36" in last and "100%" in last, last
    # the cache folder fit takes, on a line of its own at the end (README: "it prints it")
    (key,) = {p.parent.name for p in bags(out).values()}
    assert said.out.rstrip().endswith(f"features: data.features_dir={out / key}"), said.out


def test_changed_encoder_or_tile_size_never_reuses_the_cache(tmp_path: Path) -> None:
    tiles = make_cohort(tmp_path, 1)
    out = tmp_path / "features"
    assert run_extract(cfg_for(tiles, out)) == 0
    first = {p.parent.name for p in out.glob("*/*.h5")}
    # Same ResNet18 architecture, different weights source and normalisation: a new cache.
    assert run_extract(cfg_for(tiles, out, name="ciga_simclr_resnet18")) == 0
    write_grid(tiles, tmp_path / "slides" / "slide0.tif", 384, 96)  # re-tile at 96 px
    assert run_extract(cfg_for(tiles, out)) == 0
    keys = sorted(p.parent.name for p in out.glob("*/*.h5"))
    assert len(keys) == len(set(keys)) == 3 and first < set(keys)
    by_key = {k: h5py.File(out / k / "slide0.h5", "r") for k in keys}
    shapes = sorted((f["features"].shape, f.attrs["encoder"]) for f in by_key.values())
    assert shapes == [
        ((16, 512), "resnet18_imagenet"),
        ((36, 512), "ciga_simclr_resnet18"),
        ((36, 512), "resnet18_imagenet"),
    ]


def test_real_aperio_slide_with_slides_dir_and_a_vit(tmp_path: Path) -> None:
    if not CMU.is_file():
        pytest.skip(f"real test slide {CMU} not present")
    import openslide

    with openslide.OpenSlide(str(CMU)) as s:
        mpp = float(s.properties["openslide.mpp-x"])
    coords = np.array([(x, y) for y in (0, 1000, 2000) for x in (0, 900, 1800)], np.int64)
    grid = TileGrid(coords, str(CMU), 0, 1.0, 256, 256, mpp, 0.5, {"mpp": 0.5, "tile_size": 256})
    write_coords(tmp_path / "tiles" / "coords" / "cmu_small_region.h5", grid)
    cfg = cfg_for(tmp_path / "tiles", tmp_path / "f", name="vit_s16_imagenet", batch_size=4)
    cfg.slides_dir = str(CMU.parent)
    assert run_extract(cfg) == 0
    (path,) = bags(tmp_path / "f").values()
    with h5py.File(path, "r") as f:
        assert f["features"].shape == (9, 384)
        assert json.loads(f.attrs["transform"])["resize"] == 224  # 256 px tiles -> ViT input
        assert f.attrs["level0_mpp"] == pytest.approx(mpp)
        assert f.attrs["slide_path"] == str(CMU)
        feats = f["features"][:].astype(np.float32)
    assert np.isfinite(feats).all()
    assert np.abs(feats[0] - feats[4]).max() > 0  # different tissue, different features


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_slides_are_reported_and_skipped_without_partial_files(
    tmp_path: Path, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bad slides come first (sorted ids): reader processes must recover for slide0 (reading
    each batch in 3 parts, so the slide claimed ahead is queued again part by part)."""
    from melanoma_mil.features import placement

    monkeypatch.setattr(placement, "READ_PART_BYTES", 6 * 64 * 64 * 3)
    tiles = make_cohort(tmp_path, 1)
    slides = tmp_path / "slides"
    good = (slides / "slide0.tif").read_bytes()
    damaged = bytearray(good)
    damaged[len(good) // 4 : len(good) // 4 + len(good) // 4] = bytes(len(good) // 4)
    (slides / "damaged.tif").write_bytes(bytes(damaged))  # opens, then a tile fails to decode
    (slides / "garbage.tif").write_bytes(b"definitely not a slide")
    for name in ("damaged", "garbage", "missing"):
        write_grid(tiles, slides / f"{name}.tif", 384, 64)
    out = tmp_path / "features"
    assert run_extract(cfg_for(tiles, out, num_workers=workers)) == 1
    rep = report(out)
    assert rep.loc["slide0", "status"] == "ok"
    if workers:  # same tiles, same batches: the same features as in-process reads
        ref = make_cohort(tmp_path / "ref", 1)
        assert run_extract(cfg_for(ref, tmp_path / "ref_features")) == 0
        (a,), (b,) = bags(tmp_path / "ref_features").values(), [bags(out)["slide0"]]
        with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
            np.testing.assert_array_equal(fa["features"][:], fb["features"][:])
    for sid in ("damaged", "garbage", "missing"):
        assert rep.loc[sid, "status"] == "failed" and len(rep.loc[sid, "reason"]) > 10
    assert "JPEG" in rep.loc["damaged", "reason"] or "OpenSlide" in rep.loc["damaged", "reason"]
    assert "not found" in rep.loc["missing", "reason"]
    assert sorted(bags(out)) == ["slide0"]
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.lock"))


def test_reader_processes_read_parts_that_join_into_the_same_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU batch is read in parts by several processes and joined again before the forward:
    the same batches, so the features of in-process reads of whole batches, bit for bit."""
    from melanoma_mil.features import placement
    from melanoma_mil.features.pipeline import Engine

    tiles = make_cohort(tmp_path, 2)  # 36 tiles of 64 px a slide
    monkeypatch.setattr(placement, "READ_PART_BYTES", 6 * 64 * 64 * 3)  # 16 = 5 + 5 + 6
    assert placement.read_parts(16, 64 * 64 * 3) == [(0, 5), (5, 10), (10, 16)]
    sizes: list[int] = []
    batches = Engine._from_processes

    def counted(self: Engine, work: object) -> Iterator[torch.Tensor]:
        for tiles in batches(self, work):  # type: ignore[arg-type]
            sizes.append(len(tiles))
            yield tiles

    monkeypatch.setattr(Engine, "_from_processes", counted)
    parted, whole = tmp_path / "parted", tmp_path / "whole"
    assert run_extract(cfg_for(tiles, parted, num_workers=2)) == 0
    assert sizes == [16, 16, 4] * 2  # the parts joined into the batches asked for
    assert run_extract(cfg_for(tiles, whole)) == 0
    for sid, path in bags(whole).items():
        with h5py.File(path, "r") as fa, h5py.File(bags(parted)[sid], "r") as fb:
            assert fa["features"].shape == (36, 512)
            np.testing.assert_array_equal(fa["features"][:], fb["features"][:])


def test_a_coords_file_rewritten_during_the_run_fails_its_slide_not_mislabels_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reader processes read a slide's grid from its coords file when they reach it, maybe hours
    after extract planned it: tiles of a grid `tile` rewrote meanwhile never go into a bag that
    records the planned coords."""
    import melanoma_mil.features.run as extract_run

    tiles = make_cohort(tmp_path, 2)
    coords = tiles / "coords" / "slide1.h5"
    planned = extract_run._encoder

    def retiled_after_planning(cfg: ExtractConfig, device: torch.device) -> object:
        grid = read_coords(coords)  # same tiles in another order: only the rows differ
        write_coords(coords, replace(grid, coords=grid.coords[::-1].copy()))
        return planned(cfg, device)

    monkeypatch.setattr(extract_run, "_encoder", retiled_after_planning)
    out = tmp_path / "features"
    assert run_extract(cfg_for(tiles, out, num_workers=1)) == 1
    assert "rewritten while extract ran" in report(out).loc["slide1", "reason"]
    assert sorted(bags(out)) == ["slide0"]


def _cli(tiles: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "melanoma_mil", "extract", f"coords_dir={tiles}",
        f"output_dir={out}", "encoder.name=resnet18_imagenet", "device=cpu", *extra,
    ]  # fmt: skip


def test_cli_pretrained_offline_without_cache_fails_with_the_fix(tmp_path: Path) -> None:
    tiles = make_cohort(tmp_path, 1, side=128)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        _cli(tiles, tmp_path / "f"), cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "encoder.weights=PATH" in done.stderr and "Traceback" not in done.stderr
    assert not list((tmp_path / "f").rglob("*.h5"))


def _hf_cache_with_resnet18(home: Path, commit: str) -> str:
    """An HF cache holding timm/resnet18.tv_in1k at ``commit``, laid out as huggingface_hub does."""
    import hashlib

    import timm
    from safetensors.torch import save_file

    repo = home / "hub" / "models--timm--resnet18.tv_in1k"
    snap, blobs = repo / "snapshots" / commit, repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    weights = timm.create_model("resnet18.tv_in1k", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(blobs / "new"))
    sha = hashlib.sha256((blobs / "new").read_bytes()).hexdigest()
    (blobs / "new").rename(blobs / sha)
    (snap / "model.safetensors").symlink_to(f"../../blobs/{sha}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return sha


def test_hub_weights_record_the_revision_and_blob_they_were_loaded_from(tmp_path: Path) -> None:
    """A hub repo can be updated under one name: the bags say which weights made them."""
    tiles = make_cohort(tmp_path, 1, side=128)
    commit = "0123456789abcdef0123456789abcdef01234567"
    sha = _hf_cache_with_resnet18(tmp_path / "hf", commit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = tmp_path / "f"
    done = subprocess.run(
        _cli(tiles, out, "encoder.pretrained=true"), cwd=ROOT, env=env, capture_output=True,
        text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (bag,) = bags(out).values()
    with h5py.File(bag) as f:
        assert f.attrs["encoder_weights"] == "hub:timm/resnet18.tv_in1k"
        assert f.attrs["encoder_hub_revision"] == commit
        assert f.attrs["encoder_weights_sha256"] == sha


def _hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return False
    return True


def test_cli_pretrained_without_network_fails_at_once_not_after_retries(tmp_path: Path) -> None:
    """Offline but not told so (HF_HUB_OFFLINE unset), huggingface_hub retries for ~30 s."""
    if _hub_reachable():
        pytest.skip("huggingface.co is reachable here")
    tiles = make_cohort(tmp_path, 1, side=128)
    env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper()}
    env |= {"HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run(
        _cli(tiles, tmp_path / "f"), cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "cannot be reached" in done.stderr and "not in the HF cache" in done.stderr
    assert "Retrying" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "bad", ["encoder.name=resnet18_imagenett", "encoder.weights=no_such.pt", "device=cuda:x"]
)
def test_a_bad_encoder_setting_fails_before_the_output_folder_exists(
    bad: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiles = make_cohort(tmp_path, 1, side=128)
    out = tmp_path / "f"
    argv = ["extract", f"coords_dir={tiles}", f"output_dir={out}", "device=cpu"]
    assert main([*argv, "encoder.pretrained=false", bad]) == 2
    assert bad.split("=")[1] in capsys.readouterr().err
    assert not out.exists()


def not_built(*_: object, **__: object) -> None:
    raise AssertionError("the encoder was built before the refusal")


@pytest.mark.parametrize(
    "bad", ["output_dir is a file", "tile's output_dir", "a file at the cache"]
)
def test_a_bad_output_folder_is_refused_before_the_encoder_is_built(
    bad: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The encoder (weights loaded, maybe downloaded: minutes for a foundation model) is built
    only once the folders are checked: it was built first, then the folder refused."""
    tiles = make_cohort(tmp_path, 1, side=128)
    out = tmp_path / "f"
    assert run_extract(cfg_for(tiles, out)) == 0
    (cache,) = (p for p in out.iterdir() if p.is_dir())
    mine = {"output_dir is a file": tmp_path / "file", "tile's output_dir": out / MARKER,
            "a file at the cache": cache}[bad]  # fmt: skip
    if bad == "output_dir is a file":
        out = mine
    elif bad == "a file at the cache":
        shutil.rmtree(cache)
    mine.write_text(json.dumps({"command": "tile"}))
    monkeypatch.setattr(features_run, "build_encoder", not_built)
    with pytest.raises(UserError, match=f"'{out}"):
        run_extract(cfg_for(tiles, out))
    assert json.loads(mine.read_text()) == {"command": "tile"}


def test_a_slide_without_coords_is_listed_and_fails_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiles = make_cohort(tmp_path, 2, side=128, tile=64)
    (tiles / "coords" / "slide1.h5").unlink()  # `tile` failed on it
    cfg = cfg_for(tiles, tmp_path / "f", slides_dir=str(tmp_path / "slides"))
    assert run_extract(cfg) == 1
    # the printed table spells the status out (it read "no coor…"; tile's "not started" too)
    assert re.search(r"^slide1 +no coords +", capsys.readouterr().out, re.MULTILINE)
    table = report(tmp_path / "f")
    assert table.loc["slide0", "status"] == "ok"
    assert table.loc["slide1", "status"] == "no coords"
    assert "see tiling.csv" in table.loc["slide1", "reason"]


def test_a_stopped_run_fails_its_slide_with_the_reason_alone() -> None:
    from melanoma_mil.features.pipeline import Stopped, failure

    assert failure(Stopped("stopped: disk full (No space left on device) in /x")) == (
        "stopped: disk full (No space left on device) in /x"
    )
