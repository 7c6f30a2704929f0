"""Bad input to `fit` gives one clear line naming the file and the fix, exit 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from melanoma_mil.cli import main
from melanoma_mil.config import FitConfig, load_config, to_yaml
from melanoma_mil.data.cohort import build_cohort
from melanoma_mil.data.store import open_store
from melanoma_mil.data.synthetic import make_bag_cohort

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def cohort(tmp_path: Path) -> tuple[Path, Path]:
    return make_bag_cohort(tmp_path, n_patients=12, dim=16)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    rc = main(
        [
            "fit",
            "trainer.accelerator=cpu",
            "logger=none",
            "cv.folds=3",
            "trainer.max_epochs=1",
            *args,
        ]
    )
    return rc, capsys.readouterr().err


def fit_args(features: Path, labels: Path, out: Path) -> list[str]:
    return [f"data.features_dir={features}", f"data.labels_csv={labels}", f"output_dir={out}"]


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


def test_missing_feature_files_listed_or_skipped(cohort, tmp_path, capsys) -> None:
    features, labels = cohort
    (features / "P0003.h5").unlink()
    (features / "P0007.h5").unlink()
    rc, err = run_cli(capsys, *fit_args(features, labels, tmp_path / "a"))
    assert_one_line_error(rc, err, "P0003", "P0007", "data.on_missing=skip")
    rc, _ = run_cli(capsys, *fit_args(features, labels, tmp_path / "b"), "data.on_missing=skip")
    assert rc == 0
    assert len(pd.read_csv(tmp_path / "b" / "predictions.csv")) == 10


def test_the_parent_of_feature_caches_names_them(cohort, tmp_path, capsys) -> None:
    """data.features_dir=<extract's output_dir> rather than its <cache_key> subfolder."""
    features, labels = cohort
    parent = tmp_path / "extracted"
    parent.mkdir()
    features.rename(parent / "synthetic-16-abc")  # as extract writes it
    (parent / "uni-1024-def").mkdir()  # a cache whose slides all failed: only its table
    (parent / "uni-1024-def" / "extract.csv").write_text("slide_id,status\n")
    (parent / "notes").mkdir()  # not a cache
    rc, err = run_cli(capsys, *fit_args(parent, labels, tmp_path / "a"))
    assert_one_line_error(rc, err, f"did you mean data.features_dir={parent / 'synthetic-16-abc'}"
                          f" or data.features_dir={parent / 'uni-1024-def'}?")  # fmt: skip
    assert "notes" not in err and "Run `extract`" not in err


def test_slide_id_typos_name_the_feature_files_meant(cohort, tmp_path, capsys) -> None:
    features, labels = cohort
    df = pd.read_csv(labels, dtype=str)
    df["slide_id"] = df["slide_id"].replace({"P0003": "P003", "P0007": "P0007.svs"})
    typos = tmp_path / "typos.csv"
    df.to_csv(typos, index=False)
    rc, err = run_cli(capsys, *fit_args(features, typos, tmp_path / "a"))
    meant = ("Labels say 'P003': did you mean 'P0003'?",
             "Labels say 'P0007.svs': did you mean 'P0007'?")  # fmt: skip
    # a near id may be another slide not yet extracted: the extract fix is always given
    fixes = "If so, fix the slide ids in data.labels_csv; otherwise run `extract`"
    assert_one_line_error(rc, err, *meant, fixes)


def test_a_file_as_features_dir_is_named_a_file(cohort, tmp_path, capsys) -> None:
    features, labels = cohort
    rc, err = run_cli(capsys, *fit_args(labels, labels, tmp_path / "a"))
    assert_one_line_error(rc, err, f"'{labels}' is a file, not a folder", "data.features_dir")


def test_unknown_label_values(cohort, tmp_path, capsys) -> None:
    features, labels = cohort
    df = pd.read_csv(labels)
    df.loc[0, "label"] = "immune_hihg"
    df.to_csv(labels, index=False)
    rc, err = run_cli(
        capsys, *fit_args(features, labels, tmp_path / "a"), "data.classes=[immune_low,immune_high]"
    )
    assert_one_line_error(
        rc, err, "['immune_hihg'] are not in data.classes", str(labels), "add them to data.classes"
    )


