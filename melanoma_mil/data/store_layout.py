"""What a bag store would hold, from the feature files' metadata alone: each file's identity
(`Source`, whose key never matches a changed file) and the shapes and dtypes (`scan`), checked
for one feature dim before anything is read or written. See `data.store`."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from melanoma_mil.data.bags import features_entry
from melanoma_mil.errors import UserError
from melanoma_mil.io import read_h5
from melanoma_mil.progress import progress


@dataclass(frozen=True)
class Source:
    """One feature file as the store records it: a changed file never matches again. The
    ctime is in the key because a copy or an edit can set the mtime back (``cp -p``,
    ``touch -r``), while the kernel sets the ctime on every change and nothing sets it back."""

    slide_id: str
    path: str
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, slide_id: str, path: Path) -> Source:
        st = path.stat()
        return cls(slide_id, str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def key(self) -> tuple[str, int, int, int]:
        return (self.path, self.size, self.mtime_ns, self.ctime_ns)


@dataclass(frozen=True)
class Layout:
    """Shapes without data: rows per slide, the feature dim, each file's own dtype."""

    rows: dict[str, int]  # slide path -> tiles
    dim: int
    dtypes: dict[str, str]  # slide path -> numpy dtype name of the file's features

    def nbytes(self, dtype: str) -> int:
        """The size of features.npy's data for a store of ``dtype``."""
        return sum(self.rows.values()) * self.dim * np.dtype(dtype).itemsize

    def store_dtype(self, wanted: str) -> str:
        """auto: float16 only when every file is float16 (then the store is lossless)."""
        if wanted != "auto":
            return wanted
        return "float16" if set(self.dtypes.values()) == {"float16"} else "float32"


def _file_shape(path: Path) -> tuple[tuple[int, ...], str]:
    """(shape, dtype name) of a bag file's features without reading them."""
    try:
        if path.suffix == ".pt":
            try:  # zip-format files open lazily; legacy ones are read whole
                t = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                t = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(t, torch.Tensor | np.ndarray) and t.ndim > 0:
                return tuple(t.shape), str(t.dtype).removeprefix("torch.")
            what = type(t).__name__
        else:
            with read_h5(path) as f:
                ds = features_entry(f, path)
                if isinstance(ds, h5py.Dataset) and ds.shape and ds.dtype.kind in "biuf":
                    return tuple(ds.shape), ds.dtype.name
                what = f"{type(ds).__name__} of {getattr(ds, 'dtype', 'no dtype')}"
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise UserError(f"{path}: cannot read bag ({e}); re-run `extract` for it.") from None
    raise UserError(
        f"{path}: 'features' is a {what}, not a numeric array; re-run `extract` for this slide."
    )


def feature_dim(path: Path) -> int:
    """A bag file's feature dim, from its metadata."""
    return int(_file_shape(path)[0][-1])


def scan(sources: list[Source]) -> Layout:
    """Shapes and dtypes of every file (metadata only), checking one feature dim."""
    rows, dtypes = {}, {}
    dim: tuple[str, int] | None = None
    for s in progress(sources, desc="scanning bags", unit="bag", leave=False):
        shape, dtype = _file_shape(Path(s.path))
        if len(shape) == 3 and shape[0] == 1:
            shape = shape[1:]
        if len(shape) != 2:
            raise UserError(f"{s.path}: features have shape {shape}, expected [N, D].")
        if shape[0] == 0:
            raise UserError(f"{s.path}: empty bag (0 tiles); drop the slide or re-tile it.")
        dim = dim or (s.slide_id, shape[1])
        if shape[1] != dim[1]:
            raise UserError(
                f"{s.path}: feature dim {shape[1]} but slide {dim[0]} has {dim[1]}; "
                "bags from different encoders cannot be mixed."
            )
        rows[s.path], dtypes[s.path] = shape[0], dtype
    assert dim is not None
    return Layout(rows, dim[1], dtypes)
