"""Inputs written by other tools and people: CLAM split folders, NA-spelled patient ids,
numeric label_map keys in YAML."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from melanoma_mil.config import FitConfig, load_config
from melanoma_mil.data.cohort import read_labels
from melanoma_mil.data.splits import read_clam_splits
from melanoma_mil.errors import UserError


def test_a_real_clam_splits_folder_reads_only_the_fold_files(tmp_path: Path) -> None:
    for k, (train, val, test) in enumerate([("ab", "c", "d"), ("cd", "a", "b")]):
        cols = {"train": list(train), "val": list(val), "test": list(test)}
        pd.DataFrame({c: pd.Series(v) for c, v in cols.items()}).to_csv(
            tmp_path / f"splits_{k}.csv"
        )
        # what CLAM's create_splits_seq.py writes next to each fold
        pd.DataFrame({"train": [True], "val": [False], "test": [False]}, index=["a"]).to_csv(
            tmp_path / f"splits_{k}_bool.csv"
        )
        pd.DataFrame({"train": [2], "val": [1], "test": [1]}).to_csv(
            tmp_path / f"splits_{k}_descriptor.csv"
        )
    splits = read_clam_splits(tmp_path / "splits_1.csv")
    assert [(s.fold, s.train, s.val, s.test) for s in splits] == [
        (0, ["a", "b"], ["c"], ["d"]),
        (1, ["c", "d"], ["a"], ["b"]),
    ]


def test_na_spelled_patient_ids_are_unknown_not_one_patient(tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "slide_id,label,patient_id\ns1,0,NA\ns2,1,nan\ns3,0,\ns4,1,NULL\ns5,0,P7\ns6,1,P7\n"
    )
    df = read_labels(str(labels)).set_index("slide_id")
    assert df["patient_id"].to_dict() == {
        "s1": "s1", "s2": "s2", "s3": "s3", "s4": "s4", "s5": "P7", "s6": "P7",
    }  # fmt: skip


def test_numeric_label_map_keys_in_yaml_are_labels(tmp_path: Path) -> None:
    config = tmp_path / "fit.yaml"
    config.write_text("data:\n  label_map:\n    1: immune_high\n    2.0: immune_low\n    3: drop\n")
    cfg = load_config(FitConfig, [str(config)])
    assert cfg.data.label_map == {"1": "immune_high", "2.0": "immune_low", "3": "drop"}

    config.write_text("data:\n  label_map:\n    yes: immune_high\n")  # YAML 1.1: a boolean
    with pytest.raises(UserError, match="quote the key"):
        load_config(FitConfig, [str(config)])
