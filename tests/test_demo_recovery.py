"""`demo` after a demo killed outright (kill -9): overwrite=true replaces what the killed demo
made and nothing else, a plain rerun resumes or fails with advice that works, no file is left
half-written, and nothing is deleted through a link or outside output_dir.

Each kill is real: the demo runs in a process of its own that calls ``os._exit`` (as kill -9:
no ``finally``, nothing recorded) at a chosen point.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest

from melanoma_mil.demo.owned import KIND, MARKER, claim
from melanoma_mil.demo.run import RESUMABLE, WRITES
from melanoma_mil.errors import UserError
from melanoma_mil.pools import worker_context

SMALL = ["n_slides=12", "slide_size=1024", "tile_size=64", "folds=2", "max_epochs=1"]
KILLED = 137


def forks() -> BaseContext:
    """Each demo runs in a process forked from one server that imported the package once: a
    fresh interpreter per call spent ~6 s of each on imports, most of this module's time. It is
    the package's one forkserver, preloaded by conftest's `pytest_configure` before any pool
    starts it. Asked for here, not at import: a demo process imports this module too, and would
    preload torch into its own pools' server (~8 s a demo)."""
    return worker_context("melanoma_mil.cli", "melanoma_mil.demo.run")


def die(*args: object, **kwargs: object) -> None:
    os._exit(KILLED)


class Bomb:  # kills the process when written out, i.e. in the middle of writing a table
    def __str__(self) -> str:
        die()
        return ""


def interrupt(cfg: object) -> None:
    raise KeyboardInterrupt


def stop_at(point: str) -> None:
    """Make the demo die (as kill -9: no ``finally``, nothing recorded), hang or get Ctrl-C at
    ``point``; "-" runs it to the end."""
    import melanoma_mil.demo.owned as O
    import melanoma_mil.demo.run as R
    import melanoma_mil.demo.synth as S
    import melanoma_mil.features.run as F

    if point in ("tile", "extract"):
        setattr(R, f"run_{point}", die)
    elif point == "tile-ctrl-c":
        R.run_tile = interrupt
    elif point == "heatmaps-ctrl-c":  # Ctrl-C after fit wrote cv_summary.json
        R.run_heatmap = interrupt
    elif point == "extract-late":  # the record untouched from tile on, killed mid-extract
        tile = R.run_tile

        def untouched(cfg: object) -> object:  # as if its beats stalled: all files now 'late'
            O.MARKER = "not-the-record"  # touching it fails (silently): the record stays as is
            return tile(cfg)

        R.run_tile = untouched
        write_bag, written = F.write_bag, []

        def write_two_then_die(work: object) -> None:  # the third slide's claim stays behind
            if len(written) == 2:
                die()
            written.append(write_bag(work))

        F.write_bag = write_two_then_die
    elif point == "tile-hang":
        R.run_tile = lambda cfg: time.sleep(600)
    elif point == "synth.json":  # right after the cohort generator wrote its settings
        write_json = S.write_json
        S.write_json = lambda path, obj: (write_json(path, obj), die())
    elif point == "localisation.csv":  # while the table is written
        score = R.cohort_localisation
        R.cohort_localisation = lambda *a: score(*a).assign(bomb=Bomb())


def child(point: str, argv: list[str], out: str, err: str) -> None:
    """The forked process: `python -m melanoma_mil` with ``argv``, stopped at ``point``."""
    import torch

    from melanoma_mil.cli import main

    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # and for the demo's own worker processes
    code = 1
    try:
        stop_at(point)
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@dataclass
class Done:
    returncode: int
    stderr: str


def start(point: str, out: Path, extra: tuple[str, ...]) -> tuple[BaseProcess, Path]:
    """The small demo into ``out``, started in a forked process stopped at ``point``."""
    logs = Path(tempfile.mkdtemp(prefix="demo-", dir=out.parent))
    argv = ["demo", f"output_dir={out}", *SMALL, *extra]
    process = forks().Process(
        target=child, args=(point, argv, str(logs / "out"), str(logs / "err"))
    )
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # for the server too, if this call starts it
    try:
        process.start()
    finally:
        if before is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = before
    return process, logs


