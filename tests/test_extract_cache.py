"""`extract` on a cache it made before: which bags are reused, refused or recomputed, and which
slides end the run as failures (a changed slide, an unreadable coords file, an empty slide,
features that overflow)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_cohort
from test_extract import ROOT

from melanoma_mil.config import EncoderConfig, ExtractConfig
from melanoma_mil.encoders import build_encoder
from melanoma_mil.errors import UserError
from melanoma_mil.features.run import run_extract
from melanoma_mil.tiling.coords import read_coords, write_coords
from melanoma_mil.tiling.fingerprint import slide_fingerprint


def _cfg(tiles: Path, out: Path, **kw: object) -> ExtractConfig:
    kw.setdefault("encoder", EncoderConfig(name="resnet18_imagenet", pretrained=False))
    return ExtractConfig(coords_dir=str(tiles), output_dir=str(out), num_workers=0,
                         batch_size=16, device="cpu", **kw)  # type: ignore[arg-type]  # fmt: skip


def _table(out: Path) -> pd.DataFrame:
    (csv,) = out.glob("*/extract.csv")
    return pd.read_csv(csv, keep_default_na=False).set_index("slide_id")


def _fingerprinted(tiles: Path, slide: Path) -> None:
    """Record the slide's fingerprint in its coords file, as `tile` does."""
    coords = tiles / "coords" / f"{slide.stem}.h5"
    write_coords(coords, replace(read_coords(coords), fingerprint=slide_fingerprint(slide)))


def test_a_bag_of_another_slide_file_is_refused_and_kept(tmp_path: Path) -> None:
    tiles = make_cohort(tmp_path, 2)
    slides = tmp_path / "slides"
    _fingerprinted(tiles, slides / "slide0.tif")
    out = tmp_path / "features"
    assert run_extract(_cfg(tiles, out)) == 0
    (bag,) = out.glob("*/slide0.h5")
    stamp = bag.stat().st_mtime_ns

    # the slide is re-scanned in place, not yet re-tiled: its bag is not reused
    shutil.copyfile(slides / "slide1.tif", slides / "slide0.tif")
    assert run_extract(_cfg(tiles, out)) == 1
    table = _table(out)
    assert table.loc["slide0", "status"] == "failed", table.loc["slide0", "reason"]
    assert "re-run `tile`" in table.loc["slide0", "reason"]
    assert table.loc["slide1", "status"] == "skipped" and bag.stat().st_mtime_ns == stamp

    # then re-tiled: same grid, another file
    _fingerprinted(tiles, slides / "slide0.tif")
    assert run_extract(_cfg(tiles, out)) == 1
    table = _table(out)
    assert table.loc["slide0", "status"] == "failed"
    assert "another slide file" in table.loc["slide0", "reason"]
    assert (
        "delete it" in table.loc["slide0", "reason"] and str(bag) in table.loc["slide0", "reason"]
    )
    assert table.loc["slide1", "status"] == "skipped"
    assert bag.stat().st_mtime_ns == stamp

    bag.unlink()  # the fix the reason names
    assert run_extract(_cfg(tiles, out)) == 0
    with h5py.File(bag, "r") as f:
        assert f.attrs["slide_fingerprint"] == slide_fingerprint(slides / "slide0.tif")


def test_empty_and_unreadable_coords_fail_only_what_they_must(tmp_path: Path) -> None:
    tiles = make_cohort(tmp_path, 1)
    grid = read_coords(tiles / "coords" / "slide0.h5")
    write_coords(tiles / "coords" / "blank.h5", replace(grid, coords=grid.coords[:0]))
    out = tmp_path / "features"
    assert run_extract(_cfg(tiles, out)) == 0  # an empty slide is not a failure
    assert dict(_table(out)["status"]) == {"slide0": "ok", "blank": "empty"}

    (tiles / "coords" / "broken.h5").write_bytes(b"not an h5 file")
    assert run_extract(_cfg(tiles, out)) == 1  # no traceback: one failed row
    table = _table(out)
    assert table.loc["broken", "status"] == "failed"
    assert (
        "broken.h5" in table.loc["broken", "reason"]
        and "re-run `tile`" in table.loc["broken", "reason"]
    )
    assert table.loc["slide0", "status"] == "skipped" and table.loc["blank", "status"] == "empty"


