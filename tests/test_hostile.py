"""Hostile and careless input (issue 10): nothing a user made is lost, no write leaves its
folder, bad input is one line and exit 2 before any work.

Every case runs the real CLI (`cli.main` in-process, or a subprocess where the process matters).
A full or read-only disk is a real tmpfs mount (root); without root those cases are skipped or use
permissions instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tissue_image

from melanoma_mil.cli import main
from melanoma_mil.config import FitConfig, load_config
from melanoma_mil.data.cohort import build_cohort
from melanoma_mil.data.synthetic import make_bag_cohort
from melanoma_mil.demo.owned import MARKER, Ledger, claim
from melanoma_mil.demo.pyramid import write_pyramid

ROOT = Path(__file__).resolve().parents[1]
FAST_FIT = ["cv.folds=2", "trainer.max_epochs=1", "logger=none", "trainer.accelerator=cpu"]


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Exit code and stderr of one in-process command."""
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def one_line_error(rc: int, err: str, *needles: str) -> str:
    """Assert exit 2 with exactly one 'error:' line (containing ``needles``), no traceback."""
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (to show nothing changed)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=False)
    return done.returncode == 0


@pytest.fixture()
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody can write into: a read-only tmpfs as root, else mode 0555."""
    path = tmp_path / "ro"
    if mount_tmpfs(path, "ro,size=1m"):
        yield path
        subprocess.run(["umount", str(path)], check=True)
    elif os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
    else:
        pytest.skip("root without mount rights: no read-only folder possible")


@pytest.fixture()
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 KiB tmpfs: the first real write fills it."""
    path = tmp_path / "full"
    if not mount_tmpfs(path, "size=16k"):
        pytest.skip("needs root to mount a small tmpfs")
    yield path
    subprocess.run(["umount", str(path)], check=True)


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real pyramidal slide with tissue (16 tiles at the default tiling)."""
    path = tmp_path_factory.mktemp("slide") / "good.tiff"
    write_pyramid(path, tissue_image(1024), mpp=0.25, n_levels=2)
    return path


@pytest.fixture(scope="module")
def bag_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(features, labels, runs folder): two real fits on one bag cohort, same splits."""
    root = tmp_path_factory.mktemp("bag_runs")
    features, labels = make_bag_cohort(root, n_patients=12, dim=8)
    for seed in (0, 1):
        assert (
            main(
                [
                    "fit",
                    f"data.features_dir={features}",
                    f"data.labels_csv={labels}",
                    f"output_dir={root / 'runs' / f'seed{seed}'}",
                    f"seed={seed}",
                    *FAST_FIT,
                ]
            )
            == 0
        )
    return features, labels, root / "runs"


def fit_args(features: Path, labels: Path, out: Path) -> list[str]:
    return ["fit", f"data.features_dir={features}", f"data.labels_csv={labels}",
            f"output_dir={out}", *FAST_FIT]  # fmt: skip


# --------------------------------------------------------------------------- 1: demo overwrite
def test_demo_refuses_bad_settings_and_foreign_folders_without_touching_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "thesis.txt").write_text("draft")
    before = tree(d)
    # the repro: a range error, then a cross-field one (folds vs the cohort)
    one_line_error(*cli(capsys, "demo", f"output_dir={d}", "overwrite=true", "n_slides=1"),
                   "n_slides=1")  # fmt: skip
    one_line_error(
        *cli(capsys, "demo", f"output_dir={d}", "overwrite=true", "n_slides=2", "folds=5"),
        "folds=5",
        "n_slides=2",
    )
    one_line_error(*cli(capsys, "demo", f"output_dir={d}", "encoder.name=nope"), "nope")
    # valid settings, but the folder is not a demo's: refused with and without overwrite
    for extra in ([], ["overwrite=true"]):
        one_line_error(*cli(capsys, "demo", f"output_dir={d}", *extra), "not made by `demo`")
    assert tree(d) == before and (d / "sub").is_dir()
    thesis = d / "thesis.txt"
    one_line_error(*cli(capsys, "demo", f"output_dir={thesis}", "overwrite=true"), "file")
    assert thesis.read_text() == "draft"


