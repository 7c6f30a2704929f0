"""A synthetic H&E-like cohort with a known answer: planted lymphocyte clusters = immune_high.

Users have no slides on day one, so the demo makes its own: pyramidal TIFFs at 0.5 um/px with
blobby tissue, pink fibrous stroma, pale tumour nuclei, and in "immune_high" slides a few dense
clusters of small dark round lymphocytes (saved as ground-truth masks, to check heatmaps).
Both classes carry distractors (hyperchromatic giant-nucleus patches, melanin pigment and
scattered single lymphocytes), so "any dark purple" is not the answer.

Colour is made by Beer-Lambert mixing of stain optical densities via a per-slide lookup table
over (eosin, haematoxylin) levels, which keeps a 5k x 5k slide well under a second.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from melanoma_mil.demo.pyramid import write_pyramid
from melanoma_mil.errors import UserError
from melanoma_mil.io import atomic_path, write_json, write_text
from melanoma_mil.pools import worker_context

MPP = 0.5  # level-0 um/px of every synthetic slide
MASK_DOWNSAMPLE = 16  # ground-truth masks are 1/16 of level 0 (8 um/px)
LABELS = ("immune_low", "immune_high")
N_LEVELS = 4
_PAD = 48  # stamping margin (px) so nuclei never need clipping
# optical density per unit stain (R, G, B): eosin -> pink, haematoxylin -> blue-purple
_EOSIN = np.array([0.10, 0.50, 0.27], np.float32)
_HEMA = np.array([0.62, 0.90, 0.38], np.float32)
_MELANIN = np.array([0.55, 0.80, 1.05], np.float32)
_E_MAX, _H_MAX = 1.8, 2.4  # stain amounts at uint8 level 255


def _noise(
    rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]
) -> np.ndarray:
    """Smooth Gaussian noise with unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (field.std() + 1e-6)


def _blob(
    shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float, theta: float
) -> np.ndarray:
    """1 at the centre of a rotated ellipse, 0 on its border, negative outside."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    c, s = math.cos(theta), math.sin(theta)
    u, v = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
    return 1.0 - np.sqrt((u / rx) ** 2 + (v / ry) ** 2)


def _up(field: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float field to (h, w)."""
    return np.asarray(Image.fromarray(field.astype(np.float32), "F").resize(size[::-1], 2))


def _sprite(
    rng: np.random.Generator, radius: float, aspect: float, irregular: float, amount: float,
    rim: float,
) -> np.ndarray:  # fmt: skip
    """One nucleus as a uint8 haematoxylin patch: soft-edged, lobed, with chromatin texture."""
    r = int(math.ceil(radius * 1.4)) + 2
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float32)
    t = rng.uniform(0, math.pi)
    u, v = xx * math.cos(t) + yy * math.sin(t), -xx * math.sin(t) + yy * math.cos(t)
    ang = np.arctan2(v, u)
    a2, a3, p2, p3 = rng.uniform(-1, 1, 4) * [irregular, irregular, 3, 3]
    edge = radius * (1 + a2 * np.cos(2 * ang + p2) + a3 * np.cos(3 * ang + p3))
    d = np.sqrt(u**2 + (v / aspect) ** 2) / edge
    body = np.clip((1 - d) * radius / 1.3, 0, 1)
    profile = (1 - rim) + rim * np.clip(d, 0, 1) ** 2  # vesicular: darker rim, pale centre
    texture = 1 + 0.35 * (rng.random(d.shape) - 0.5)
    return np.clip(amount * body * profile * texture / _H_MAX * 255, 0, 255).astype(np.uint8)


def _stamp(canvas: np.ndarray, sprites: list[np.ndarray], ys: np.ndarray, xs: np.ndarray,
           rng: np.random.Generator) -> None:  # fmt: skip
    """Max-composite a random sprite at each (y, x) of level 0 into the padded canvas."""
    picks = rng.integers(0, len(sprites), len(ys)).tolist()
    for y, x, k in zip(ys.tolist(), xs.tolist(), picks, strict=True):
        s = sprites[k]
        y0, x0 = y + _PAD - s.shape[0] // 2, x + _PAD - s.shape[1] // 2
        region = canvas[y0 : y0 + s.shape[0], x0 : x0 + s.shape[1]]
        np.maximum(region, s, out=region)