def test_labels_data_classes_does_not_name_at_all(cohort, tmp_path, capsys) -> None:
    """A sweep file's data.classes=[immune_low,immune_high] on a cohort labelled 0/1: the fix is
    to replace the list, not to extend it."""
    features, labels = cohort
    rc, err = run_cli(capsys, *fit_args(features, labels, tmp_path / "a"), "data.classes=[no,yes]")
    assert_one_line_error(rc, err, str(labels), "none of its labels", "set data.classes to your")


def test_a_class_named_twice_is_refused(cohort, tmp_path, capsys) -> None:
    features, labels = cohort
    args = fit_args(features, labels, tmp_path / "a")
    rc, err = run_cli(capsys, *args, "data.classes=[0,1,1]")
    assert_one_line_error(rc, err, "names ['1'] more than once")


def test_h5_without_features(cohort, tmp_path, capsys) -> None:
    features, labels = cohort
    with h5py.File(features / "P0002.h5", "w") as f:
        f.create_dataset("feats", data=np.zeros((3, 16)))
    rc, err = run_cli(capsys, *fit_args(features, labels, tmp_path / "a"))
    assert_one_line_error(rc, err, "P0002.h5", "no 'features'")


@pytest.mark.parametrize("bad", ["nan", "inf", "empty"])
def test_nan_inf_and_empty_bags(cohort, tmp_path, capsys, bad: str) -> None:
    features, labels = cohort
    x = np.zeros((0, 16)) if bad == "empty" else np.ones((5, 16))
    if bad != "empty":
        x[2, 3] = np.nan if bad == "nan" else np.inf
    with h5py.File(features / "P0004.h5", "w") as f:
        f.create_dataset("features", data=x)
    rc, err = run_cli(capsys, *fit_args(features, labels, tmp_path / "a"))
    assert_one_line_error(rc, err, "P0004.h5", "empty" if bad == "empty" else "NaN/Inf")


def test_unreadable_csv(cohort, tmp_path, capsys) -> None:
    features, _ = cohort
    bad = tmp_path / "labels.csv"
    bad.write_bytes(b"\xff\xfe\x00slide_id,label\n\x00\x81")
    rc, err = run_cli(capsys, *fit_args(features, bad, tmp_path / "a"))
    assert_one_line_error(rc, err, str(bad))
    rc, err = run_cli(capsys, *fit_args(features, tmp_path / "nope.csv", tmp_path / "a"))
    assert_one_line_error(rc, err, "nope.csv", "not found")
    semicolons = tmp_path / "semicolons.csv"  # a spreadsheet export in a comma-decimal locale
    semicolons.write_text("slide_id;label\nP0000;1\n")
    rc, err = run_cli(capsys, *fit_args(features, semicolons, tmp_path / "a"))
    assert_one_line_error(rc, err, "semicolons.csv", "separated by semicolons", "comma-separated")


def test_too_few_patients_for_folds(cohort, tmp_path, capsys) -> None:
    features, labels = cohort
    rc, err = run_cli(capsys, *fit_args(features, labels, tmp_path / "a"), "cv.folds=7")
    assert_one_line_error(rc, err, "fewer than cv.folds=7", "Lower cv.folds")
    one = tmp_path / "one_patient.csv"  # every slide one patient's: no cv.folds can work
    pd.read_csv(labels, dtype=str).assign(patient_id="P").to_csv(one, index=False)
    rc, err = run_cli(capsys, *fit_args(features, one, tmp_path / "a"))
    assert_one_line_error(rc, err, "has 1 patient(s)", "Add patients", "patient_id")
    assert "Lower cv.folds" not in err


def test_leaky_user_splits_rejected(cohort, tmp_path, capsys) -> None:
    features, labels = cohort
    leaky = tmp_path / "splits.json"
    ids = [f"P{i:04d}" for i in range(12)]
    split = {"repeat": 0, "fold": 0, "train": ids[:8], "val": ids[8:10], "test": ids[9:]}
    leaky.write_text(f'{{"splits": [{str(split).replace(chr(39), chr(34))}]}}')
    rc, err = run_cli(
        capsys, *fit_args(features, labels, tmp_path / "a"), f"cv.splits_file={leaky}"
    )
    assert_one_line_error(rc, err, "P0009", "both")


