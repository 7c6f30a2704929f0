"""What a cache folder records for all its bags: the precision every `extract` process on it
uses, and the overwrite=true rebuild that processes started at different times share."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import h5py
import pytest
import torch
from conftest import make_cohort, write_grid
from test_extract import ROOT, _cli, not_built
from test_extract_cache import _cfg, _table

from melanoma_mil.encoders import build_encoder, resolve_precision
from melanoma_mil.errors import UserError
from melanoma_mil.features import run as features_run
from melanoma_mil.features.run import run_extract


def _precisions(out: Path) -> dict[str, str]:
    found = {}
    for bag in sorted(out.glob("*/*.h5")):
        with h5py.File(bag, "r") as f:
            found[bag.stem] = str(f.attrs["precision"])
    return found


def test_auto_workers_adopt_the_precision_the_folder_was_started_at(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tiles = make_cohort(tmp_path, 2)
    later = tmp_path / "slide1.h5"
    (tiles / "coords" / "slide1.h5").rename(later)  # the first worker sees slide0 only
    enc = build_encoder(_cfg(tiles, tmp_path).encoder, device=torch.device("cpu"))
    here = resolve_precision("auto", enc.spec, torch.device("cpu"))
    other = "fp32" if here == "bf16" else "bf16"  # what another machine's auto resolves to
    out = tmp_path / "features"
    assert run_extract(_cfg(tiles, out, precision=other)) == 0

    later.rename(tiles / "coords" / "slide1.h5")
    with caplog.at_level(logging.INFO, logger="melanoma_mil.features.folder"):
        assert run_extract(_cfg(tiles, out)) == 0  # precision=auto, on a machine preferring `here`
    assert _precisions(out) == {"slide0": other, "slide1": other}
    said = Counter(r.getMessage() for r in caplog.records if r.name.endswith("features.folder"))
    assert any(f"auto here would be {here}" in line for line in said), said
    assert set(said.values()) == {1}, said  # each line once (twice: checked, then again used)
    assert _table(out).loc["slide0", "status"] == "skipped"

    with pytest.raises(UserError, match=rf"precision={other}.*precision={here} asked"):
        run_extract(_cfg(tiles, out, precision=here))
    assert _precisions(out) == {"slide0": other, "slide1": other}

    (next(out.glob("*/.precision.json"))).unlink()  # a folder made before the record existed
    assert run_extract(_cfg(tiles, out)) == 0  # recorded again from its bags
    assert _precisions(out) == {"slide0": other, "slide1": other}

    assert run_extract(_cfg(tiles, out, precision=here, overwrite=True)) == 0  # the fix it names
    assert _precisions(out) == {"slide0": here, "slide1": here}
    assert run_extract(_cfg(tiles, out)) == 0
    assert _table(out).loc["slide1", "status"] == "skipped"


def test_a_later_overwrite_worker_keeps_the_bags_rebuilt_in_the_same_overwrite(
    tmp_path: Path,
) -> None:
    tiles = make_cohort(tmp_path, 2)
    out = tmp_path / "features"
    assert run_extract(_cfg(tiles, out)) == 0
    slide1, aside = tmp_path / "slides" / "slide1.tif", tmp_path / "slide1.tif"
    slide1.rename(aside)  # the first overwrite worker rebuilds slide0, then stops short
    assert run_extract(_cfg(tiles, out, overwrite=True)) == 1
    (bag0,) = out.glob("*/slide0.h5")
    stamp = bag0.stat().st_mtime_ns

    aside.rename(slide1)
    assert run_extract(_cfg(tiles, out, overwrite=True)) == 0  # a worker started later joins
    table = _table(out)
    assert table.loc["slide0", "status"] == "done" and table.loc["slide1", "status"] == "ok"
    assert bag0.stat().st_mtime_ns == stamp
    assert not list(out.glob("*/.overwrite.json"))  # every slide rebuilt: that overwrite ended

    assert run_extract(_cfg(tiles, out, overwrite=True)) == 0  # so this one starts a new one
    assert set(_table(out)["status"]) == {"ok"} and bag0.stat().st_mtime_ns != stamp


def test_another_precision_during_an_unended_overwrite_names_the_file_to_delete(
    tmp_path: Path,
) -> None:
    tiles = make_cohort(tmp_path, 2)
    out = tmp_path / "features"
    slide1, aside = tmp_path / "slides" / "slide1.tif", tmp_path / "slide1.tif"
    slide1.rename(aside)  # a slide that fails keeps the rebuild open
    assert run_extract(_cfg(tiles, out, precision="fp32", overwrite=True)) == 1
    aside.rename(slide1)
    (record,) = out.glob("*/.overwrite.json")
    with (
        pytest.MonkeyPatch.context() as patch,
        pytest.raises(UserError, match=rf"delete '{re.escape(str(record))}'"),
    ):
        patch.setattr(features_run, "build_encoder", not_built)  # refused before it is built
        run_extract(_cfg(tiles, out, precision="bf16", overwrite=True))
    record.unlink()  # the fix it names
    assert run_extract(_cfg(tiles, out, precision="bf16", overwrite=True)) == 0
    assert _precisions(out) == {"slide0": "bf16", "slide1": "bf16"}


def test_an_unreadable_precision_record_is_refused_before_the_encoder_is_built(
    tmp_path: Path,
) -> None:
    tiles = make_cohort(tmp_path, 1)
    out = tmp_path / "features"
    assert run_extract(_cfg(tiles, out)) == 0
    (record,) = out.glob("*/.precision.json")
    record.write_text('{"precision": ')  # cut short: written by hand, or an old disk's fault
    done = subprocess.run(
        _cli(tiles, out, "encoder.pretrained=false"), cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()  # the refusal alone: no line of the encoder's build
    assert f"'{record}' is unreadable" in line and "delete it" in line, done.stderr


def test_a_new_cache_folder_takes_the_precision_of_the_runs_existing_one(tmp_path: Path) -> None:
    tiles = make_cohort(tmp_path, 2)
    later = tmp_path / "slide1.h5"
    (tiles / "coords" / "slide1.h5").rename(later)
    enc = build_encoder(_cfg(tiles, tmp_path).encoder, device=torch.device("cpu"))
    here = resolve_precision("auto", enc.spec, torch.device("cpu"))
    other = "fp32" if here == "bf16" else "bf16"
    out = tmp_path / "features"
    assert run_extract(_cfg(tiles, out, precision=other)) == 0  # made on another machine

    write_grid(tiles, tmp_path / "slides" / "slide1.tif", 384, 32)  # a new tile size: new folder
    later.unlink()
    with (
        pytest.MonkeyPatch.context() as patch,
        pytest.raises(UserError, match=rf"precision={other}.*precision={here} asked"),
    ):
        patch.setattr(features_run, "build_encoder", not_built)  # refused before it is built
        run_extract(_cfg(tiles, out, precision=here))
    assert len(list(out.glob("*/.precision.json"))) == 1  # the refused run recorded nothing
    assert run_extract(_cfg(tiles, out)) == 0  # auto: the new folder takes the run's precision
    assert _precisions(out) == {"slide0": other, "slide1": other}
    assert len(list(out.glob("*/.precision.json"))) == 2


def test_a_bag_of_the_old_precision_finished_during_a_rebuild_is_rebuilt(tmp_path: Path) -> None:
    """A run begun before the rebuild (at the folder's old precision) that finishes a slide
    after it began must not have that bag taken for a rebuilt one."""
    tiles = make_cohort(tmp_path, 2)
    out = tmp_path / "features"
    assert run_extract(_cfg(tiles, out, precision="fp32")) == 0
    slide1, aside = tmp_path / "slides" / "slide1.tif", tmp_path / "slide1.tif"
    slide1.rename(aside)
    assert run_extract(_cfg(tiles, out, precision="bf16", overwrite=True)) == 1  # rebuild open
    aside.rename(slide1)
    (status,) = out.glob("*/.status/slide1.json")  # the older run finishing slide1 at fp32 now
    record = json.loads(status.read_text())
    status.write_text(json.dumps({**record, "status": "ok", "finished": time.time()}))

    assert run_extract(_cfg(tiles, out, overwrite=True)) == 0  # joins the rebuild
    assert _table(out).loc["slide1", "status"] == "ok"
    assert _precisions(out) == {"slide0": "bf16", "slide1": "bf16"}


def test_a_folder_whose_old_bags_disagree_says_so_when_first_recorded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tiles = make_cohort(tmp_path, 2)
    later = tmp_path / "slide1.h5"
    (tiles / "coords" / "slide1.h5").rename(later)
    out, other = tmp_path / "features", tmp_path / "other"
    assert run_extract(_cfg(tiles, out, precision="fp32")) == 0
    later.rename(tiles / "coords" / "slide1.h5")
    assert run_extract(_cfg(tiles, other, precision="bf16")) == 0
    (cache,) = out.glob("*/")
    shutil.copy(next(other.glob("*/slide1.h5")), cache / "slide1.h5")  # mixed, as before records
    (cache / ".precision.json").unlink()
    with caplog.at_level(logging.WARNING, logger="melanoma_mil.features.folder"):
        assert run_extract(_cfg(tiles, out)) == 0
    assert "several precisions ({'fp32': 1, 'bf16': 1})" in caplog.text


def test_a_work_cache_from_before_records_is_rebuilt_at_a_new_precision(tmp_path: Path) -> None:
    """predict/heatmap's own `_work` cache: bags from before folders recorded a precision are
    read for theirs, so a new precision clears them (extract would refuse them)."""
    from melanoma_mil.inference.work import _other_precision

    tiles = make_cohort(tmp_path, 2)
    out = tmp_path / "features"
    assert run_extract(_cfg(tiles, out, precision="bf16")) == 0
    (cache,) = out.glob("*/")
    (cache / ".precision.json").unlink()
    stale = _other_precision(cache, "fp32", "float16")
    assert [p.name for p in stale] == ["slide0.h5", "slide1.h5", ".precision.json"]
