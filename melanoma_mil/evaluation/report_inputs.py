"""Which run and which heatmaps a report shows: the run that made the predictions (another
run's classes, label_map or attention would caption these probabilities wrongly), and the
highest and lowest scored slides' heatmaps, shrunk for the report."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pandas as pd

from melanoma_mil.config import EvaluateConfig
from melanoma_mil.errors import UserError
from melanoma_mil.evaluation.report import Heatmap
from melanoma_mil.evaluation.tables import Scored
from melanoma_mil.ids import id_path
from melanoma_mil.outdir import made_by, read_marker
from melanoma_mil.rundir import TrainedRun, load_run

log = logging.getLogger(__name__)
HEATMAP_COMMANDS = ("heatmap", "predict")  # their folders hold <slide_id>/heatmap.png


def find_run(cfg: EvaluateConfig) -> TrainedRun | None:
    """run_dir, else the predictions' own folder when it is a finished `fit` run."""
    folder = Path(str(cfg.predictions)).parent
    if cfg.run_dir:
        run = load_run(cfg.run_dir)
        marker = read_marker(folder) or {}
        made = marker.get("command") in ("fit", "predict") and marker.get("run_id")
        if made and made != run.run_id:  # its classes, label_map and CV would be another's
            maker = marker.get("run_dir") or folder
            raise UserError(
                f"predictions '{cfg.predictions}' were made by run '{maker}'"
                f"{_again(maker, run)}, not by run_dir '{run.run_dir}'; pass the run that made "
                "them as run_dir."
            )
        return run
    if (folder / "cv_summary.json").is_file() and (folder / "config.yaml").is_file():
        try:
            return load_run(folder)
        except UserError as e:
            log.warning("evaluate: not reading run metadata: %s", e)
    return None


def _again(maker: object, run: TrainedRun) -> str:
    """' before it was fit again' when ``maker``, the run folder another output names, is
    ``run``'s own folder: the same path, other models."""
    same = maker is not None and Path(str(maker)).resolve() == run.run_dir.resolve()
    return " before it was fit again" if same else ""


def check_heatmaps(cfg: EvaluateConfig, run: TrainedRun | None) -> None:
    """Refuse, before any work, heatmaps_dir when its marker says another run made it: the
    report would caption that run's attention with these predictions' probabilities."""
    if not cfg.heatmaps_dir:
        return
    folder = Path(cfg.heatmaps_dir)
    if not folder.is_dir():
        raise UserError(
            f"heatmaps_dir '{folder}' is not a folder; pass the output_dir of `heatmap` or "
            "`predict`, or leave heatmaps_dir unset."
        )
    marker = read_marker(folder) or {}
    if run is None or marker.get("command") not in HEATMAP_COMMANDS:
        return
    if marker.get("run_id") == run.run_id:
        return
    made = made_by(marker) + _again(marker.get("run_dir"), run)
    raise UserError(
        f"heatmaps_dir '{folder}' holds heatmaps made by {made}, not by run {run.run_dir} "
        f"that made the predictions; pass that run's heatmaps, or make them with `python -m "
        f"melanoma_mil heatmap run_dir={run.run_dir} slides_dir=... output_dir=NEW_DIR`."
    )


def _heatmap_path(cfg: EvaluateConfig, row: pd.Series) -> Path | None:
    """The slide's heatmap: in heatmaps_dir, else the predictions' heatmap column (a relative
    path there is tried from the cwd, then from the predictions' folder)."""
    if cfg.heatmaps_dir:
        try:
            return id_path(cfg.heatmaps_dir, str(row["slide_id"])) / "heatmap.png"
        except UserError:  # a patient bag's "a;b" id names no heatmap
            return None
    value = row.get("heatmap")
    if not isinstance(value, str) or not value:
        return None
    path = Path(value)
    folder = Path(str(cfg.predictions)).parent
    # as written, beside the predictions, or where predict drew it (<folder>/<slide>/heatmap.png:
    # the folder moved, or predict ran from another cwd with a relative output_dir)
    for candidate in (path, folder / path, folder / path.parent.name / path.name):
        if candidate.exists():
            return candidate
    return path


def _thumbnail(path: Path) -> bytes:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((720, 720))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def pick_heatmaps(scored: Scored, cfg: EvaluateConfig, warnings: list[str]) -> list[Heatmap]:
    """The highest and lowest scored slides' heatmaps, shrunk to JPEGs for the report; an
    unreadable image is left out with a warning rather than losing the whole evaluation."""
    from PIL import Image

    if cfg.top_heatmaps == 0 or scored.slides is None:
        return []
    pos = scored.classes[-1]
    found = []
    for _, row in scored.slides.iterrows():
        path = _heatmap_path(cfg, row)
        if path is not None and path.is_file():
            found.append((float(row[f"prob_{pos}"]), str(row["slide_id"]), path))
    found.sort(reverse=True)
    high = (cfg.top_heatmaps + 1) // 2
    picks = found[:high] + found[high:][::-1][: cfg.top_heatmaps - high]
    out = []
    for prob, sid, path in picks:
        try:
            image = _thumbnail(path)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            warnings.append(f"heatmap '{path}' of {sid} is unreadable ({e}); left out")
            continue
        out.append(Heatmap(sid, prob, image, f"{sid}: prob_{pos} {prob:.3f}"))
    return out