def test_unreadable_cached_bags_are_recomputed_alone(tmp_path: Path) -> None:
    tiles = make_cohort(tmp_path, 3)
    out = tmp_path / "features"
    assert run_extract(_cfg(tiles, out)) == 0
    bags = {p.stem: p for p in out.glob("*/*.h5")}
    stamp = bags["slide2"].stat().st_mtime_ns
    bags["slide0"].write_bytes(b"truncated")
    with h5py.File(bags["slide1"], "r+") as f:  # a bag that lost its features
        del f["features"]
    assert run_extract(_cfg(tiles, out)) == 0
    table = _table(out)
    assert dict(table["status"]) == {"slide0": "ok", "slide1": "ok", "slide2": "skipped"}
    assert bags["slide2"].stat().st_mtime_ns == stamp
    for sid in ("slide0", "slide1"):
        with h5py.File(bags[sid], "r") as f:
            assert f["features"].shape == (36, 512) and np.isfinite(f["features"][:]).all()


def test_a_cached_file_with_groups_fails_its_slide_only(tmp_path: Path) -> None:
    """'features' or 'coords' as an h5 group (or a scalar) in a cached file crashed the whole run
    with a traceback (AttributeError / TypeError in check_cached): it fails that slide alone,
    and the file, which `extract` never writes, is kept."""
    tiles = make_cohort(tmp_path, 3)
    out = tmp_path / "features"
    assert run_extract(_cfg(tiles, out)) == 0
    bags = {p.stem: p for p in out.glob("*/*.h5")}
    with h5py.File(bags["slide0"], "r+") as f:
        del f["features"]
        f.create_group("features")
    with h5py.File(bags["slide1"], "r+") as f:
        del f["coords"]
        f.create_dataset("coords", data=0)
    stamps = {sid: p.stat().st_mtime_ns for sid, p in bags.items()}
    assert run_extract(_cfg(tiles, out)) == 1
    table = _table(out)
    assert dict(table["status"]) == {"slide0": "failed", "slide1": "failed", "slide2": "skipped"}
    assert "holds 'features' as Group" in table.loc["slide0", "reason"]
    assert "holds 'coords' as a scalar" in table.loc["slide1", "reason"]
    assert {sid: p.stat().st_mtime_ns for sid, p in bags.items()} == stamps


def _loud_encoder(tmp_path: Path) -> EncoderConfig:
    """A resnet18 whose features are about 1e6: fine in fp32 and bf16, beyond float16's 65504."""
    encoder = build_encoder(EncoderConfig(name="resnet18_imagenet", pretrained=False))
    state = encoder.module.state_dict()
    (last,) = [k for k in state if k.endswith("layer4.1.bn2.bias")]
    state[last] = torch.full_like(state[last], 1e6)
    weights = tmp_path / "loud.pt"
    torch.save(state, weights)
    return EncoderConfig(name="resnet18_imagenet", weights=str(weights))


def test_features_that_overflow_fail_the_slide_with_the_fix(tmp_path: Path) -> None:
    tiles, loud = make_cohort(tmp_path, 1), _loud_encoder(tmp_path)
    out = tmp_path / "features"
    assert run_extract(_cfg(tiles, out, encoder=loud, precision="fp32")) == 1
    reason = _table(out).loc["slide0", "reason"]
    assert "non-finite" in reason and "dtype=float32" in reason
    assert not list(out.glob("*/*.h5")) and not list(out.rglob("*.lock"))

    assert run_extract(_cfg(tiles, out, encoder=loud, precision="fp32", dtype="float32")) == 0
    (bag,) = out.glob("*/*.h5")
    with h5py.File(bag, "r") as f:
        assert np.isfinite(f["features"][:]).all() and np.abs(f["features"][:]).max() > 65504