def test_mixed_feature_caches_rejected(cohort, tmp_path, capsys) -> None:
    features, labels = cohort
    with h5py.File(features / "P0005.h5", "a") as f:
        f.attrs["encoder"] = "uni"
    rc, err = run_cli(capsys, *fit_args(features, labels, tmp_path / "a"))
    assert_one_line_error(rc, err, "P0005.h5", "mixes feature caches")


def test_unknown_key_fails_before_work_in_a_real_process(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "melanoma_mil", "fit", "trainer.max_epoch=3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "did you mean 'trainer.max_epochs'" in proc.stderr.lower()


def test_clam_pt_files_are_read(tmp_path: Path) -> None:
    (tmp_path / "pt_files").mkdir()
    rows = []
    for i in range(6):
        torch.save(torch.randn(10 + i, 24), tmp_path / "pt_files" / f"s{i}.pt")
        rows.append({"slide_id": f"s{i}", "label": "ab"[i % 2]})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    cfg = load_config(
        FitConfig,
        [],
        [f"data.features_dir={tmp_path}", f"data.labels_csv={tmp_path / 'labels.csv'}"],
    )
    cohort = build_cohort(cfg.data)
    store = open_store(cohort.members, cfg)
    assert store.dim == 24 and store.bags["s5"].shape == (15, 24)
    assert store.dtype == torch.float32  # float32 pt files stay float32


def test_clam_splits_csv_folder_is_used(tmp_path: Path) -> None:
    features, labels = make_bag_cohort(tmp_path, n_patients=12, dim=16)
    ids = [f"P{i:04d}" for i in range(12)]
    folder = tmp_path / "clam_splits"
    folder.mkdir()
    for k in range(2):
        test = ids[k * 6 : k * 6 + 6]
        rest = [i for i in ids if i not in test]
        cols = {"train": rest[:4], "val": rest[4:], "test": test}
        pd.DataFrame({c: pd.Series(v) for c, v in cols.items()}).to_csv(
            folder / f"splits_{k}.csv", index=False
        )
    cfg = load_config(
        FitConfig,
        [],
        [
            f"data.features_dir={features}",
            f"data.labels_csv={labels}",
            f"output_dir={tmp_path / 'r'}",
            f"cv.splits_file={folder}",
            "trainer.max_epochs=1",
            "trainer.accelerator=cpu",
            "logger=none",
        ],
    )
    from melanoma_mil.training.cv import run_fit

    assert run_fit(cfg) == 0
    preds = pd.read_csv(tmp_path / "r" / "predictions.csv")
    assert sorted(preds[preds["fold"] == 1]["slide_id"]) == ids[6:]


def test_defaults_yaml_is_what_fit_uses() -> None:
    """configs/defaults.yaml documents fit's defaults: it must not drift from the dataclass."""
    written = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "defaults.yaml"))
    assert written == OmegaConf.to_container(OmegaConf.create(to_yaml(FitConfig())))


def test_a_warning_prints_as_one_line_without_our_source_line(tmp_path: Path) -> None:
    """Python prints a warning with the file, line and source line that raised it: noise."""
    feats, labels = make_bag_cohort(tmp_path / "c", n_patients=8, dim=8, n_instances=(2, 3))
    for bag in feats.glob("*.h5"):
        with h5py.File(bag, "a") as f:
            f.attrs["encoder_weights"] = "random"
    keys = [f"data.features_dir={feats}", f"data.labels_csv={labels}", "cv.folds=2",
            f"output_dir={tmp_path / 'r'}", "trainer.max_epochs=1", "logger=none",
            "trainer.accelerator=cpu", "model.hidden_dim=8"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "melanoma_mil", "fit", *keys], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    warned = [ln for ln in done.stderr.splitlines() if "randomly initialised" in ln]
    assert warned and all(ln.startswith("warning: ") for ln in warned), done.stderr
    assert "warnings.warn(" not in done.stderr and "UserWarning" not in done.stderr


def test_a_library_warning_keeps_its_category_and_ours_reads_as_advice() -> None:
    from melanoma_mil.console import one_line

    assert one_line("soon gone", FutureWarning) == "warning (FutureWarning): soon gone\n"
    assert one_line("random weights", UserWarning) == "warning: random weights\n"
