"""What compare writes: comparison.md's cells where a number has no estimate, and its files
written together, so a failed write never mixes two comparisons."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import mounted_tmpfs
from test_compare import write_run

from melanoma_mil.config import CompareConfig
from melanoma_mil.evaluation.compare import compare_runs, markdown


def _cohort() -> tuple[np.ndarray, np.ndarray]:
    """60 patients x 2 slides, same label per patient; patient-level folds with both classes."""
    return np.repeat(np.tile([0, 1], 30), 2), np.repeat(np.arange(60) // 2 % 4, 2)


def test_numbers_without_an_estimate_are_n_a_in_the_table_not_nan(tmp_path: Path) -> None:
    """Every test fold holds one class (no fold AUC, so no mean), and a perfect scorer against
    an inverted one differs by -1 in every bootstrap replicate (no CI, no p: left out of the
    Holm family, which is then c alone)."""
    labels = np.repeat(np.tile([0, 1], 30), 2)
    folds = labels.copy()  # fold 0: class 0 only, fold 1: class 1 only
    noisy = np.clip(0.3 + 0.4 * labels + np.random.default_rng(1).normal(0, 0.2, 120), 0, 1)
    probs = {"a": 0.2 + 0.6 * labels, "b": 0.8 - 0.6 * labels, "c": noisy}
    with pytest.warns(UserWarning, match="Only one class"):  # sklearn, writing the fake runs
        runs = [write_run(tmp_path / n, p, labels, folds, n) for n, p in probs.items()]
    out = tmp_path / "o"
    table = compare_runs(CompareConfig(run_dirs=[str(r) for r in runs], output_dir=str(out)))
    assert table.auc_mean.isna().all() and np.isnan(table.pooled_auc_diff_ci_low[1])
    md = (out / "comparison.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| b |"))
    assert "nan" not in md and "| n/a (0 of 2 folds) | -1.000 [CI n/a] |" in row
    assert row.split(" | ")[2] == "n/a"  # the AUC column
    assert (
        row.endswith("| n/a | n/a |")
        and table.loc[1, ["p_bootstrap_holm", "p_delong_holm"]].isna().all()
    )
    assert table.p_bootstrap_holm[2] == table.p_bootstrap[2] < 1  # c's family: c
    assert table.p_delong_holm[2] == table.p_delong[2] < 1
    assert "comparison's 1 run tested" in md
    table.loc[1, ["pooled_auc_ci_low", "pooled_auc_ci_high"]] = np.nan  # no replicate usable
    row = next(line for line in markdown(table, 100).splitlines() if line.startswith("| b |"))
    assert "nan" not in row and f"| {table.pooled_auc[1]:.3f} [CI n/a] |" in row


def test_a_full_disk_midway_leaves_the_earlier_comparison_whole(tmp_path: Path) -> None:
    """overwrite=true on a nearly full disk: the tables were replaced and the figure then
    failed, leaving the new comparison beside the old figure."""
    disk = tmp_path / "disk"
    if not mounted_tmpfs(disk, "2m"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        labels, folds = _cohort()
        rng = np.random.default_rng(6)
        runs = [str(write_run(tmp_path / name, rng.random(len(labels)), labels, folds, name))
                for name in ("a", "b")]  # fmt: skip
        cfg = CompareConfig(run_dirs=runs, output_dir=str(disk / "cmp"), bootstrap=100)
        compare_runs(cfg)
        before = {p.name: p.read_bytes() for p in (disk / "cmp").iterdir()}
        # room for any one table, not for the figure, which is written last
        largest = max(len(b) for n, b in before.items() if n != "comparison.png")
        room = (largest + len(before["comparison.png"])) // 2
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(bytes(free - room))
        with pytest.raises(OSError, match="No space left"):
            compare_runs(dataclasses.replace(cfg, overwrite=True, reference="b"))
        assert {p.name: p.read_bytes() for p in (disk / "cmp").iterdir()} == before
    finally:
        subprocess.run(["umount", str(disk)], check=True)
