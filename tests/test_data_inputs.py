"""Inputs written by other tools and people: CLAM split folders, NA-spelled patient ids,
numeric label_map keys in YAML, labels CSVs whose slide ids miss their feature files."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from melanoma_mil.config import DataConfig, FitConfig, load_config
from melanoma_mil.data.cohort import find_features, map_labels, read_labels
from melanoma_mil.data.splits import Split, check_covers, read_clam_splits
from melanoma_mil.data.synthetic import make_bag_cohort
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


def test_a_clam_splits_file_written_by_r_has_no_bag_named_na(tmp_path: Path) -> None:
    """R's write.csv spells the empty cells of a short column NA: no bag, as pandas' blank."""
    (tmp_path / "splits_0.csv").write_text(
        '"","train","val","test"\n"1","a","c","d"\n"2","b",NA,"e"\n"3","f",NA,NA\n'
    )
    (split,) = read_clam_splits(tmp_path)
    assert (split.train, split.val, split.test) == (["a", "b", "f"], ["c"], ["d", "e"])


def test_test_folds_that_do_not_partition_the_cohort_are_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """CLAM's Monte Carlo splits may test a bag twice, or never: the pooled results differ."""
    bags = pd.DataFrame({"bag_id": list("abcd")})
    monte_carlo = [Split(0, 0, ["a", "b"], [], ["c"]), Split(0, 1, ["a", "d"], [], ["c"])]
    check_covers(monte_carlo, bags, "splits_x")
    assert "tested in no fold (['a', 'b', 'd']), 1 in more than one (['c'])" in caplog.text
    caplog.clear()
    check_covers([Split(0, 0, ["a", "b"], [], ["c", "d"]), Split(0, 1, ["c", "d"], [], ["a", "b"])],
                 bags, "splits_y")  # fmt: skip
    assert "partition" not in caplog.text


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

    # the same map as `wandb agent` passes it (${args_no_hyphens}), or typed on a command line
    cfg = load_config(FitConfig, [], ["data.label_map={1: immune_high, 2.0: immune_low, 3: drop}"])
    assert cfg.data.label_map == {"1": "immune_high", "2.0": "immune_low", "3": "drop"}

    config.write_text("data:\n  label_map:\n    yes: immune_high\n")  # YAML 1.1: a boolean
    with pytest.raises(UserError, match="quote the key"):
        load_config(FitConfig, [str(config)])


