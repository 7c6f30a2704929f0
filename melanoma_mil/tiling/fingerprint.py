"""A cheap, stable identity of a slide's file(s), so coords are never paired with another slide.

`tile` records it in each coords file; `extract` (and `predict`/`heatmap`, which tile and extract
internally) refuse a slide whose fingerprint differs: a file of the same name in another folder,
a re-scan, a truncated copy. It hashes each file's name, size and first 64 KiB (the TIFF/DICOM
header and first tiles): a few reads per slide, however large. A copy or move keeps it only if
the file keeps its name; a symbolic link counts under its own name (coords record the link).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

HEAD_BYTES = 64 * 1024
# DICOM WSI and MIRAX slides are several files; these are the ones that identify them.
_COMPANION_EXTS = (".dcm", ".dat", ".ini")


def slide_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files a slide is made of: the file, a DICOM folder's files, a MIRAX file and its
    folder's index/settings/data files."""
    p = Path(path)
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    files = [p]
    companion = p.with_suffix("")
    if p.suffix.lower() == ".mrxs" and companion.is_dir():
        files += sorted(
            f for f in companion.iterdir() if f.is_file() and f.suffix.lower() in _COMPANION_EXTS
        )
    return files


def slide_fingerprint(path: str | os.PathLike[str]) -> str:
    """``<total bytes>:<sha256 prefix>`` of the slide's files (name, size, first 64 KiB each)."""
    h = hashlib.sha256()
    total = 0
    for f in slide_files(path):
        size = f.stat().st_size
        total += size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(HEAD_BYTES))
    return f"{total}:{h.hexdigest()[:16]}"


def fingerprint_mismatch(path: str | os.PathLike[str], recorded: str) -> str | None:
    """Why the slide at ``path`` is not the one a coords file recorded, or None (also when the
    coords file records no fingerprint: made before they were recorded, or by CLAM)."""
    if not recorded:
        return None
    try:
        now = slide_fingerprint(path)
    except OSError as e:
        return f"cannot read it to check it is the slide that was tiled ({e})"
    if now == recorded:
        return None
    return (
        f"is not the slide that was tiled (fingerprint {now}, coords record {recorded}: "
        "another file with the same name, or the slide changed)"
    )
