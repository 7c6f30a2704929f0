"""Which files are a cohort's slides and their ids: from a manifest CSV (slide_id, path) or a
recursive folder search (into linked folders), one id per slide and one slide per file.

A DICOM WSI is a folder of .dcm files: the folder is the slide, its name the slide id. Two ids
for one file (links, hard links, a DICOM series), or two ids a case-folding file system would
make one file, are refused before any work.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from pathlib import Path

from melanoma_mil.errors import UserError
from melanoma_mil.fsutil import Folding
from melanoma_mil.ids import check_slide_id, check_spellings
from melanoma_mil.io import read_text_csv
from melanoma_mil.tiling.readers import dicom_files, dicom_series

DICOM_EXT = ".dcm"


def slide_id_of(path: str | os.PathLike[str]) -> str:
    """File name without extension; ``x.ome.tiff`` -> ``x``."""
    name = Path(path).name
    lower = name.lower()
    for double in (".ome.tiff", ".ome.tif"):
        if lower.endswith(double):
            return name[: -len(double)]
    return Path(name).stem


def _file_key(path: Path) -> tuple[int, int] | str:
    """What ``path`` is on disk: its real path (a symbolic link is the file it links to), or for
    a hard-linked file its device and inode. Only then: a file system without stable inodes
    (some network and FUSE mounts number files 0, or alike) must not make two scans one."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    if st.st_ino == 0 or st.st_nlink < 2:
        return os.path.realpath(path)
    return (st.st_dev, st.st_ino)


def _series_keys(paths: list[Path]) -> dict[Path, str]:
    """A key per DICOM slide among ``paths`` that shares its folder with another (a .dcm file,
    or the folder itself): the folder and its series, as OpenSlide opens the series of any of
    its files, so two files of one series are one slide. Others are left to `_file_key`."""
    folders: dict[str, list[Path]] = {}
    for p in paths:
        if p.suffix.lower() == DICOM_EXT or p.is_dir():
            folder = p.parent if p.suffix.lower() == DICOM_EXT else p
            folders.setdefault(os.path.realpath(folder), []).append(p)
    keys: dict[Path, str] = {}
    for real, shared in folders.items():
        if len(shared) < 2:
            continue
        files = {p: next(iter(dicom_files(p)), p) if p.is_dir() else p for p in shared}
        uids = {f: uid for uid, fs in dicom_series(list(set(files.values()))).items() for f in fs}
        keys |= {p: f"{real}: series {uids[f]}" for p, f in files.items() if f in uids}
    return keys


def _check_unique(
    pairs: list[tuple[str, Path]],
    source: str,
    out: str | os.PathLike[str],
    fix: str = "rename one of the files",
    folding: Folding | None = None,
    held: Collection[str] = (),
) -> dict[str, Path]:
    found: dict[str, Path] = {}
    files: dict[tuple[int, int] | str, str] = {}  # a file on disk -> its first slide id
    series = _series_keys([path for _, path in pairs])
    for sid, path in pairs:
        if sid in found:
            raise UserError(
                f"duplicate slide id '{sid}' in {source}: {found[sid]} and {path}; "
                f"{fix} (slide ids must be unique)."
            )
        key = series.get(path) or _file_key(path)
        if key in files and path in series:
            raise UserError(
                f"slides '{files[key]}' and '{sid}' in {source} are one DICOM WSI series "
                f"({key}); list each slide once (one of its .dcm files, or its folder)."
            )
        if key in files:  # one scan under two ids would be two bags: in two folds, a leak
            first, real = files[key], os.path.realpath(path)
            also = os.path.realpath(found[first])
            names = f"'{also}'" + (f", also named '{real}'" if real != also else "")
            raise UserError(
                f"slides '{first}' and '{sid}' in {source} are one file ({names}); "
                "list each slide once."
            )
        found[sid], files[key] = path, sid
    check_spellings(list(found), source, out, fix, folding, held)
    return dict(sorted(found.items()))


def _manifest_slides(
    mpath: Path, slides_dir: str | os.PathLike[str] | None
) -> list[tuple[str, Path]]:
    """(slide id, path) of each row of a manifest CSV, relative paths resolved against
    ``slides_dir`` when given, else the manifest's folder; blank rows skipped, a half-filled
    one refused."""
    df = read_text_csv(mpath, "manifest", "manifest", ["slide_id", "path"])
    missing = {"slide_id", "path"} - set(df.columns)
    if missing:
        raise UserError(
            f"manifest '{mpath}' lacks column(s) {sorted(missing)}; it needs slide_id,path."
        )
    sid_blank, path_blank = (df[c].str.strip() == "" for c in ("slide_id", "path"))
    half = df.index[sid_blank ^ path_blank].tolist()
    if half:  # a blank row is spacing; a half-filled one is a slide left out by mistake
        raise UserError(
            f"manifest '{mpath}' row {half[0] + 2} has a slide_id or a path but not both; "
            "fill in the other, or remove the row."
        )
    df = df[~sid_blank]
    if df.empty:
        raise UserError(f"manifest '{mpath}' lists no slides.")
    base = Path(slides_dir) if slides_dir else mpath.parent
    return [
        (
            check_slide_id(str(sid).strip(), f"manifest '{mpath}' row {row + 2}"),
            p if (p := Path(str(raw).strip())).is_absolute() else base / p,
        )
        for row, sid, raw in zip(df.index, df["slide_id"], df["path"], strict=True)
    ]


def find_slides(
    slides_dir: str | os.PathLike[str] | None,
    manifest: str | os.PathLike[str] | None,
    extensions: Sequence[str],
    out: str | os.PathLike[str],
    folding: Folding | None = None,
    held: Collection[str] = (),
) -> dict[str, Path]:
    """Slide id -> path, from a manifest CSV (slide_id, path) or a recursive folder search.

    Relative manifest paths resolve against ``slides_dir`` when given, else the manifest's folder.
    Files named in a manifest are not checked here: a missing one fails that slide only. ``out``
    is the command's output folder, where files named by the ids go, ``held`` the ids whose
    files it holds (see `check_spellings`).
    """
    if manifest:
        mpath = Path(manifest)
        pairs = _manifest_slides(mpath, slides_dir)
        fix = "give one of them another slide_id"
        return _check_unique(pairs, f"manifest '{mpath}'", out, fix, folding, held)
    if not slides_dir:
        raise UserError("no slides given: set slides_dir=FOLDER or manifest=CSV.")
    root = Path(slides_dir)
    if not root.is_dir():
        raise UserError(f"slides_dir '{root}' is not a folder: check the path.")
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    found = [
        p
        for p in _files_under(root)
        if p.name.lower().endswith(exts) and not p.name.startswith(".") and p.is_file()
    ]
    dicom = {p.parent for p in found if p.suffix.lower() == DICOM_EXT}  # one slide per folder
    files = sorted({p for p in found if p.suffix.lower() != DICOM_EXT} | dicom)
    if not files:
        raise UserError(
            f"no slides with extensions {list(exts)} under '{root}'; "
            "check slides_dir or set extensions=[...]."
        )
    pairs = [(check_slide_id(p.name if p.is_dir() else slide_id_of(p), str(p)), p) for p in files]
    return _check_unique(pairs, f"'{root}'", out, folding=folding, held=held)


def _files_under(root: Path) -> list[Path]:
    """Every file under ``root``, into linked folders too (cohorts are often assembled from
    links), hidden folders left out; each real folder once, so a link loop or two links to a
    folder list nothing twice."""
    seen: set[str] = set()
    files: list[Path] = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .snapshot/, .Trash: not slides
        files += [Path(folder) / name for name in names]
    return files