def test_demo_overwrite_deletes_only_unchanged_files_a_demo_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import melanoma_mil.demo.run as demo_run

    def interrupted(cfg: object) -> int:  # Ctrl-C once the demo has generated its cohort
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_run, "run_tile", interrupted)
    d = tmp_path / "d"
    args = ["demo", f"output_dir={d}", "n_slides=12", "slide_size=1024", "folds=2"]
    assert main(args) == 130
    ledger = Ledger.read(d)
    assert ledger is not None and not ledger.running
    made = {p for p in tree(d) if p != MARKER}
    assert set(ledger.files) == made and "cohort/labels.csv" in made
    assert sum(p.startswith("cohort/slides/") for p in made) == 12
    # the user adds files (top level and inside a demo folder) and edits a demo file
    (d / "thesis.txt").write_text("mine")
    (d / "cohort" / "notes.txt").write_text("mine too")
    with open(d / "cohort" / "labels.csv", "a") as f:
        f.write("# checked by hand\n")
    claim(d, overwrite=True)
    kept = {p for p in tree(d) if p != MARKER}
    assert kept == {"cohort/labels.csv", "cohort/notes.txt", "thesis.txt"}
    assert not (d / "cohort" / "slides").exists()  # emptied demo folders are gone
    # through the CLI: the edited table sits where the demo writes, so it is named and nothing
    # is touched; moved away, the next demo runs into the cleared folder, keeping the others
    capsys.readouterr()
    assert main([*args, "overwrite=true"]) == 2
    assert "cohort/labels.csv" in capsys.readouterr().err
    assert (d / "thesis.txt").is_file() and (d / "cohort" / "labels.csv").is_file()
    (d / "cohort" / "labels.csv").rename(d / "labels_checked.csv")
    assert main([*args, "overwrite=true"]) == 130
    assert (d / "thesis.txt").read_text() == "mine"
    assert (d / "cohort" / "notes.txt").read_text() == "mine too"
    assert len(list((d / "cohort" / "slides").glob("*.tiff"))) == 12


# --------------------------------------------------------------------------- 2: ids as paths
@pytest.mark.parametrize("bad_id", ["{victim}", "../../x", "..", "a/b", "a\\b", ".hidden"])
def test_tile_refuses_manifest_ids_that_are_paths(
    bad_id: str, slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = tmp_path / "victim"
    (tmp_path / "victim.png").write_bytes(b"user's figure")
    manifest = tmp_path / "m.csv"
    bad = bad_id.format(victim=victim)
    pd.DataFrame({"slide_id": ["ok", bad], "path": [slide, slide]}).to_csv(manifest, index=False)
    out = tmp_path / "work" / "tiles"
    one_line_error(*cli(capsys, "tile", f"manifest={manifest}", f"output_dir={out}"),
                   "row 3", "not paths")  # fmt: skip
    assert (tmp_path / "victim.png").read_bytes() == b"user's figure"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["m.csv", "victim.png"]


def test_tile_extract_and_sweep_keep_to_folders_of_their_own(
    slide: Path, bag_runs: tuple[Path, Path, Path], tmp_path: Path, capsys
) -> None:
    """Each command's folder is marked: another command is refused before any work, and the same
    command resumes; a folder without a marker (made by a user, or before markers) is adopted."""
    _, _, runs = bag_runs
    tiles, mine = tmp_path / "tiles", tmp_path / "mine"
    assert main(["tile", f"slides_dir={slide.parent}", f"output_dir={tiles}"]) == 0
    before = tree(tiles)
    extract = ["extract", f"coords_dir={tiles}", "encoder.name=resnet18_imagenet",
               "encoder.pretrained=false", "device=cpu"]  # fmt: skip
    one_line_error(*cli(capsys, *extract, f"output_dir={tiles}"), str(tiles), "`tile`")
    sweep = tmp_path / "grid.yaml"
    sweep.write_text("method: grid\nparameters:\n  seed:\n    values: [1, 2]\n")
    one_line_error(*cli(capsys, "sweep", str(sweep), f"output_dir={tiles}"), "`tile`")
    argv = ["compare", str(runs / "seed0"), str(runs / "seed1"), f"output_dir={tiles}"]
    one_line_error(*cli(capsys, *argv, "overwrite=true"), "`tile`")
    assert tree(tiles) == before
    fit_run = runs / "seed0"
    fit_files = tree(fit_run)
    for argv in (["tile", f"slides_dir={slide.parent}"], extract):
        one_line_error(*cli(capsys, *argv, f"output_dir={fit_run}", "overwrite=true"), "`fit`")
    assert tree(fit_run) == fit_files
    assert main(["tile", f"slides_dir={slide.parent}", f"output_dir={tiles}"]) == 0  # resumes
    assert "already tiled" in (tiles / "tiling.csv").read_text()
    mine.mkdir()
    (mine / "notes.txt").write_text("user's")
    assert main(["tile", f"slides_dir={slide.parent}", f"output_dir={mine}"]) == 0
    assert (mine / "notes.txt").read_text() == "user's"
    assert json.loads((mine / ".melanoma-mil.json").read_text()) == {"command": "tile"}


def test_heatmap_refuses_ids_that_leave_its_folders(
    bag_runs: tuple[Path, Path, Path], slide: Path, tmp_path: Path, capsys
) -> None:
    features, _, runs = bag_runs
    run = runs / "seed0"
    out = tmp_path / "heat"
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"slide_id": ["../escape"], "path": [slide]}).to_csv(manifest, index=False)
    for cmd in ("heatmap", "predict"):
        one_line_error(
            *cli(capsys, cmd, f"run_dir={run}", f"manifest={manifest}", f"output_dir={out}"),
            "../escape",
        )
        one_line_error(
            *cli(
                capsys,
                cmd,
                f"run_dir={run}",
                f"features_dir={features}",
                "slide_ids=[../../P0001]",
                f"output_dir={out}",
            ),  # fmt: skip
            "../../P0001",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]