def demo(point: str, out: Path, *extra: str) -> Done:
    """The small demo into ``out``, stopped at ``point``, to its end."""
    process, logs = start(point, out, extra)
    process.join(900)
    if process.exitcode is None:
        process.kill()
        process.join()
        pytest.fail(f"demo {point} {extra} still running after 900 s")
    return Done(process.exitcode, (logs / "err").read_text())


def one_line_error(done: Done, *needles: str) -> str:
    """Assert exit 2 with exactly one 'error:' line (containing ``needles``), no traceback."""
    assert done.returncode == 2, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def stats(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (links not followed, marker aside): (size, mtime_ns)."""
    out = {}
    for top, _, names in os.walk(root):
        for name in names:
            path = Path(top) / name
            st = path.lstat()
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    out.pop(MARKER, None)
    return out


def seed_of(out: Path) -> int:
    return int(json.loads((out / "cohort" / "synth.json").read_text())["seed"])


def test_overwrite_after_a_kill_replaces_what_the_demo_made_and_keeps_yours(
    tmp_path: Path,
) -> None:
    d = tmp_path / "d"
    done = demo("tile", d, "n_slides=13")  # killed once its cohort is written
    assert done.returncode == KILLED, done.stderr
    first = stats(d)
    assert "cohort/slides/slide_012.tiff" in first
    (d / "thesis.txt").write_text("mine")
    (d / "cohort" / "notes.txt").write_text("mine too")
    mine = {"thesis.txt", "cohort/notes.txt"}
    # a plain rerun with other settings changes nothing and says what works
    one_line_error(demo("tile", d, "seed=1"), "overwrite=true")
    assert {k: v for k, v in stats(d).items() if k not in mine} == first
    # ... and it does: the killed demo's files are replaced, the user's stay
    done = demo("tile", d, "seed=1", "overwrite=true")
    assert done.returncode == KILLED, done.stderr
    assert seed_of(d) == 1
    now = stats(d)
    assert not (d / "cohort" / "slides" / "slide_012.tiff").exists()  # n_slides=13's own
    assert all(now[k] != v for k, v in first.items() if k in now)  # every one remade
    assert (d / "thesis.txt").read_text() == "mine"
    assert (d / "cohort" / "notes.txt").read_text() == "mine too"
    # a plain rerun with the same settings resumes (the cohort is reused) and is killed later
    done = demo("extract", d, "seed=1")
    assert done.returncode == KILLED, done.stderr
    assert stats(d / "cohort") == {k[7:]: v for k, v in now.items() if k.startswith("cohort/")}
    assert len(list((d / "tiles" / "coords").glob("*.h5"))) == 12
    # overwrite=true after that kill deletes what both killed demos made, tiles included
    done = demo("tile", d, "overwrite=true", "n_slides=11")
    assert done.returncode == KILLED, done.stderr
    assert seed_of(d) == 0 and not (d / "tiles").exists()
    left = set(stats(d))
    assert sum(p.startswith("cohort/slides/") for p in left) == 11
    assert {p for p in left if not p.startswith(("cohort/slides/", "cohort/masks/"))} == mine | {
        "cohort/synth.json", "cohort/labels.csv", "cohort/cohort.csv", "cohort/clinical.csv"
    }  # fmt: skip
    assert (d / "thesis.txt").read_text() == "mine"


def test_overwrite_after_a_kill_as_the_cohort_was_being_made(tmp_path: Path) -> None:
    """Killed right after the cohort's settings file was written (before the record was
    touched): that file cannot be shown to be the demo's, so overwrite=true refuses to write
    over it until it is moved away."""
    d = tmp_path / "d"
    done = demo("synth.json", d)
    assert done.returncode == KILLED, done.stderr
    (d / "thesis.txt").write_text("mine")
    before = stats(d)
    one_line_error(demo("tile", d, "seed=1", "overwrite=true"), "cohort/synth.json", "move")
    assert stats(d) == before  # refused before anything was deleted or written
    (d / "cohort" / "synth.json").rename(tmp_path / "synth.json")
    done = demo("tile", d, "seed=1", "overwrite=true")
    assert done.returncode == KILLED, done.stderr
    assert seed_of(d) == 1 and len(list((d / "cohort" / "slides").glob("*.tiff"))) == 12
    assert (d / "thesis.txt").read_text() == "mine"


def test_localisation_table_is_never_half_written_and_a_late_kill_is_recovered(
    tmp_path: Path,
) -> None:
    d = tmp_path / "d"
    done = demo("localisation.csv", d)  # killed while the table is being written
    assert done.returncode == KILLED, done.stderr
    assert (d / "heatmaps").is_dir() and not (d / "localisation.csv").exists()
    (d / "notes.txt").write_text("mine")
    done = demo("tile", d, "overwrite=true")
    assert done.returncode == KILLED, done.stderr
    left = {p for p in stats(d) if not p.startswith("cohort/")}
    assert left == {"notes.txt"}  # tiles, features, fit, heatmaps: all the demo's, gone
    assert (d / "notes.txt").read_text() == "mine"


def made_by_a_demo(root: Path, files: dict[str, str]) -> None:
    """``root`` as a demo that wrote ``files`` (relative path -> text) leaves it."""
    root.mkdir()
    ledger = claim(root, overwrite=False)
    ledger.start()
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    ledger.finish()


@pytest.mark.parametrize(
    "edit", ["localisation.csv", "cohort/labels.csv", "fit/predictions.csv", "tiles/new.h5"]
)
def test_overwrite_refuses_up_front_a_file_of_yours_where_the_demo_writes(
    tmp_path: Path, edit: str
) -> None:
    """An edited (or added) file the next demo would overwrite, or that would stop a stage
    halfway, is named before anything is deleted; files elsewhere are kept."""
    d = tmp_path / "d"
    made = ["localisation.csv", "cohort/labels.csv", "fit/predictions.csv", "tiles/a.h5"]
    made_by_a_demo(d, dict.fromkeys(made, "demo"))
    with (d / edit).open("a") as f:
        f.write("# my edit")
    (d / "notes.txt").write_text("mine")
    before = stats(d)
    with pytest.raises(UserError, match="move them out of output_dir") as e:
        claim(d, overwrite=True, writes=WRITES)
    assert repr(edit) in str(e.value) and "notes.txt" not in str(e.value)
    assert stats(d) == before


@pytest.mark.parametrize(
    "edit", ["localisation.csv", "cohort/clinical.csv", "cohort/labels.csv", "tiles/new.h5"]
)
def test_plain_rerun_refuses_up_front_a_file_of_yours_where_the_demo_writes(
    tmp_path: Path, edit: str
) -> None:
    """A rerun without overwrite (resuming a stopped demo) rewrites the cohort tables and
    localisation.csv and reads the rest as its own: an edited or added file there is named
    and nothing changes, as with overwrite=true."""
    d = tmp_path / "d"
    made = ["localisation.csv", "cohort/clinical.csv", "cohort/labels.csv", "tiles/a.h5"]
    made_by_a_demo(d, dict.fromkeys(made, "demo"))
    with (d / edit).open("a") as f:
        f.write("# my edit")
    (d / "notes.txt").write_text("mine")
    before = {**stats(d), MARKER: (d / MARKER).read_text()}
    with pytest.raises(UserError, match="rerunning the demo would overwrite them") as e:
        claim(d, overwrite=False, writes=WRITES)
    assert repr(edit) in str(e.value) and "notes.txt" not in str(e.value)
    assert {**stats(d), MARKER: (d / MARKER).read_text()} == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_linked_folder_where_the_demo_writes_is_refused(tmp_path: Path, overwrite: bool) -> None:
    """tiles -> a folder of yours: a rerun would write its tables and QC images there."""
    d = tmp_path / "d"
    made_by_a_demo(d, {"localisation.csv": "demo"})
    mine = tmp_path / "mytiles"
    mine.mkdir()
    (mine / "tiling.csv").write_text("mine")
    (d / "tiles").symlink_to(mine, target_is_directory=True)
    with pytest.raises(
        UserError, match=r"tiles' is a link to .*mytiles.*replace the link by a folder"
    ):
        claim(d, overwrite=overwrite, writes=WRITES)
    assert (mine / "tiling.csv").read_text() == "mine" and (d / "localisation.csv").exists()


def test_plain_rerun_goes_on_past_files_of_yours_elsewhere(tmp_path: Path) -> None:
    d = tmp_path / "d"
    made_by_a_demo(d, {"localisation.csv": "demo", "cohort/notes.txt": "demo"})
    with (d / "cohort" / "notes.txt").open("a") as f:
        f.write("# my edit")
    (d / "thesis.txt").write_text("mine")
    ledger = claim(d, overwrite=False, writes=WRITES)
    assert set(ledger.files) == {"localisation.csv", "cohort/notes.txt"}
    assert set(stats(d)) == {"localisation.csv", "cohort/notes.txt", "thesis.txt"}


def test_overwrite_keeps_files_of_yours_where_the_demo_does_not_write(tmp_path: Path) -> None:
    d = tmp_path / "d"
    made_by_a_demo(d, {"localisation.csv": "demo", "cohort/notes.txt": "demo"})
    with (d / "cohort" / "notes.txt").open("a") as f:
        f.write("# my edit")
    claim(d, overwrite=True, writes=WRITES)
    assert set(stats(d)) == {"cohort/notes.txt"}


def test_overwrite_with_an_edited_cohort_table_changes_nothing(tmp_path: Path) -> None:
    d = tmp_path / "d"
    done = demo("extract", d)  # killed once its tiles are written
    assert done.returncode == KILLED, done.stderr
    with (d / "cohort" / "labels.csv").open("a") as f:
        f.write("# my edit")
    before = stats(d)
    one_line_error(demo("tile", d, "overwrite=true"), "cohort/labels.csv", "move them out")
    assert stats(d) == before
    # a plain rerun (resuming the killed demo) would rewrite or read it: refused the same way
    one_line_error(demo("tile", d), "cohort/labels.csv", "rerunning", "move them out")
    assert stats(d) == before


def test_overwrite_deletes_nothing_through_a_folder_replaced_by_a_link(tmp_path: Path) -> None:
    d = tmp_path / "d"
    done = demo("tile-ctrl-c", d)  # interrupted: the demo records what it made
    assert done.returncode == 130, done.stderr
    assert "interrupted: re-run the same command: it resumes" in done.stderr
    moved = tmp_path / "elsewhere" / "cohort"
    moved.parent.mkdir()
    (d / "cohort").rename(moved)
    (d / "cohort").symlink_to(moved, target_is_directory=True)
    before = stats(moved)
    one_line_error(demo("tile", d, "overwrite=true"), "link", str(d / "cohort"))
    assert stats(moved) == before and (d / "cohort").is_symlink()


def test_overwrite_waits_for_no_demo_still_running(tmp_path: Path) -> None:
    d = tmp_path / "d"
    running, _ = start("tile-hang", d, ())
    try:
        deadline = time.monotonic() + 300
        while not (d / "cohort" / "clinical.csv").exists():  # its cohort's last file
            assert running.is_alive() and time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1)
        before = stats(d)
        one_line_error(demo("tile", d, "overwrite=true"), "writing into")
        assert stats(d) == before
    finally:
        running.kill()
        running.join()


@pytest.mark.parametrize("where", ["../victim.txt", "{victim}"])
def test_edited_record_cannot_point_outside_output_dir(tmp_path: Path, where: str) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    st = victim.stat()
    d = tmp_path / "d"
    d.mkdir()
    files = {where.format(victim=victim): [st.st_size, st.st_mtime_ns]}
    record = {"kind": KIND, "running": False, "files": files, "dirs": []}
    (d / MARKER).write_text(json.dumps(record))
    with pytest.raises(UserError, match="not a demo record"):
        claim(d, overwrite=True)
    assert victim.read_text() == "mine"


def late(out: Path, folder: str) -> list[Path]:
    """The files under ``out/folder`` changed after the demo record was last touched."""
    touched = (out / MARKER).stat().st_mtime_ns
    return [p for p in (out / folder).rglob("*") if p.is_file() and p.stat().st_ctime_ns > touched]


def test_plain_rerun_resumes_a_demo_killed_after_its_last_touch(tmp_path: Path) -> None:
    """Killed mid-extract with its tiles and first feature files (and a slide's claim) written
    after it last touched its record: a plain rerun takes those as the killed demo's leftovers
    and resumes to the end; a file of yours elsewhere stays."""
    d = tmp_path / "d"
    done = demo("extract-late", d)
    assert done.returncode == KILLED, done.stderr
    assert len(late(d, "tiles/coords")) == 12 and len(late(d, "features")) >= 2
    (d / "thesis.txt").write_text("mine")
    done = demo("-", d)
    assert done.returncode == 0, done.stderr
    assert (d / "evaluate" / "report.html").is_file() and (d / "localisation.csv").is_file()
    assert (d / "thesis.txt").read_text() == "mine"


def test_overwrite_after_a_kill_deletes_the_killed_demos_last_writes(tmp_path: Path) -> None:
    d = tmp_path / "d"
    done = demo("extract-late", d)
    assert done.returncode == KILLED, done.stderr
    assert late(d, "tiles/coords") and late(d, "features")
    (d / "thesis.txt").write_text("mine")
    done = demo("tile", d, "overwrite=true", "seed=1")  # killed again once its cohort is made
    assert done.returncode == KILLED, done.stderr
    assert seed_of(d) == 1 and not (d / "tiles").exists() and not (d / "features").exists()
    assert (d / "thesis.txt").read_text() == "mine"


def test_plain_rerun_resumes_a_demo_stopped_after_fit(tmp_path: Path) -> None:
    """Ctrl-C during heatmaps leaves fit/cv_summary.json: the demo is not finished, so a plain
    rerun resumes it; once it has finished, a plain rerun says so."""
    d = tmp_path / "d"
    done = demo("heatmaps-ctrl-c", d)
    assert done.returncode == 130, done.stderr
    assert (d / "fit" / "cv_summary.json").is_file() and not (d / "evaluate").exists()
    done = demo("-", d)
    assert done.returncode == 0, done.stderr
    assert (d / "evaluate" / "report.html").is_file()
    before = stats(d)
    one_line_error(demo("-", d), "already holds a finished demo", "overwrite=true")
    assert stats(d) == before


def test_a_killed_demos_last_writes_are_its_own_but_an_edit_of_its_files_is_yours(
    tmp_path: Path,
) -> None:
    """After a kill, a file new since the killed demo started, in a folder whose stage checks
    its own leftovers, is the demo's; a file it had recorded and that changed since is not."""
    d = tmp_path / "d"
    made_by_a_demo(d, {"tiles/a.h5": "demo", "cohort/labels.csv": "demo"})
    ledger = claim(d, overwrite=False, writes=WRITES, resumable=RESUMABLE)
    ledger.start()
    assert ledger._stop is not None and ledger._beats is not None
    ledger._stop.set()  # its beats stop: it is 'killed' (nothing more recorded)
    ledger._beats.join()
    old = (d / MARKER).stat().st_mtime_ns - 60 * 10**9  # its last touch, a minute ago
    os.utime(d / MARKER, ns=(old, old))
    (d / "tiles" / "b.h5").write_text("its last write")
    (d / "features").mkdir()
    (d / "features" / "c.lock").write_text("its claim")
    with (d / "tiles" / "a.h5").open("a") as f:
        f.write("# my edit")
    with pytest.raises(UserError, match="rerunning the demo would overwrite them") as e:
        claim(d, overwrite=False, writes=WRITES, resumable=RESUMABLE)
    assert "'tiles/a.h5'" in str(e.value) and "b.h5" not in str(e.value)
    assert "c.lock" not in str(e.value)
    (d / "tiles" / "a.h5").rename(tmp_path / "a.h5")
    ledger = claim(d, overwrite=True, writes=WRITES, resumable=RESUMABLE)
    assert set(stats(d)) == set() and not (d / "features").exists()