def _sample(field: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear value of a 1/16-resolution field at level-0 points."""
    pts = np.stack([ys / MASK_DOWNSAMPLE, xs / MASK_DOWNSAMPLE])
    return ndimage.map_coordinates(field, pts, order=1, mode="nearest")


def _points(rng: np.random.Generator, size: int, spacing: float, jitter: float,
            where: np.ndarray, keep: float = 1.0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Jittered-grid points every ``spacing`` px where the 1/16 ``where`` field is > 0."""
    g = np.arange(spacing / 2, size, spacing)
    ys, xs = (a.ravel() for a in np.meshgrid(g, g, indexing="ij"))
    ys = ys + rng.uniform(-jitter, jitter, ys.shape)
    xs = xs + rng.uniform(-jitter, jitter, xs.shape)
    ok = (_sample(where, ys, xs) > 0) & (rng.random(ys.shape) < keep)
    ys, xs = np.clip(ys[ok], 0, size - 1), np.clip(xs[ok], 0, size - 1)
    return ys.astype(np.int64), xs.astype(np.int64)


def _regions(
    rng: np.random.Generator, tissue: np.ndarray, n: int, r_px: tuple[float, float]
) -> np.ndarray:
    """Field (>0 inside) of ``n`` irregular patches centred on tissue, radii in level-0 px."""
    low = tissue.shape
    field = np.full(low, -1.0, np.float32)
    cand = np.argwhere(tissue > 0.25)
    if not len(cand):
        return field
    wobble = 0.35 * _noise(rng, low, 3)
    for cy, cx in cand[rng.integers(0, len(cand), n)]:
        r = rng.uniform(*r_px) / MASK_DOWNSAMPLE
        ry, rx = r * rng.uniform(0.7, 1.0), r * rng.uniform(0.9, 1.3)
        field = np.maximum(field, _blob(low, cy, cx, ry, rx, rng.uniform(0, math.pi)) + wobble)
    return np.where(tissue > 0, field, -1.0)


def _lut(rng: np.random.Generator) -> np.ndarray:
    """Per-slide colour table [E * 256 + H] -> RGB uint8, with stain variation."""
    e_vec = _EOSIN * rng.uniform(0.7, 1.3) * (1 + rng.normal(0, 0.06, 3)).astype(np.float32)
    h_vec = _HEMA * rng.uniform(0.75, 1.25) * (1 + rng.normal(0, 0.06, 3)).astype(np.float32)
    levels = np.arange(256, dtype=np.float32) / 255
    od = (
        0.03  # glass
        + levels[:, None, None] * _E_MAX * e_vec
        + levels[None, :, None] * _H_MAX * h_vec
    )
    return np.clip(255 * np.exp(-od), 0, 255).astype(np.uint8).reshape(-1, 3)


def synth_slide(
    rng: np.random.Generator, size: int, immune_high: bool
) -> tuple[np.ndarray, np.ndarray]:
    """RGB [size, size, 3] slide at 0.5 um/px, and its planted-cluster mask at 1/16 (bool)."""
    low = (math.ceil(size / MASK_DOWNSAMPLE),) * 2
    tissue, nests = _tissue(rng, low)
    clusters = np.full(low, -1.0, np.float32)
    if immune_high:  # add clusters until ~5-15 % of the tissue is covered
        target = rng.uniform(0.06, 0.12) * (tissue > 0).sum()
        for _ in range(8):
            clusters = np.maximum(clusters, _regions(rng, tissue, 1, (150, 300)))
            if ((clusters > 0) & (tissue > 0)).sum() >= target:
                break
    dark = _regions(rng, tissue, int(rng.integers(1, 4)), (120, 250))
    pigment = _regions(rng, tissue, int(rng.integers(1, 4)), (60, 140))
    e8 = _eosin(rng, size, tissue, nests, clusters)
    h8 = _hematoxylin(rng, size, tissue, nests, clusters if immune_high else None, dark)
    lut, rgb = _lut(rng), np.empty((size, size, 3), np.uint8)
    for r in range(0, size, 256):  # in row blocks: temporaries stay small and cached
        idx = e8[r : r + 256].astype(np.uint16)
        idx <<= 8
        idx |= h8[r : r + 256]
        np.take(lut, idx, axis=0, out=rgb[r : r + 256])
    _add_pigment(rng, rgb, pigment)
    mask = (clusters > 0) & (tissue > 0)
    return rgb, mask


def _tissue(rng: np.random.Generator, low: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Tissue (> 0 inside): 2-3 overlapping ellipses with a wobbly border, a few tears, a margin
    of glass; and the tumour nests inside it (> 0), at mask resolution."""
    tissue = np.full(low, -1.0, np.float32)
    for _ in range(rng.integers(2, 4)):
        cy, cx = rng.uniform(0.4, 0.6, 2) * low[0]
        ry, rx = rng.uniform(0.3, 0.42, 2) * low[0]
        tissue = np.maximum(tissue, _blob(low, cy, cx, ry, rx, rng.uniform(0, math.pi)))
    tissue += 0.25 * _noise(rng, low, low[0] / 14) + 0.04 * _noise(rng, low, 1.5)
    tissue -= 2.0 * (_noise(rng, low, 2.0) > 2.8)
    border = np.minimum.outer(*(np.minimum(np.arange(n), n - 1 - np.arange(n)) for n in low))
    edge = border.astype(np.float32) / (0.1 * low[0]) + 0.2 * _noise(rng, low, low[0] / 20)
    tissue = np.minimum(tissue, edge - 0.5)  # a wobbly margin of glass around the tissue
    nests = np.where(tissue > 0, _noise(rng, low, low[0] / 18) - 0.3, -1.0)
    return tissue, nests


def _eosin(
    rng: np.random.Generator,
    size: int,
    tissue: np.ndarray,
    nests: np.ndarray,
    clusters: np.ndarray,
) -> np.ndarray:
    """Eosin (uint8, full size), drawn at 1/4 size: wavy collagen fibres (ridges of smooth
    noise), paler in nests and clusters, plus grain."""
    q = (size // 4, size // 4)
    fibres = np.exp(-((_noise(rng, q, 2.5) / 0.35) ** 2))
    fibres += 0.6 * np.exp(-((_noise(rng, q, 6.0) / 0.3) ** 2))
    eosin = 0.45 + 0.3 * fibres
    eosin -= 0.2 * np.clip(_up(nests, q) * 3, 0, 1)
    eosin -= 0.25 * np.clip(_up(clusters, q) * 4, 0, 1)
    eosin *= np.clip(_up(tissue, q) * 12, 0, 1)  # soft tissue border
    e8 = np.clip(eosin / _E_MAX * 255, 0, 240).astype(np.uint8)
    e8 = np.array(Image.fromarray(e8).resize((size, size), Image.BILINEAR))
    grain = np.tile(rng.integers(0, 14, (256, 256), dtype=np.uint8), (size // 256 + 1,) * 2)
    np.add(e8, grain[:size, :size], out=e8, where=e8 > 8)
    return e8


def _hematoxylin(
    rng: np.random.Generator,
    size: int,
    tissue: np.ndarray,
    nests: np.ndarray,
    clusters: np.ndarray | None,
    dark: np.ndarray,
) -> np.ndarray:
    """Hematoxylin (uint8, full size): nuclei stamped as sprites, tumour cells in nests,
    fibroblasts in stroma, stray lymphocytes, giant cells in dark regions, and lymphocyte
    clusters where ``clusters`` (immune-high slides only)."""
    hema = np.zeros((size + 2 * _PAD,) * 2, np.uint8)
    s = float(rng.uniform(0.85, 1.15))  # nuclear size varies from slide to slide
    tumour = [_sprite(rng, rng.uniform(8, 13) * s, rng.uniform(0.6, 0.95), 0.12,
                      rng.uniform(0.55, 0.9), 0.5) for _ in range(24)]  # fmt: skip
    fibro = [_sprite(rng, rng.uniform(7, 11), rng.uniform(0.22, 0.35), 0.05, 0.9, 0.0)
             for _ in range(12)]  # fmt: skip
    lymph = [_sprite(rng, rng.uniform(5.5, 7.5), rng.uniform(0.85, 1.0), 0.04,
                     rng.uniform(1.5, 1.9), 0.1) for _ in range(16)]  # fmt: skip
    giant = [_sprite(rng, rng.uniform(12, 19), rng.uniform(0.55, 0.9), 0.25,
                     rng.uniform(1.3, 1.7), 0.25) for _ in range(16)]  # fmt: skip
    _stamp(hema, tumour, *_points(rng, size, 26 * s, 7, nests), rng)
    stroma = np.where(nests > 0, -1.0, tissue)
    _stamp(hema, fibro, *_points(rng, size, 70, 30, stroma, keep=0.6), rng)
    _stamp(hema, lymph, *_points(rng, size, 150, 70, tissue, keep=0.5), rng)  # stray cells
    _stamp(hema, giant, *_points(rng, size, 34, 9, dark, keep=0.8), rng)
    if clusters is not None:
        _stamp(hema, lymph, *_points(rng, size, 15, 2.5, clusters, keep=0.9), rng)
    return hema[_PAD:-_PAD, _PAD:-_PAD]


def _add_pigment(rng: np.random.Generator, rgb: np.ndarray, field: np.ndarray) -> None:
    """Brown melanin granules (clumped) darkening the image inside the pigment patches."""
    ys, xs = _points(rng, rgb.shape[0], 8, 6, field, keep=0.6)
    factors = []  # per grain: transmitted fraction of light per pixel and channel
    for _ in range(8):
        grain = _sprite(rng, rng.uniform(2, 5), 0.8, 0.15, rng.uniform(1.0, 1.8), 0.0)
        amount = grain[..., None].astype(np.float32) * (_H_MAX / 255)
        factors.append(np.exp(-amount * _MELANIN))
    picks = rng.integers(0, len(factors), len(ys)).tolist()
    h, w = rgb.shape[:2]
    for y, x, k in zip(ys.tolist(), xs.tolist(), picks, strict=True):
        f = factors[k]
        y0, x0 = max(0, y - f.shape[0] // 2), max(0, x - f.shape[1] // 2)
        y1, x1 = min(h, y0 + f.shape[0]), min(w, x0 + f.shape[1])
        patch = rgb[y0:y1, x0:x1]
        patch[:] = patch * f[: y1 - y0, : x1 - x0]


def _write_slide(
    out_dir: str, slide_id: str, seed: int, index: int, size: int, immune_high: bool
) -> None:
    """Generate and save one slide and its mask (atomically); runs in a worker process."""
    rng = np.random.default_rng([seed, index])
    rgb, mask = synth_slide(rng, size, immune_high)
    out = Path(out_dir)
    with atomic_path(out / "masks" / f"{slide_id}.png") as tmp:
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
    with atomic_path(out / "slides" / f"{slide_id}.tiff") as tmp:
        write_pyramid(tmp, rgb, MPP, N_LEVELS)


def plan_cohort(n_slides: int, seed: int) -> pd.DataFrame:
    """Slide ids, patients and balanced labels; two patients have two slides (same label)."""
    rng = np.random.default_rng([seed, 10**6])
    n_pairs = min(2, n_slides // 6)
    n_single = n_slides - 2 * n_pairs
    pairs = [LABELS[i % 2] for i in range(n_pairs) for _ in range(2)]
    n_high = n_slides // 2 - pairs.count("immune_high")
    single = np.array(["immune_high"] * n_high + ["immune_low"] * (n_single - n_high))
    rng.shuffle(single)
    labels = pairs + single.tolist()
    patients = [f"patient_{i // 2:03d}" for i in range(2 * n_pairs)]
    patients += [f"patient_{n_pairs + i:03d}" for i in range(n_single)]
    ids = [f"slide_{i:03d}" for i in range(n_slides)]
    return pd.DataFrame({"slide_id": ids, "patient_id": patients, "label": labels})


def planted_survival(table: pd.DataFrame, seed: int) -> pd.DataFrame:
    """One row per patient: patient_id, time (months), event (1 = death from melanoma), age,
    sex. Immune-high patients live longer: Weibull times (shape 2) with scale 120 vs 24 months,
    a hazard ratio of (24 / 120)^2 = 0.04, strong on purpose so that a cohort of 20 patients
    shows it; follow-up ends uniformly between 4 and 10 years (censoring). Age and sex carry
    no signal (the adjusted Cox model's covariates)."""
    patients = table.groupby("patient_id", sort=True)["label"].first()
    rng = np.random.default_rng([seed, 2 * 10**6])
    n = len(patients)
    death = np.where(patients.to_numpy() == "immune_high", 120.0, 24.0) * rng.weibull(2.0, n)
    follow_up = rng.uniform(48.0, 120.0, n)
    return pd.DataFrame(
        {
            "patient_id": patients.index,
            "time": np.round(np.minimum(death, follow_up), 1),
            "event": (death <= follow_up).astype(int),
            "age": np.round(rng.normal(62, 12, n)).astype(int),
            "sex": rng.choice(["F", "M"], n),
        }
    )


def _write_clinical(out: Path, table: pd.DataFrame, seed: int) -> None:
    text = planted_survival(table, seed).to_csv(index=False)
    path = out / "clinical.csv"
    if not path.is_file() or path.read_text() != text:
        write_text(path, text)


def generate_cohort(
    out_dir: str | Path,
    n_slides: int = 24,
    seed: int = 0,
    size: int = 5632,
    workers: int = 2,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Write ``n_slides`` synthetic slides under ``out_dir`` and return the cohort table.

    Layout: ``slides/<id>.tiff`` (0.5 um/px, 4 levels), ``masks/<id>.png`` (planted clusters,
    1/16 of level 0, 255 = cluster; all zero for immune_low), ``labels.csv`` (slide_id,
    patient_id, label), ``cohort.csv`` (+ path, mask_path, mask_downsample) and
    ``clinical.csv`` (planted survival, see `planted_survival`). An existing cohort made with
    the same settings is reused; other settings need ``overwrite=True``.
    """
    if n_slides < 2:
        raise UserError(f"the demo cohort needs n_slides >= 2 (got {n_slides}).")
    if size < 1024:
        raise UserError(f"synthetic slide size {size} px is too small; use >= 1024.")
    out = Path(out_dir)
    settings = {"n_slides": n_slides, "seed": seed, "size": size, "mpp": MPP, "version": 1}
    table = plan_cohort(n_slides, seed)
    table["path"] = [str(out / "slides" / f"{s}.tiff") for s in table["slide_id"]]
    table["mask_path"] = [str(out / "masks" / f"{s}.png") for s in table["slide_id"]]
    table["mask_downsample"] = MASK_DOWNSAMPLE

    meta = out / "synth.json"
    if meta.is_file() and not overwrite:
        if _read_settings(meta) != settings:
            raise UserError(
                f"{out} holds a synthetic cohort made with other settings ({meta}); "
                "use another output folder or overwrite=true."
            )
        if all(Path(p).is_file() for p in [*table["path"], *table["mask_path"]]):
            _write_clinical(out, table, seed)  # cohorts made before clinical.csv existed
            return table
    jobs = [
        (str(out), sid, seed, i, size, label == "immune_high")
        for i, (sid, label) in enumerate(zip(table["slide_id"], table["label"], strict=True))
        if overwrite
        or not (Path(table["path"][i]).is_file() and Path(table["mask_path"][i]).is_file())
    ]
    write_json(meta, settings)
    n_workers = max(1, min(workers, len(jobs)))
    if n_workers == 1:
        for job in jobs:
            _write_slide(*job)
    else:
        # the demo tiles next: its tile workers then fork from the same server
        ctx = worker_context(__name__, "melanoma_mil.console", "melanoma_mil.tiling.job")
        with ProcessPoolExecutor(n_workers, mp_context=ctx) as pool:
            list(pool.map(_write_slide, *zip(*jobs, strict=True)))
    write_text(out / "labels.csv", table[["slide_id", "patient_id", "label"]].to_csv(index=False))
    write_text(out / "cohort.csv", table.to_csv(index=False))
    _write_clinical(out, table, seed)
    return table


def _read_settings(meta: Path) -> object:
    """synth.json's settings; None when unreadable (then they differ from any settings)."""
    try:
        return json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