def test_fit_reads_bags_only_inside_features_dir_and_one_file_is_one_slide(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    features, labels = make_bag_cohort(tmp_path / "c", n_patients=12, dim=8)
    outside = tmp_path / "c" / "outside"
    outside.mkdir()
    (features / "P0000.h5").rename(outside / "s000.h5")
    df = pd.read_csv(labels)
    df.loc[0, ["slide_id", "patient_id"]] = "../outside/s000"
    df.to_csv(labels, index=False)
    one_line_error(*cli(capsys, *fit_args(features, labels, tmp_path / "a")),
                   "row 2", "../outside/s000")  # fmt: skip
    # a link makes one file two slides: refused, naming both
    (features / "P0000.h5").symlink_to(features / "P0001.h5")
    df.loc[0, ["slide_id", "patient_id"]] = "P0000"
    df.to_csv(labels, index=False)
    one_line_error(*cli(capsys, *fit_args(features, labels, tmp_path / "a")),
                   "'P0000' and 'P0001'", "same feature file")  # fmt: skip
    assert not (tmp_path / "a").exists()


# --------------------------------------------------------------------------- 6: labels
def test_blank_and_nan_labels_are_named_or_dropped_and_numbers_are_one_class(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    features, labels = make_bag_cohort(tmp_path, n_patients=12, dim=8)
    df = pd.read_csv(labels, dtype=str)
    df["label"] = ["1", "1.0", "0", "0.0", "1", "0", "1.0", "0", "+1", "0", "", "NaN"]
    df.to_csv(labels, index=False)
    line = one_line_error(*cli(capsys, *fit_args(features, labels, tmp_path / "a")),
                          str(labels), "2 row(s) have no label")  # fmt: skip
    assert "12 (P0010)" in line and "13 (P0011)" in line and "data.label_map" in line
    assert not (tmp_path / "a").exists()

    def cohort(*extra: str) -> tuple[list[str], pd.Series]:
        cfg = load_config(FitConfig, [], [f"data.features_dir={features}",
                                          f"data.labels_csv={labels}", *extra])  # fmt: skip
        c = build_cohort(cfg.data)
        return c.classes, c.bags["label"].value_counts().sort_index()

    classes, counts = cohort("data.label_map={'': drop, NaN: drop, '1.0': high, '0': low}")
    assert classes == ["high", "low"] and counts.tolist() == [5, 5]
    df.loc[10:, "label"] = "1"  # labelled now: '1', '1.0' and '+1' are one class, as are '0'/'0.0'
    df.to_csv(labels, index=False)
    classes, counts = cohort()
    assert classes == ["0", "1"] and counts.tolist() == [5, 7]


# --------------------------------------------------------------------------- 9: one-line errors
@pytest.mark.parametrize(
    "override",
    [
        "cv.repeats=0",
        "trainer.max_epochs=0",
        "trainer.max_epochs=-1",
        "model.dropout=2",
        "optim.lr=-1",
        "trainer.devices=0",
        "trainer.precision=fp8",
    ],
)
def test_config_ranges_refused_before_any_work(
    override: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    one_line_error(*cli(capsys, "fit", f"output_dir={out}", override),
                   override.split("=")[0])  # fmt: skip
    assert not out.exists()


@pytest.mark.parametrize("bad", ["strings", "scalar", "pt_dict"])
def test_malformed_bags_are_one_line_errors(
    bad: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    features, labels = make_bag_cohort(tmp_path, n_patients=12, dim=8)
    name = "P0003.pt" if bad == "pt_dict" else "P0003.h5"
    (features / "P0003.h5").unlink()
    if bad == "pt_dict":
        torch.save({"features": torch.zeros(4, 8)}, features / name)
    else:
        with h5py.File(features / name, "w") as f:
            f["features"] = np.array([[b"a", b"b"]] * 3) if bad == "strings" else np.float32(1)
    one_line_error(*cli(capsys, *fit_args(features, labels, tmp_path / "a")), name)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("cmd", ["tile", "heatmap", "predict"])
def test_unwritable_output_dir_is_refused_before_any_work(
    cmd: str, bag_runs, slide: Path, readonly_dir: Path, tmp_path: Path, capsys
) -> None:
    features, _, runs = bag_runs
    args = [cmd, f"slides_dir={slide.parent}"]
    if cmd != "tile":
        args += [f"run_dir={runs / 'seed0'}", f"features_dir={features}"]
    a_file = tmp_path / "results.txt"
    a_file.write_text("user's")
    one_line_error(*cli(capsys, *args, f"output_dir={a_file}"), str(a_file), "not a folder")
    one_line_error(*cli(capsys, *args, f"output_dir={a_file / 'sub'}"), "is a file")
    roundabout = tmp_path / "missing" / ".." / a_file.name  # the file, once missing/ is made
    one_line_error(*cli(capsys, *args, f"output_dir={roundabout}"), "not a folder")
    assert not (tmp_path / "missing").exists()
    assert a_file.read_text() == "user's"
    one_line_error(*cli(capsys, *args, f"output_dir={readonly_dir / 'out'}"), "cannot be written")
    assert list(readonly_dir.iterdir()) == []


def test_compare_on_a_full_disk_is_one_line_and_leaves_no_partial_file(
    bag_runs: tuple[Path, Path, Path], full_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, runs = bag_runs
    line = one_line_error(*cli(capsys, "compare", str(runs / "seed0"), str(runs / "seed1"),
                               f"output_dir={full_disk}", "bootstrap=100"),  # fmt: skip
                          "No space left on device", "free space")  # fmt: skip
    assert str(full_disk) in line
    assert not [p for p in full_disk.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- 10: CLAM, logs
def test_clam_pt_files_folder_itself_is_a_features_dir(tmp_path: Path) -> None:
    pt = tmp_path / "pt_files"
    pt.mkdir()
    for i in range(6):
        torch.save(torch.randn(10 + i, 24), pt / f"s{i}.pt")
    pd.DataFrame({"slide_id": [f"s{i}" for i in range(6)], "label": list("ababab")}).to_csv(
        tmp_path / "labels.csv", index=False
    )
    cfg = load_config(FitConfig, [], [f"data.features_dir={pt}",
                                      f"data.labels_csv={tmp_path / 'labels.csv'}"])  # fmt: skip
    cohort = build_cohort(cfg.data)
    assert {s: p.name for s, [(_, p)] in cohort.members.items()} == {
        f"s{i}": f"s{i}.pt" for i in range(6)
    }


def test_progress_in_a_log_file_has_no_carriage_returns(slide: Path, tmp_path: Path) -> None:
    log = tmp_path / "tile.log"
    with open(log, "w") as f:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "melanoma_mil",
                "tile",
                f"slides_dir={slide.parent}",
                f"output_dir={tmp_path / 'tiles'}",
                "workers=1",
            ],  # fmt: skip
            stderr=f,
            stdout=subprocess.DEVNULL,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=False,
        )
    text = log.read_text()
    assert done.returncode == 0, text
    assert "\r" not in text and "tile: 100%" in text