def _labelled(ids: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"slide_id": ids, "label": [0, 1] * (len(ids) // 2)})


def test_labelled_ids_near_unlabelled_feature_files_are_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A typo, a slide-file extension or another case in the labels CSV names the feature file
    meant; ids with no near file still get the extract advice, and skip warns with the hint."""
    features, _ = make_bag_cohort(tmp_path, n_patients=8, dim=4)
    ids = ["P0000", "P01", "P0002.SVS", "p0003", "P0004", "P0005", "P0006", "Q9"]
    with pytest.raises(UserError) as e:
        find_features(_labelled(ids), DataConfig(features_dir=str(features)))
    msg = str(e.value)
    assert "Labels say 'P01': did you mean 'P0001'?" in msg
    assert "Labels say 'P0002.SVS': did you mean 'P0002'?" in msg
    assert "Labels say 'p0003': did you mean 'P0003'?" in msg  # three examples at most
    assert "Q9" in msg and "run `extract` for them or pass data.on_missing=skip" in msg

    skip = DataConfig(features_dir=str(features), on_missing="skip")
    with caplog.at_level(logging.WARNING):
        kept = find_features(_labelled(["P0000", "P01"]), skip)
    assert kept["slide_id"].tolist() == ["P0000"] and "did you mean 'P0001'?" in caplog.text


def test_no_hint_when_no_feature_file_is_near(tmp_path: Path) -> None:
    features, _ = make_bag_cohort(tmp_path, n_patients=4, dim=4)
    with pytest.raises(UserError, match=r"\['A1', 'B2'\]\. Run `extract` for them or pass"):
        find_features(_labelled(["A1", "B2"]), DataConfig(features_dir=str(features)))
    empty = tmp_path / "empty"
    empty.mkdir()
    skip = DataConfig(features_dir=str(empty), on_missing="skip")  # skip, but nothing is left
    with pytest.raises(UserError, match=r"in '.*empty'.*Run `extract` for them\.$"):
        find_features(_labelled(["A1", "B2"]), skip)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("slide_id,label,label\ns1,0,1\ns2,1,0\n", "more than once"),  # pandas: 'label.1'
        ("slide_id,label,Label \ns1,0,1\ns2,1,0\n", None),  # different names: fine
        ("slide_id,note,label,note\ns1,a,0,b\ns2,c,1,d\n", None),  # an unread name twice: fine
        ("slide_id,patient_id,label,patient_id\ns1,P1,0,P2\ns2,P2,1,P1\n", "more than once"),
        ("slide_id,label\ns1,0,x\ns2,1,y\n", "more cells than its header"),  # an unnamed column
    ],
)
def test_labels_csv_columns_are_named_once(tmp_path: Path, text: str, problem: str | None) -> None:
    """A second 'label' column or unnamed extra cells were read silently: pandas renamed the
    duplicate (the first one won) or made slide_id the index (every value one column over)."""
    labels = tmp_path / "labels.csv"
    labels.write_text(text)
    if problem is None:
        assert read_labels(str(labels))["raw_label"].tolist() == ["0", "1"]
        return
    with pytest.raises(UserError, match=f"{labels}.*{problem}"):
        read_labels(str(labels))


def test_labels_csv_trailing_commas_and_spaced_header(tmp_path: Path) -> None:
    """Rows ending in a comma (spreadsheet exports) and ' label ' in the header read as meant;
    the rows' trailing commas crashed with a TypeError (the slide ids became the index)."""
    labels = tmp_path / "labels.csv"
    labels.write_text("\ufeffslide_id, label ,patient_id\ns1,0,P1,\ns2,1,P2,\n", encoding="utf-8")
    df = read_labels(str(labels))
    assert df.to_dict("list") == {
        "slide_id": ["s1", "s2"], "patient_id": ["P1", "P2"], "raw_label": ["0", "1"],
    }  # fmt: skip


def test_labels_spelled_in_two_cases_are_refused_unless_named(tmp_path: Path) -> None:
    """'Pos' and 'pos' were silently two classes: a binary cohort trained as 3-class."""
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\ns1,pos\ns2,Pos\ns3,neg\ns4,neg\n")
    df = read_labels(str(labels))
    with pytest.raises(UserError, match=r"labels \['Pos', 'pos'\] differ only in case") as e:
        map_labels(df, DataConfig(), str(labels))
    assert str(labels) in str(e.value) and "data.label_map" in str(e.value)
    _, classes = map_labels(df, DataConfig(classes=["neg", "Pos", "pos"]), str(labels))
    assert classes == ["neg", "Pos", "pos"]  # named both: the user's choice
    mapped = DataConfig(label_map={"pos": "pos", "Pos": "pos", "neg": "neg"})
    assert map_labels(df, mapped, str(labels))[1] == ["neg", "pos"]


def test_numeric_label_map_classes_are_compared_as_numbers(tmp_path: Path) -> None:
    """{a: 1.0, c: 1} made classes '1' and '1.0': a binary cohort trained as 3-class."""
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\ns1,a\ns2,b\ns3,c\ns4,b\n")
    df = read_labels(str(labels))
    cfg = DataConfig(label_map={"a": "1.0", "b": "0", "c": "1"})
    kept, classes = map_labels(df, cfg, str(labels))
    assert classes == ["0", "1"] and kept["label"].tolist() == [1, 0, 1, 0]
    cfg = DataConfig(label_map={"a": "1", "b": "0", "c": "+1"}, classes=["0.0", "1.0"])
    assert map_labels(df, cfg, str(labels))[1] == ["0", "1"]


def test_yes_no_classes_read_by_yaml_as_booleans_are_told_to_be_quoted(tmp_path: Path) -> None:
    """data.classes=[no,yes] reaches fit as ['False', 'True'] (YAML 1.1): say to quote them."""
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\ns1,yes\ns2,no\ns3,yes\ns4,no\n")
    df = read_labels(str(labels))
    cfg = load_config(FitConfig, [], ["data.classes=[no,yes]"]).data
    assert list(cfg.classes) == ["False", "True"]
    with pytest.raises(UserError, match=r"quote them, e\.g\. \"data\.classes=\['no','yes'\]\""):
        map_labels(df, cfg, str(labels))
    quoted = load_config(FitConfig, [], ["data.classes=['no','yes']"]).data
    assert map_labels(df, quoted, str(labels))[1] == ["no", "yes"]
