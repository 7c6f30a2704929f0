"""`evaluate` on awkward but valid inputs: NA spellings, predictions without patient ids,
patient-level predictions, unlabelled slides, broken heatmaps; and one-line errors otherwise."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import mounted_tmpfs
from PIL import Image
from sklearn.metrics import roc_auc_score
from test_evaluate import _args, embedded_figures, evaluate_cli, write_small

from melanoma_mil import __version__, stats
from melanoma_mil.evaluation.classification import classification_metrics
from melanoma_mil.evaluation.clinical import read_clinical
from melanoma_mil.evaluation.version import code_version


@pytest.fixture()
def cohort(tmp_path: Path) -> Path:
    """`test_evaluate.small`'s 40 slides (one per patient, s00..s39), plus an age column."""
    rng = write_small(tmp_path)
    clinical = pd.read_csv(tmp_path / "clinical.csv", dtype={"patient_id": str})
    clinical["age"] = rng.integers(30, 80, 40)
    clinical.to_csv(tmp_path / "clinical.csv", index=False)
    return tmp_path


def _edit_csv(path: Path, column: str, rows: dict[int, str]) -> None:
    """Write ``rows`` (index -> text) into ``column``, keeping every cell as written."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    for i, value in rows.items():
        df.loc[i, column] = value
    df.to_csv(path, index=False)


def _evaluation(root: Path) -> dict:
    return json.loads((root / "out" / "evaluation.json").read_text())


# --------------------------------------------------------------------------- 1: clinical NAs
def test_na_spellings_in_clinical_csv_are_empty_cells(cohort: Path) -> None:
    path = cohort / "clinical.csv"
    _edit_csv(path, "age", {3: "NA", 5: "n/a", 7: "  NULL "})
    _edit_csv(path, "time", {10: "NA"})
    _edit_csv(path, "event", {11: "N/A"})
    clinical = read_clinical(str(path), "time", "event", ["age"])
    assert clinical.covariates == {"age": "numeric"}
    assert clinical.no_follow_up == ["s10", "s11"]
    assert clinical.table["age"].isna().sum() == 3
    assert clinical.table.loc["s04", "age"] == float(pd.read_csv(path).loc[4, "age"])


def test_na_patients_leave_the_adjusted_cox_model(
    cohort: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _edit_csv(cohort / "clinical.csv", "age", {3: "NA", 5: "nan"})
    _edit_csv(cohort / "clinical.csv", "time", {10: "NA"})
    rc, err = evaluate_cli(capsys, *_args(cohort, "covariates=[age]"))
    assert rc == 0, err
    survival = _evaluation(cohort)["survival"]
    assert survival["covariates"] == {"age": "numeric"}
    assert survival["patients_used"] == 39  # s10 has no follow-up
    assert survival["cox"]["adjusted_n"] == 37  # and s03, s05 no age
    assert set(survival["cox"]["adjusted"]) == {"group: high vs low", "age"}


def test_mostly_numeric_covariate_with_text_names_the_rows(
    cohort: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _edit_csv(cohort / "clinical.csv", "age", {6: "unknown", 8: "5O"})
    rc, err = evaluate_cli(capsys, *_args(cohort, "covariates=[age]"))
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "clinical.csv" in err and "covariate age" in err
    assert "row 8 ('s06')" in err and "row 10 ('s08')" in err and "'5O'" in err
    assert not (cohort / "out").exists()


def test_text_covariate_stays_categorical(cohort: Path) -> None:
    stages = {i: ("I", "II", "III", "NA")[i % 4] for i in range(40)}
    _edit_csv(cohort / "clinical.csv", "age", stages)
    clinical = read_clinical(str(cohort / "clinical.csv"), "time", "event", ["age"])
    assert clinical.covariates == {"age": "categorical"}
    assert clinical.table["age"].isna().sum() == 10


# --------------------------------------------------------------------------- 2: patient ids
PATIENT_OF = {f"s{i:02d}": f"p{i // 2:02d}" for i in range(40)}  # s00, s01 -> p00 ...


def _pair_labels(root: Path) -> None:
    """Two slides per patient, one label each: p00 low, p01 high, p02 low ..."""
    labels = pd.read_csv(root / "labels.csv")
    labels["label"] = np.where(labels.index // 2 % 2, "high", "low")
    labels.to_csv(root / "labels.csv", index=False)


def test_predictions_patient_id_column_groups_slides(
    cohort: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _pair_labels(cohort)
    preds = pd.read_csv(cohort / "predictions.csv")
    preds.insert(1, "patient_id", preds["slide_id"].map(PATIENT_OF))
    preds.to_csv(cohort / "predictions.csv", index=False)
    rc, err = evaluate_cli(capsys, *_args(cohort, "clinical_csv=", "groups=median"))
    assert rc == 0, err
    ev = _evaluation(cohort)
    assert ev["classification"]["n"] == 20 and ev["counts"]["patients_scored"] == 20
    assert ev["classification"]["auc"]["value"] is not None
    assert not any("patient ids" in w for w in ev["warnings"])


def test_no_patient_ids_anywhere_is_a_warning(
    cohort: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _edit_csv(cohort / "predictions.csv", "patient_id", {i: ("NA", "")[i % 2] for i in range(40)})
    rc, err = evaluate_cli(capsys, *_args(cohort, "clinical_csv="))
    assert rc == 0, err
    ev = _evaluation(cohort)
    assert ev["classification"]["n"] == 40
    assert any("each slide is treated as its own patient" in w for w in ev["warnings"])
    _pair_labels(cohort)
    labels = pd.read_csv(cohort / "labels.csv")
    labels["patient_id"] = labels["slide_id"].map(PATIENT_OF)
    labels.to_csv(cohort / "labels.csv", index=False)
    rc, err = evaluate_cli(capsys, *_args(cohort, "clinical_csv=", "overwrite=true"))
    ev = _evaluation(cohort)
    assert rc == 0 and ev["classification"]["n"] == 20
    assert not any("patient ids" in w for w in ev["warnings"])


def test_blank_patient_ids_in_labels_keep_the_predictions_patients(
    cohort: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """labels_csv names the patients of some slides only: the others keep the patient ids the
    predictions carry (predict's patients_csv=), for slide and for patient predictions."""
    _pair_labels(cohort)
    labels = pd.read_csv(cohort / "labels.csv")
    labels["patient_id"] = labels["slide_id"].map(PATIENT_OF).where(labels.index >= 6, "")
    labels.to_csv(cohort / "labels.csv", index=False)  # p00-p02 have no patient id there
    preds = pd.read_csv(cohort / "predictions.csv")
    preds.insert(1, "patient_id", preds["slide_id"].map(PATIENT_OF))
    preds.to_csv(cohort / "predictions.csv", index=False)
    rc, err = evaluate_cli(capsys, *_args(cohort, "clinical_csv="))
    assert rc == 0, err
    ev = _evaluation(cohort)
    assert ev["counts"]["patients_scored"] == 20  # not 23: p00-p02 kept whole
    assert not any("other patients" in w for w in ev["warnings"])
    labels.loc[39, "patient_id"] = "p99"  # s39: p19 in the predictions
    labels.to_csv(cohort / "labels.csv", index=False)
    rc, err = evaluate_cli(capsys, *_args(cohort, "clinical_csv=", "overwrite=true"))
    assert rc == 0, err
    [warning] = [w for w in _evaluation(cohort)["warnings"] if "other patients" in w]
    assert "1 slide(s) (e.g. s39: p99 in labels_csv, p19 in the predictions)" in warning
    _patient_predictions(cohort)
    whole = f"predictions={cohort / 'patient_predictions.csv'}"
    rc, err = evaluate_cli(capsys, *_args(cohort, whole, "clinical_csv=", "overwrite=true"))
    assert rc == 0, err
    ev = _evaluation(cohort)
    assert ev["classification"]["n"] == 20, ev["excluded"]  # p00-p02 labelled by their slides


def test_a_slide_listed_twice_in_predictions_is_refused(
    cohort: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    preds = pd.read_csv(cohort / "predictions.csv")
    pd.concat([preds, preds.iloc[[3]]]).to_csv(cohort / "predictions.csv", index=False)
    rc, err = evaluate_cli(capsys, *_args(cohort, "clinical_csv="))
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "predictions.csv" in err and "['s03'] more than once" in err
    assert not (cohort / "out").exists()


# --------------------------------------------------------------------------- 3: patient rows
def _patient_predictions(root: Path) -> pd.DataFrame:
    """predict's patient_predictions.csv: one row per patient p00..p19 with its slide_ids."""
    preds = pd.read_csv(root / "predictions.csv")
    preds["patient_id"] = preds["slide_id"].map(PATIENT_OF)
    table = preds.groupby("patient_id").agg(
        slide_ids=("slide_id", ";".join),
        prob_low=("prob_low", "mean"),
        prob_high=("prob_high", "mean"),
    )
    table = table.reset_index().assign(status="ok", reason="", n_slides=2)
    table.to_csv(root / "patient_predictions.csv", index=False)
    return table


def test_patient_predictions_take_labels_through_slide_ids(
    cohort: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _pair_labels(cohort)
    table = _patient_predictions(cohort)
    preds = f"predictions={cohort / 'patient_predictions.csv'}"
    rc, err = evaluate_cli(capsys, *_args(cohort, preds, "clinical_csv="))
    assert rc == 0, err
    ev = _evaluation(cohort)
    assert ev["kind"] == "patient_predictions" and ev["classification"]["n"] == 20
    y = np.arange(20) % 2  # p01, p03, ... are high
    assert ev["classification"]["auc"]["value"] == pytest.approx(
        roc_auc_score(y, table["prob_high"])
    )


def test_patient_predictions_refuse_disagreeing_or_unmatched_labels(
    cohort: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _patient_predictions(cohort)  # labels alternate, so p00's slides s00, s01 disagree
    preds = f"predictions={cohort / 'patient_predictions.csv'}"
    rc, err = evaluate_cli(capsys, *_args(cohort, preds, "clinical_csv="))
    assert rc == 2 and "'p00'" in err and "different labels" in err
    labels = pd.read_csv(cohort / "labels.csv")
    labels.assign(slide_id="x" + labels["slide_id"]).to_csv(cohort / "labels.csv", index=False)
    rc, err = evaluate_cli(capsys, *_args(cohort, preds, "clinical_csv="))
    assert rc == 2 and "match none of the predictions'" in err and "patient_id column" in err
    assert "carry no labels" not in err and not (cohort / "out").exists()


# --------------------------------------------------------------------------- 4: blank labels
def test_blank_and_na_labels_leave_slides_unlabelled(
    cohort: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _edit_csv(cohort / "labels.csv", "label", {2: "NA", 3: "", 4: "n/a"})
    rc, err = evaluate_cli(capsys, *_args(cohort))
    assert rc == 0, err
    ev = _evaluation(cohort)
    assert ev["classification"]["n"] == 37
    assert ev["survival"]["patients_used"] == 40  # unlabelled, still followed up
    reasons = {x["id"]: x["reason"] for x in ev["excluded"]}
    assert {reasons[s] for s in ("s02", "s03", "s04")} == {"blank or NA label in labels_csv"}


def test_unknown_label_error_names_a_fix_evaluate_accepts(
    cohort: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _edit_csv(cohort / "labels.csv", "label", {5: "medium"})
    rc, err = evaluate_cli(capsys, *_args(cohort))
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "labels.csv" in err and "'medium'" in err and "run_dir=" in err
    assert "data.label_map" not in err and "data.classes" not in err


# --------------------------------------------------------------------------- 5: heatmaps
def test_truncated_heatmap_is_skipped_and_relative_paths_resolve(
    cohort: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    preds = pd.read_csv(cohort / "predictions.csv")
    preds["heatmap"] = [f"heatmaps/{s}/heatmap.png" for s in preds["slide_id"]]
    for i, rel in enumerate(preds["heatmap"]):
        path = cohort / rel
        path.parent.mkdir(parents=True)
        Image.new("RGB", (64, 48), (i * 6, 0, 0)).save(path)
    # predict run elsewhere with output_dir=old/place: <output_dir>/<slide>/heatmap.png, moved
    top = preds.loc[preds["prob_high"].idxmax(), "slide_id"]
    moved = preds["slide_id"][preds["slide_id"] != top].iloc[-2:]
    preds.loc[moved.index, "heatmap"] = [f"old/place/{s}/heatmap.png" for s in moved]
    for s in moved:
        (cohort / s).mkdir()
        (cohort / f"heatmaps/{s}/heatmap.png").rename(cohort / s / "heatmap.png")
    preds.to_csv(cohort / "predictions.csv", index=False)
    png = (cohort / f"heatmaps/{top}/heatmap.png").read_bytes()
    (cohort / f"heatmaps/{top}/heatmap.png").write_bytes(png[: len(png) // 2])  # truncated
    assert not Path(preds.loc[0, "heatmap"]).exists()  # not from the cwd: beside predictions
    rc, err = evaluate_cli(capsys, *_args(cohort, "top_heatmaps=40"))
    assert rc == 0, err
    shown = {k for k in embedded_figures(cohort / "out" / "report.html") if "heatmap" in k}
    assert len(shown) == 39 and f"heatmap:{top}" not in shown
    assert {f"heatmap:{s}" for s in moved} <= shown
    warnings = _evaluation(cohort)["warnings"]
    assert any(f"heatmaps/{top}/heatmap.png" in w and "unreadable" in w for w in warnings)


# --------------------------------------------------------------------------- 6: absent class
def test_macro_auc_is_over_the_classes_present(
    cohort: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(2)
    ids = [f"s{i:02d}" for i in range(40)]
    y = np.arange(40) % 2  # classes a and b; c has no case
    probs = rng.dirichlet([1, 1, 1], 40) + np.eye(3)[y] * 0.5
    probs /= probs.sum(1, keepdims=True)
    table = pd.DataFrame({"slide_id": ids, "status": "ok", "reason": ""})
    for c, name in enumerate("abc"):
        table[f"prob_{name}"] = probs[:, c]
    table.to_csv(cohort / "predictions.csv", index=False)
    labels = pd.DataFrame({"slide_id": ids, "label": np.array(["a", "b"])[y]})
    labels.to_csv(cohort / "labels.csv", index=False)
    rc, err = evaluate_cli(capsys, *_args(cohort, "clinical_csv="))
    assert rc == 0, err
    ev = _evaluation(cohort)
    expected = np.mean([roc_auc_score(y == c, probs[:, c]) for c in (0, 1)])
    assert ev["classification"]["auc"]["value"] == pytest.approx(expected)
    assert ev["classification"]["auc"]["ci_low"] < expected < ev["classification"]["auc"]["ci_high"]
    assert any("['c'] absent" in w for w in ev["warnings"])


def test_undefined_bootstrap_replicates_are_counted() -> None:
    y = np.r_[np.zeros(10, int), np.ones(9, int), 2]  # one case of class 2
    probs = np.random.default_rng(0).dirichlet([1, 1, 1], 20)
    out = classification_metrics(y, probs, np.arange(20), 0.5, 400, 0)
    dropped = out["bootstrap_dropped"]["auc"]  # resamples without the class-2 case
    assert 400 * 0.25 < dropped < 400 * 0.5  # about (19/20)^20 = 36% of them
    assert np.isfinite(out["auc"]["ci_low"]) and np.isfinite(out["auc"]["value"])
    expected = np.mean([roc_auc_score(y == c, probs[:, c]) for c in range(3)])
    assert out["auc"]["value"] == pytest.approx(expected)
    assert (
        stats.macro_auc(y[:19], probs[:19])[0]
        == pytest.approx(  # class 2 absent
            np.mean([roc_auc_score(y[:19] == c, probs[:19, c]) for c in range(2)])
        )
    )


# --------------------------------------------------------------------------- 9: code version
def _git(cwd: Path, *args: str) -> None:
    ident = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", *ident, *args], cwd=cwd, check=True, capture_output=True)


def test_code_version_names_only_the_packages_own_checkout(tmp_path: Path) -> None:
    user = tmp_path / "analysis"  # a user's repository that holds an installed copy
    (user / "vendor" / "melanoma_mil").mkdir(parents=True)
    (user / "vendor" / "pyproject.toml").write_text('[project]\nname = "melanoma-mil"\n')
    _git(user, "init", "-q")
    _git(user, "add", ".")
    _git(user, "commit", "-qm", "analysis")
    assert code_version(user / "vendor" / "melanoma_mil") == f"melanoma-mil {__version__}"
    own = tmp_path / "checkout"
    (own / "melanoma_mil").mkdir(parents=True)
    (own / "melanoma_mil" / "__init__.py").write_text("")
    (own / "pyproject.toml").write_text('[project]\nname = "melanoma-mil"\n')
    _git(own, "init", "-q")
    _git(own, "add", ".")
    _git(own, "commit", "-qm", "release")
    _git(own, "tag", "-a", "v9.9", "-m", "v9.9")
    assert code_version(own / "melanoma_mil") == f"melanoma-mil {__version__} (git v9.9)"
    (own / "melanoma_mil" / "__init__.py").write_text("# edited\n")
    assert code_version(own / "melanoma_mil").endswith("(git v9.9-dirty)")
    (own / "pyproject.toml").write_text('[project]\nname = "other"\n')
    assert "git" not in code_version(own / "melanoma_mil")


def test_a_probability_on_a_bin_edge_falls_in_the_bin_that_starts_there() -> None:
    """Reliability bins are [low, high): 0.3, 0.6 and 0.7 (edges linspace puts a hair above
    the decimal) belong to the bins starting there, as their low / high in the JSON say."""
    from melanoma_mil.evaluation.calibration import calibration

    p1 = np.array([0.3, 0.6, 0.7, 0.05, 0.95, 1.0])
    y = np.array([1, 0, 1, 0, 1, 1])
    cal = calibration(y, np.c_[1 - p1, p1], 10)
    for b in cal["reliability"]:
        low, high = b["low"], b["high"]
        inside = (p1 >= low) & ((p1 < high) if high < 1 else (p1 <= high))
        assert b["n"] == int(inside.sum()), b
        assert str(high) == f"{high:.1f}"  # 0.3, not 0.30000000000000004


def test_a_full_disk_midway_leaves_the_earlier_evaluation_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """overwrite=true on a nearly full disk: the figures and evaluation.json were replaced and
    report.html then failed, leaving the new numbers beside the old report."""
    disk = tmp_path / "disk"
    if not mounted_tmpfs(disk, "2m"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        write_small(tmp_path)
        args = _args(tmp_path, f"output_dir={disk / 'ev'}")
        assert evaluate_cli(capsys, *args)[0] == 0
        before = {p.name: p.read_bytes() for p in (disk / "ev").iterdir()}
        # room for any one file but the report, which is written last (it embeds the figures)
        largest = max(len(b) for n, b in before.items() if n != "report.html")
        room = (largest + len(before["report.html"])) // 2
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(bytes(free - room))
        rc, err = evaluate_cli(capsys, *args, "overwrite=true", "seed=1")  # other CIs
        assert rc == 2 and "No space left on device" in err
        assert {p.name: p.read_bytes() for p in (disk / "ev").iterdir()} == before
    finally:
        subprocess.run(["umount", str(disk)], check=True)