def test_features_that_overflow_only_the_stored_dtype_ask_for_dtype_not_precision(
    tmp_path: Path,
) -> None:
    """bf16 (auto's choice on GPUs) computes 1e6 fine; only float16 storage overflows, so the
    fix is dtype=float32: precision=fp32 would fail the same way."""
    tiles, loud = make_cohort(tmp_path, 1), _loud_encoder(tmp_path)
    out = tmp_path / "features"
    assert run_extract(_cfg(tiles, out, encoder=loud, precision="bf16")) == 1
    reason = _table(out).loc["slide0", "reason"]
    assert "non-finite" in reason and "dtype=float32" in reason
    assert "precision=fp32" not in reason


def test_a_slide_too_large_for_memory_fails_alone(tmp_path: Path) -> None:
    """Its features are assembled in memory before the write: a slide that cannot get that
    memory fails with the reason, and the cohort's other slides are encoded."""
    tiles = make_cohort(tmp_path, 2)
    coords = tiles / "coords" / "slide0.h5"  # 2M tiles x 512 float32: 4 GB of features
    write_coords(coords, replace(read_coords(coords), coords=np.zeros((2_000_000, 2), np.int64)))
    out = tmp_path / "features"
    script = textwrap.dedent(f"""
        import resource
        from melanoma_mil.config import EncoderConfig, ExtractConfig
        from melanoma_mil.features.run import run_extract
        status = open("/proc/self/status").read().split("VmSize:")[1]
        used = int(status.split()[0]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), resource.RLIM_INFINITY))
        cfg = ExtractConfig(coords_dir={str(tiles)!r}, output_dir={str(out)!r}, num_workers=0,
            encoder=EncoderConfig(name="resnet18_imagenet", pretrained=False), device="cpu",
            batch_size=16, dtype="float32")
        raise SystemExit(run_extract(cfg))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    table = _table(out)
    assert table.loc["slide1", "status"] == "ok" and table.loc["slide0", "status"] == "failed"
    assert "MemoryError" in table.loc["slide0", "reason"]
    assert not list(out.rglob("*.lock"))


def test_a_rerun_asking_another_precision_or_dtype_refuses_the_cached_bag(tmp_path: Path) -> None:
    tiles = make_cohort(tmp_path, 1)
    out = tmp_path / "features"
    assert run_extract(_cfg(tiles, out, precision="fp32")) == 0
    (bag,) = out.glob("*/slide0.h5")
    stamp = bag.stat().st_mtime_ns
    assert run_extract(_cfg(tiles, out)) == 0  # precision=auto takes the file as it was made
    assert _table(out).loc["slide0", "status"] == "skipped"
    with pytest.raises(UserError, match="precision=fp32 .*not the precision=bf16 asked"):
        run_extract(_cfg(tiles, out, precision="bf16"))  # the folder's precision: before work
    assert run_extract(_cfg(tiles, out, dtype="float32")) == 1
    reason = _table(out).loc["slide0", "reason"]
    why = "stores float16 features, not the dtype=float32 asked"
    assert why in reason and "new output_dir" in reason and "delete it" in reason, reason
    assert bag.stat().st_mtime_ns == stamp
    bag.unlink()  # the fix the reason names
    assert run_extract(_cfg(tiles, out, dtype="float32")) == 0
    with h5py.File(bag, "r") as f:
        assert f["features"].dtype == np.float32


def test_a_coords_file_named_no_valid_slide_id_is_refused_before_work(tmp_path: Path) -> None:
    tiles = make_cohort(tmp_path, 2)
    shutil.copyfile(tiles / "coords" / "slide1.h5", tiles / "coords" / " slide1.h5")
    out = tmp_path / "features"
    with pytest.raises(UserError, match=r"coords file '.* slide1\.h5'.*rename it"):
        run_extract(_cfg(tiles, out))
    assert not out.exists()
