"""The slide-reader interface, and the readers for what OpenSlide does not read.

Every stage reads slides through OpenSlide's interface (``dimensions``, ``level_count``,
``level_dimensions``, ``level_downsamples``, ``properties``, ``read_region`` -> RGBA image,
``get_best_level_for_downsample``, ``close``) plus ``backend``, the reader's name for run tables.
OpenSlide itself serves every format it reads; two more sit behind the same interface:

- OME-TIFF (tifffile): OpenSlide sees only the first page of an OME pyramid (SubIFDs) and no
  resolution; here every pyramid level is read tile by tile, and the mpp comes from the OME XML.
- Zeiss CZI (pylibCZIrw, Zeiss's own maintained reader): OpenSlide 4.0 reads brightfield CZIs
  from Zeiss scanners but refuses files with Z/T dimensions or without attachments (e.g. any
  file libCZI writes); pylibCZIrw reads those, its sub-resolution layers give the pyramid.
"""

from __future__ import annotations

import os
import threading
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import tifffile
from PIL import Image

from melanoma_mil.errors import UserError
from melanoma_mil.tiling.tiffpages import TiffTiles, is_rgb8

MPP_X, MPP_Y = openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y
VENDOR, POWER = openslide.PROPERTY_NAME_VENDOR, openslide.PROPERTY_NAME_OBJECTIVE_POWER
DICOM_SERIES = "dicom.SeriesInstanceUID"
# microns per OME length unit (micro sign as the schema spells it, or the Greek mu)
_OME_UNITS = {"µm": 1.0, "μm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


class OpenSlideReader(openslide.OpenSlide):
    """OpenSlide, named for run tables."""

    backend = "openslide"


class _Pyramid:
    """OpenSlide's level arithmetic over (width, height) levels, shared by the readers below."""

    backend = ""
    dims: list[tuple[int, int]]
    props: dict[str, str]

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.dims[0]

    @property
    def level_count(self) -> int:
        return len(self.dims)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(self.dims)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        w0, h0 = self.dims[0]
        return tuple((w0 / w + h0 / h) / 2 for w, h in self.dims)

    @property
    def properties(self) -> Mapping[str, str]:
        return self.props

    def get_best_level_for_downsample(self, downsample: float) -> int:
        fits = [i for i, d in enumerate(self.level_downsamples) if d <= downsample + 1e-9]
        return max(fits, key=lambda i: self.level_downsamples[i]) if fits else 0

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> Image.Image:
        """RGBA region of ``size`` at ``level``, top-left at level-0 ``location`` (opaque)."""
        x, y = location
        ds = self.level_downsamples[level]
        rgb = self._region(level, x / ds, y / ds, size[0], size[1])
        alpha = np.full(rgb.shape[:2] + (1,), 255, np.uint8)
        return Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA")

    def _region(self, level: int, x: float, y: float, w: int, h: int) -> np.ndarray:
        raise NotImplementedError

    def __enter__(self) -> _Pyramid:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


def _ome_mpp(xml: str | None) -> dict[str, str]:
    if not xml:
        return {}
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return {}
    pixels = next((e for e in root.iter() if e.tag.endswith("Pixels")), None)
    if pixels is None or pixels.get("PhysicalSizeX") is None:
        return {}
    unit = _OME_UNITS.get(pixels.get("PhysicalSizeXUnit", "µm"))
    x = _ome_number(pixels.get("PhysicalSizeX"))
    y = _ome_number(pixels.get("PhysicalSizeY")) or x
    if unit is None or x is None or y is None:  # no usable mpp: mpp_csv or default_mpp may give it
        return {}
    return {MPP_X: repr(x * unit), MPP_Y: repr(y * unit)}


def _ome_number(text: str | None) -> float | None:
    """A PhysicalSize as written, comma decimals too (exporters in some locales), or None: a
    slide whose size cannot be read is a slide without mpp, not one that cannot be opened."""
    try:
        return float((text or "").strip().replace(",", "."))
    except ValueError:
        return None


def _data_end(page: tifffile.TiffPage) -> int:
    """The byte just past a page's last stored tile."""
    ends = [int(o) + int(c) for o, c in zip(page.dataoffsets, page.databytecounts, strict=True)]
    return max(ends, default=0)


class OmeTiffReader(_Pyramid):
    """An OME-TIFF pyramid (SubIFDs or pages), read tile by tile with `TiffTiles`."""

    backend = "tifffile"

    def __init__(self, path: Path) -> None:
        with tifffile.TiffFile(path) as tif:
            levels = tif.series[0].levels
            pages = [lv.keyframe for lv in levels]
            bad = [i for i, p in enumerate(pages) if not (p.is_tiled and is_rgb8(p))]
            if bad:
                raise UserError(
                    f"slide '{path}': OME-TIFF level {bad[0]} is not a tiled 8-bit RGB image "
                    "(e.g. separate channel planes); re-export it as tiled RGB (bfconvert/QuPath)."
                )
            size, end = path.stat().st_size, max(_data_end(p) for p in pages)
            if end > size:  # a cut-off copy: its XML (mpp) and last tiles are missing
                raise UserError(
                    f"slide '{path}' is truncated (its tiles end at byte {end}, the file has "
                    f"{size}); copy or re-export it again."
                )
            self.levels = [TiffTiles(path, p) for p in pages]
            self.dims = [(int(p.imagewidth), int(p.imagelength)) for p in pages]
            self.props = {VENDOR: "ome-tiff", **_ome_mpp(tif.ome_metadata)}

    def _region(self, level: int, x: float, y: float, w: int, h: int) -> np.ndarray:
        return self.levels[level].region(round(x), round(y), w, h)

    def close(self) -> None:
        for lv in self.levels:
            lv.close()


class CziReader(_Pyramid):
    """A Zeiss CZI through pylibCZIrw; levels every 4x (its pyramid layers serve the zoom)."""

    backend = "pylibczirw"

    def __init__(self, path: Path) -> None:
        try:
            from pylibCZIrw import czi
        except ImportError:
            raise UserError(
                f"slide '{path}' is a CZI that OpenSlide cannot read; "
                "pip install pylibCZIrw (or melanoma-mil[formats]) to read it."
            ) from None
        self._czi = czi.CziReader(os.fspath(path))
        try:
            self._lock = threading.Lock()  # one reader object, reads one at a time
            box = self._czi.total_bounding_rectangle
            self.origin = (box.x, box.y)
            self.dims = [(box.w, box.h)]
            while min(self.dims[-1]) // 4 >= 256:
                w, h = self.dims[-1]
                self.dims.append((w // 4, h // 4))
            types = set(self._czi.pixel_types.values())
            if types - {"Bgr24"}:
                raise UserError(
                    f"slide '{path}': CZI pixel type(s) {sorted(types)}; only 8-bit colour "
                    "(Bgr24) brightfield slides are read."
                )
            self.props = {VENDOR: "zeiss-czi", **self._czi_props()}
        except BaseException:  # refused or unreadable: the caller gets no reader to close
            self._czi.close()
            raise

    def _czi_props(self) -> dict[str, str]:
        meta: Any = self._czi.metadata.get("ImageDocument", {}).get("Metadata", {})
        props = {}
        for item in (meta.get("Scaling", {}).get("Items", {}) or {}).get("Distance", []) or []:
            if item.get("@Id") in ("X", "Y") and item.get("Value"):
                props[MPP_X if item["@Id"] == "X" else MPP_Y] = repr(float(item["Value"]) * 1e6)
        objectives = (
            meta.get("Information", {}).get("Instrument", {}).get("Objectives", {}) or {}
        ).get("Objective")
        first = objectives[0] if isinstance(objectives, list) else objectives
        if isinstance(first, dict) and first.get("NominalMagnification"):
            props[POWER] = str(first["NominalMagnification"])
        return props

    def _region(self, level: int, x: float, y: float, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        roi = (
            self.origin[0] + round(x * ds),
            self.origin[1] + round(y * ds),
            max(1, round(w * ds)),
            max(1, round(h * ds)),
        )
        with self._lock:
            bgr = self._czi.read(
                roi=roi, plane={"C": 0}, zoom=1 / ds, background_pixel=(255, 255, 255)
            )
        rgb = np.ascontiguousarray(bgr[..., ::-1])  # libCZI's 24-bit colour is BGR
        if rgb.shape[:2] != (h, w):
            rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
        return rgb

    def close(self) -> None:
        self._czi.close()


def is_ome_tiff(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith((".ome.tif", ".ome.tiff")):
        return True
    if not name.endswith((".tif", ".tiff", ".btf")):
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.is_ome)  # even one level: OpenSlide would see no mpp in its XML
    except (tifffile.TiffFileError, OSError, ValueError):
        return False


def dicom_files(folder: Path) -> list[Path]:
    """The .dcm files of a DICOM WSI folder, in the order `open_reader` tries them."""
    return sorted(f for f in folder.iterdir() if f.suffix.lower() == ".dcm")


def dicom_series(files: list[Path]) -> dict[str, list[Path]]:
    """SeriesInstanceUID -> its files among ``files`` (.dcm files), as OpenSlide reads them
    (about half a millisecond a file); a file it cannot open as a slide is left out."""
    series: dict[str, list[Path]] = {}
    for f in files:
        try:
            with openslide.OpenSlide(str(f)) as slide:
                uid = slide.properties.get(DICOM_SERIES, "")
        except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError, OSError):
            continue
        series.setdefault(uid, []).append(f)
    return series


def _dicom_folder(path: Path) -> OpenSlideReader:
    """The one DICOM WSI series in folder ``path`` (the slide), or a UserError: OpenSlide
    opens the series of the file it is given, so a folder of two series would be one of them
    tiled, silently, under the folder's name."""
    dcm = dicom_files(path)
    if not dcm:
        raise openslide.OpenSlideUnsupportedFormatError(f"no .dcm files in folder {path}")
    series = dicom_series(dcm) if len(dcm) > 1 else {}
    if len(series) > 1:
        raise UserError(
            f"slide folder '{path}' holds {len(series)} DICOM series (SeriesInstanceUID "
            f"{', '.join(sorted(series))}); move each series into a folder of its own (the "
            "folder's name is the slide id), or list each series' .dcm file in a manifest."
        )
    return OpenSlideReader(str(dcm[0]))


def open_reader(path: Path) -> OpenSlideReader | OmeTiffReader | CziReader:
    """The reader for ``path`` (a file, or a DICOM WSI folder); raises OpenSlide's errors."""
    if path.is_dir():  # DICOM WSI: OpenSlide opens the series from any of its files
        return _dicom_folder(path)
    if is_ome_tiff(path):
        return OmeTiffReader(path)
    try:
        return OpenSlideReader(str(path))
    except (openslide.OpenSlideUnsupportedFormatError, openslide.OpenSlideError):
        if path.suffix.lower() != ".czi":
            raise
    return CziReader(path)
