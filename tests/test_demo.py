"""The demo end to end on a reduced cohort: every stage's outputs, learning and localisation."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from test_evaluate import FIGURES, embedded_figures

from melanoma_mil.config import DemoConfig, load_config
from melanoma_mil.demo.run import check_demo, run_demo
from melanoma_mil.errors import UserError


def test_reduced_demo_runs_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    cfg = load_config(
        DemoConfig,
        [],
        [
            f"output_dir={out}",
            "n_slides=16",
            "slide_size=3072",  # seeds 0-2: AUC >= 0.98, localisation >= 3.1, p <= 0.003
            "tile_size=224",
            "folds=2",
            "max_epochs=30",
        ],
    )
    assert run_demo(cfg) == 0
    assert len(list((out / "cohort" / "slides").glob("*.tiff"))) == 16
    assert len(list((out / "tiles" / "coords").glob("*.h5"))) == 16
    summary = json.loads((out / "fit" / "cv_summary.json").read_text())
    assert summary["pooled_auc"]["value"] >= 0.8  # planted lymphocyte clusters are learnable
    assert len(list((out / "heatmaps").glob("*/heatmap.png"))) == 16
    scores = pd.read_csv(out / "localisation.csv")
    high = scores[scores["label"] == "immune_high"]["localisation"]
    assert len(high) == 8 and high.median() > 1.5  # attention concentrates on planted regions
    # planted survival (immune-high patients live longer) is found in the predicted groups
    ev = json.loads((out / "evaluate" / "evaluation.json").read_text())
    surv = ev["survival"]
    assert surv["logrank"]["p"] < 0.05 and surv["patients_used"] == 14
    assert surv["cox"]["univariable"]["term"] == "group: immune_high vs immune_low"
    assert surv["cox"]["univariable"]["hr"] < 1
    assert set(surv["cox"]["adjusted"]) == {
        "group: immune_high vs immune_low", "age", "sex: M vs F"
    }  # fmt: skip
    figures = embedded_figures(out / "evaluate" / "report.html")  # every image inside the file
    assert FIGURES | {"cv_roc"} <= set(figures)
    assert sum(k.startswith("heatmap:") for k in figures) == 6


def test_a_cohort_too_small_for_its_folds_names_only_a_fix_left(tmp_path: Path) -> None:
    """At folds=2, the minimum, 'lower folds' is no fix: only more slides are. The message
    counts patients (the limit is on them) and names only the demo's keys."""
    cfg = load_config(DemoConfig, [], ["n_slides=8", "folds=2", f"output_dir={tmp_path / 'd'}"])
    with pytest.raises(UserError, match=r"Raise n_slides \(n_slides=11 fits\)\.$") as e:
        run_demo(cfg)
    message = str(e.value)
    assert "{'immune_high': 4, 'immune_low': 3} patients" in message
    assert "lower folds" not in message and "cv." not in message
    assert not (tmp_path / "d").exists()
    cfg.n_slides = 11
    check_demo(cfg)  # the size named fits


def test_a_cohort_too_small_for_many_folds_names_both_fixes(tmp_path: Path) -> None:
    cfg = load_config(DemoConfig, [], ["n_slides=8", "folds=4", f"output_dir={tmp_path / 'd'}"])
    with pytest.raises(UserError, match=r"n_slides=9 fits\) or lower folds \(folds=3 fits\)"):
        check_demo(cfg)
    cfg.folds = 3
    check_demo(cfg)
