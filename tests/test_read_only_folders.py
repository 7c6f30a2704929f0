"""A folder a command writes into that exists but cannot be written (a read-only mount, another
user's folder) is refused before any work, in one line naming it: each slide used to fail on it
one by one, each after its tiling or encoding. Real read-only bind mounts (root only)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import Pipeline, inference_cfg, make_cohort, read_only_bind
from test_config import one_line_error
from test_extract_cache import _cfg
from test_tile_disk import _slides

from melanoma_mil.config import PredictConfig
from melanoma_mil.errors import UserError
from melanoma_mil.features.run import run_extract
from melanoma_mil.inference.predict import run_predict


def _refused(folder: Path, command: str) -> str:
    return f"`{command}`'s folder '{folder}' cannot be written (Read-only file system"


@pytest.mark.parametrize("name", ["coords", "qc", ".qc_cells"])
def test_tile_refuses_a_read_only_folder_it_writes_before_tiling(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    slides = _slides(tmp_path, 2)
    out = tmp_path / "tiles"
    with read_only_bind(out / name):
        keys = (f"slides_dir={slides}", f"output_dir={out}", "workers=1", "tiling.mpp=1.0",
                "tiling.tile_size=64")  # fmt: skip
        err = one_line_error(capsys, "tile", *keys)
        assert _refused(out / name, "tile") in err and "fix its permissions" in err
    assert not list(out.rglob("*.h5")) and not list(out.rglob("*.png"))


def test_extract_refuses_a_read_only_cache_folder_before_encoding(tmp_path: Path) -> None:
    tiles = make_cohort(tmp_path, 2)
    out = tmp_path / "features"
    assert run_extract(_cfg(tiles, out)) == 0
    (bag,) = out.glob("*/slide1.h5")
    bag.unlink()  # one slide left to encode
    with read_only_bind(bag.parent), pytest.raises(UserError, match="cannot be written") as e:
        run_extract(_cfg(tiles, out))
    assert _refused(bag.parent, "extract") in str(e.value)
    assert not bag.exists()


def test_predict_refuses_a_read_only_folder_of_a_slide_it_draws_only(
    pipe: Pipeline, tmp_path: Path
) -> None:
    out = tmp_path / "pred"
    given = (f"slides_dir={pipe.slides}", f"features_dir={pipe.features}")
    with read_only_bind(out / "slide_001"):
        assert run_predict(inference_cfg(PredictConfig, pipe, out, *given,
                                         "slide_ids=[slide_000]")) == 0  # fmt: skip
        both = inference_cfg(
            PredictConfig, pipe, out, *given, "slide_ids=[slide_000,slide_001]", "overwrite=true"
        )
        with pytest.raises(UserError, match="cannot be written") as e:
            run_predict(both)
        assert _refused(out / "slide_001", "predict") in str(e.value)
    assert pd.read_csv(out / "predictions.csv")["slide_id"].tolist() == ["slide_000"]


def test_predict_refuses_a_read_only_folder_in_work_before_tiling(
    pipe: Pipeline, tmp_path: Path
) -> None:
    out = tmp_path / "pred"
    given = (f"slides_dir={pipe.slides}", "heatmaps=false")
    assert (
        run_predict(inference_cfg(PredictConfig, pipe, out, *given, "slide_ids=[slide_000]")) == 0
    )
    (work,) = (out / "_work").iterdir()
    (cache,) = (p for p in (work / "features").iterdir() if p.is_dir())
    for folder in (work / "tiles" / "qc", work / "tiles" / "coords", cache):
        cfg = inference_cfg(
            PredictConfig, pipe, out, *given, "slide_ids=[slide_001]", "overwrite=true"
        )
        with read_only_bind(folder), pytest.raises(UserError, match="cannot be written") as e:
            run_predict(cfg)
        assert _refused(folder, "predict") in str(e.value)
        assert not list(work.rglob("slide_001*"))  # neither tiled nor encoded
