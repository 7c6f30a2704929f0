"""`tile` on a slide whose read never returns (a FIFO named .svs stands in for a dead network
mount): it is named while slow, fails alone at tile's time limit, and the cohort goes on."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import tissue_image

from melanoma_mil import progress
from melanoma_mil.config import TileConfig, TilingConfig
from melanoma_mil.demo.pyramid import write_pyramid
from melanoma_mil.tiling.run import run_tile
from melanoma_mil.workshare import Claim

TILING = TilingConfig(mpp=1.0, tile_size=64)
ROOT = Path(__file__).resolve().parents[1]


def _cohort(tmp_path: Path, n: int) -> Path:
    """A manifest: a FIFO slide first (its read blocks until a writer opens it), then ``n``
    real pyramids."""
    slides = tmp_path / "slides"
    slides.mkdir()
    os.mkfifo(slides / "hung.svs")
    rows = ["slide_id,path", f"hung,{slides / 'hung.svs'}"]
    for i in range(n):
        write_pyramid(slides / f"s{i}.tiff", tissue_image(768, i), mpp=0.5, n_levels=1)
        rows.append(f"s{i},{slides / f's{i}.tiff'}")
    manifest = tmp_path / "slides.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def test_a_hung_slide_fails_alone_at_the_time_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.5)
    manifest, out = _cohort(tmp_path, 3), tmp_path / "tiles"
    cfg = TileConfig(manifest=str(manifest), output_dir=str(out), workers=2,
                     slide_timeout_s=4, tiling=TILING)  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert run_tile(cfg) == 1  # as for any failed slide
    table = pd.read_csv(out / "tiling.csv").set_index("slide_id")
    assert (table.loc[["s0", "s1", "s2"], "status"] == "ok").all()
    reason = table.loc["hung", "reason"]
    assert table.loc["hung", "status"] == "failed"
    assert "slide_timeout_s=4 s" in reason and str(tmp_path / "slides" / "hung.svs") in reason
    assert "still tiling hung after" in caplog.text  # named while it was slow
    assert not (out / "coords" / "hung.lock").exists()  # its killed process's claim is cleared


def _until(ready: object, what: str, limit_s: float = 60.0) -> None:
    """Poll ``ready()`` (a deadline against a hang, not a measured duration)."""
    deadline = time.monotonic() + limit_s
    while not ready():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _unblock(fifo: Path, tile: subprocess.Popen[bytes]) -> None:
    """Give the FIFO's reader end-of-file (it then fails as not a slide) until tile ends."""
    while tile.poll() is None:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as e:  # no reader at this instant
            assert e.errno == errno.ENXIO
        time.sleep(0.1)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_slide_tiling_past_stale_after_keeps_its_claim(tmp_path: Path, workers: int) -> None:
    """A claim whose heartbeat is older than stale_after_s is taken over by a peer: a slide
    tiling for longer (a slow mount, a huge scan) was tiled twice. Its claim is now kept fresh
    by the process waiting on it, with a worker pool (workers=2) or in-process (workers=1)."""
    manifest, out = _cohort(tmp_path, 0), tmp_path / "tiles"
    tile = subprocess.Popen(
        [sys.executable, "-m", "melanoma_mil", "tile", f"manifest={manifest}",
         f"output_dir={out}", f"workers={workers}", "stale_after_s=5", "slide_timeout_s=0"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    lock = out / "coords" / "hung.lock"
    try:
        _until(lock.exists, "the FIFO slide was never claimed")
        old = time.time() - 60  # as if the last beat were long past stale_after_s
        os.utime(lock, (old, old))
        _until(lambda: time.time() - lock.stat().st_mtime < 5, "no heartbeat", limit_s=20)
        assert not Claim(lock, stale_after=5).acquire()  # a peer leaves the live claim alone
    finally:
        _unblock(tmp_path / "slides" / "hung.svs", tile)
    assert tile.wait() == 1


def test_a_hung_slide_fails_alone_at_the_time_limit_with_one_worker(tmp_path: Path) -> None:
    """With workers=1 the slide was tiled in the `tile` process itself, which cannot stop a read
    that never returns: the limit did not hold and the cohort waited forever. Run as a command
    under a deadline, so that a hang fails this test instead of hanging the suite."""
    manifest, out = _cohort(tmp_path, 2), tmp_path / "tiles"
    tile = subprocess.Popen(
        [sys.executable, "-m", "melanoma_mil", "tile", f"manifest={manifest}",
         f"output_dir={out}", "workers=1", "slide_timeout_s=4", "tiling.mpp=1.0",
         "tiling.tile_size=64"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        code = tile.wait(timeout=120)
    except subprocess.TimeoutExpired:
        _unblock(tmp_path / "slides" / "hung.svs", tile)
        pytest.fail("workers=1: the hung slide was not stopped at slide_timeout_s")
    assert code == 1  # as for any failed slide
    table = pd.read_csv(out / "tiling.csv").set_index("slide_id")
    assert (table.loc[["s0", "s1"], "status"] == "ok").all()
    reason = table.loc["hung", "reason"]
    assert table.loc["hung", "status"] == "failed"
    assert "slide_timeout_s=4 s" in reason and str(tmp_path / "slides" / "hung.svs") in reason
    left = sorted(p.name for p in out.rglob("*hung*"))
    assert left == [], left  # no coords, QC image, temp file or claim of the stopped slide


# how the QC write of the slide named first stops midway, the `tile` arguments, its reason
_STOPS = {
    "slow": ("time.sleep(3600)", ["workers=1", "slide_timeout_s=4"], "slide_timeout_s=4 s"),
    "dies": ("os.kill(os.getpid(), signal.SIGKILL)", ["workers=2"], "its tile process died"),
}


@pytest.mark.parametrize("sid", list(_STOPS))
def test_a_slide_stopped_while_writing_leaves_no_part_written_file(
    tmp_path: Path, sid: str
) -> None:
    """A slide stopped while writing its QC image, at the time limit (a stalled disk) or by its
    process dying (a crash, killed for memory), left the part-written temp file in qc/ after
    tile ended; it is removed with the slide's claim."""
    stop, args, reason = _STOPS[sid]
    inject = tmp_path / "inject"  # the QC write of slide `sid` stops after its first bytes
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os, signal, time\n"
        "from PIL import Image\n"
        "_save = Image.Image.save\n"
        "def _stop(self, fp, *a, **k):\n"
        f"    if os.path.basename(str(fp)).startswith('.{sid}.png.'):\n"
        "        with open(fp, 'wb') as f:\n"
        "            f.write(b'part')\n"
        f"        {stop}\n"
        "    _save(self, fp, *a, **k)\n"
        "Image.Image.save = _stop\n"
    )
    slides, out = tmp_path / "slides", tmp_path / "tiles"
    slides.mkdir()
    for i, name in enumerate((sid, "s1")):
        write_pyramid(slides / f"{name}.tiff", tissue_image(768, i), mpp=0.5, n_levels=1)
    done = subprocess.run(
        [sys.executable, "-m", "melanoma_mil", "tile", f"slides_dir={slides}",
         f"output_dir={out}", *args, "tiling.mpp=1.0", "tiling.tile_size=64"],
        env={**os.environ, "PYTHONPATH": f"{inject}{os.pathsep}{ROOT}"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    table = pd.read_csv(out / "tiling.csv").set_index("slide_id")
    assert table.loc["s1", "status"] == "ok"
    assert table.loc[sid, "status"] == "failed"
    assert reason in table.loc[sid, "reason"]
    left = sorted(p.name for p in out.rglob(f"*{sid}*"))
    assert left == [], left  # no QC image, temp file or claim of the stopped slide
