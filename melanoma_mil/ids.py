"""Slide ids and the paths made from them: the one owner of what a valid id is.

Every stage turns a slide id into a file name (``coords/<id>.h5``, ``<cache>/<id>.h5``,
``<heatmaps>/<id>/``), and ids come from users' CSVs. An id holding a separator, ``..`` or an
absolute path would read or write outside the command's folders, so ids are checked where they
enter (manifests, labels CSVs, file names) and every path built from one is checked again.
Ids that differ only in case or Unicode form are refused where the output folder's file system
would make their files one (`check_spellings`).
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Collection
from pathlib import Path

from melanoma_mil.errors import UserError
from melanoma_mil.fsutil import Folding, name_folding

MAX_LENGTH = 200  # characters
# in bytes as the file system counts them (UTF-8): a name may hold 255, and the longest name
# made from an id (a claim's draft, `.<id>.lock.<8 random>.claiming`) adds 24; 4 to spare
MAX_BYTES = 255 - 28
_BAD_CHARS = re.compile(r"[/\\\x00-\x1f\x7f]")
# names Windows keeps for devices, whatever their case or extension (`nul.txt`): an output
# folder copied to Windows or an SMB share could not open or copy files named by them
_DEVICES = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"} | {
    f"{port}{n}" for port in ("COM", "LPT") for n in "123456789\u00b9\u00b2\u00b3"
}


def id_problem(slide_id: str) -> str | None:
    """Why ``slide_id`` cannot name a file, or None when it can."""
    if not slide_id:
        return "is empty"
    if _BAD_CHARS.search(slide_id):
        return "contains a path separator or control character"
    if slide_id.startswith("."):
        return "starts with '.' (hidden files, temp files and '..' are not slide ids)"
    if slide_id != slide_id.strip():
        return "starts or ends with whitespace"
    if slide_id.partition(".")[0].rstrip(" ").upper() in _DEVICES:
        return (
            "is a name Windows keeps for a device (CON, PRN, AUX, NUL, COM1-9, LPT1-9, with any "
            "extension), so its files could not be opened or copied on Windows or an SMB share; "
            "rename the slide file, or its slide_id in the table"
        )
    size = len(os.fsencode(slide_id))
    if len(slide_id) > MAX_LENGTH or size > MAX_BYTES:
        return (
            f"is too long to name files ({len(slide_id)} characters, {size} bytes in UTF-8; "
            f"at most {MAX_LENGTH} and {MAX_BYTES}): shorten it"
        )
    return None


def check_slide_id(slide_id: object, where: str) -> str:
    """``slide_id`` as a str, or a UserError naming ``where`` it came from and the fix."""
    sid = "" if slide_id is None else str(slide_id)
    why = id_problem(sid)
    if why:
        raise UserError(
            f"{where}: slide id {sid!r} {why}; slide ids must be plain file names "
            "(letters, digits, '-', '_', '.'), not paths."
        )
    return sid


def id_path(root: str | os.PathLike[str], slide_id: str, suffix: str = "") -> Path:
    """``root/<slide_id><suffix>``; the id is checked, so the path cannot leave ``root``.

    Only the name is checked, not where links point: labs link slide and feature files into
    a folder, and writes replace a link rather than write through it (see ``io.atomic_path``).
    """
    return Path(root) / f"{check_slide_id(slide_id, f'a file name under {str(root)!r}')}{suffix}"


def held_ids(
    root: str | os.PathLike[str], suffix: str = "", holding: Collection[str] = ()
) -> list[str]:
    """The ids whose `id_path` an earlier call made in ``root``: files ``<id><suffix>`` or, with
    ``holding`` (the file names a command writes in a slide's folder), folders holding an entry
    of one of those names, a link too, dangling or not (a draw of that id would replace it, so
    its folder is treated as the slide's: refused, never written through). A user's own folder
    there (notes/, figures/) names no slide, nor does a name that is no id (`id_problem`: hidden
    temp files and claims, a `.snapshot/`): no command writes there."""
    folder = Path(root)
    if not folder.is_dir():
        return []
    ids = (p.name.removesuffix(suffix) for p in folder.iterdir() if _holds(p, suffix, holding))
    return sorted(i for i in ids if id_problem(i) is None)


def _holds(path: Path, suffix: str, holding: Collection[str]) -> bool:
    """True if ``path`` is a file named ``*<suffix>`` or, with ``holding``, a folder holding an
    entry named as one of those (`os.path.lexists`: a dangling link counts)."""
    if holding:
        return path.is_dir() and any(os.path.lexists(path / name) for name in holding)
    return path.is_file() and path.name.endswith(suffix)


def _id_key(value: str) -> str:
    """An id as files and spreadsheets vary it: case, a float's '.0', leading zeros."""
    value = re.sub(r"\.0+$", "", value.lower())
    return re.sub(r"\d+", lambda m: str(int(m.group())), value)


def unmatched_ids(what: str, ids: list[str], known: list[str], fix: str) -> str | None:
    """A warning that ``ids`` (``what``: '3 slides of labels_csv') name no prediction, naming
    the prediction id each differs from only in case, a '.0' or leading zeros: rows left out
    this way are otherwise unseen, and a near miss is almost always a spelling, not a slide."""
    if not ids:
        return None
    near = {_id_key(k): k for k in known}
    alike = [f"{i!r} ~ {near[_id_key(i)]!r}" for i in ids if _id_key(i) in near]
    spelled = f"; spelled differently? {', '.join(alike[:5])}" if alike else ""
    return f"{what} match no prediction and are left out (e.g. {ids[:5]}){spelled}; {fix}"


def _spelling(slide_id: str, folding: Folding) -> str:
    """An id as a file system that folds names so compares it."""
    spelled = unicodedata.normalize("NFC", slide_id) if folding.form else slide_id
    return spelled.casefold() if folding.case else spelled


def rename_or_move(files: str) -> str:
    """The fix for twin ids taken from the names of ``files`` (coords or feature files)."""
    return (
        f"rename one of the {files} (its name is the slide id), or write to an output_dir on a "
        "file system that tells them apart (Linux ext4, xfs)"
    )


def check_spellings(
    ids: list[str],
    source: str,
    out: str | os.PathLike[str],
    fix: str,
    folding: Folding | None = None,
    held: Collection[str] = (),
) -> None:
    """Refuse two ids whose coords, bags and heatmap folders would be one file in ``out``: ids
    that differ only in case or Unicode form, where its file system folds names (`folding`, for
    tests: as if probed); and so an id and one of ``held``, the ids whose files ``out`` holds
    from an earlier call (`S1` drawn, then `s1` alone would overwrite its files). Probed only
    when there are such ids: Linux keeps them apart."""
    every = Folding(case=True, form=True)
    alike = _alike(ids, every) or _held(ids, held, every)
    if alike is None:
        return
    try:
        folding = folding or name_folding(out)
    except OSError as e:  # not writable: say so, the caller would write there
        said = " and ".join(_shown(*alike))
        raise UserError(
            f"output_dir '{out}' cannot be written ({e.strerror} in '{e.filename}'), so whether "
            f"its file system tells slide ids {said} in {source} apart cannot be checked; "
            "choose another output_dir or fix its permissions."
        ) from None
    pair = _alike(ids, folding)
    if pair is not None:
        said = " and ".join(_shown(*pair))
        raise UserError(
            f"slide ids {said} in {source} differ only in case or Unicode form (accents "
            f"composed or not), so their files would be one in output_dir '{out}', whose "
            f"file system does not tell such names apart; {fix}."
        )
    pair = _held(ids, held, folding)
    if pair is not None:
        new, old = _shown(*pair)
        raise UserError(
            f"slide id {new} in {source} and {old}, whose files output_dir '{out}' already "
            "holds, differ only in case or Unicode form (accents composed or not), and its file "
            f"system does not tell such names apart: the files of {new} would overwrite them; "
            f"{fix}, or choose another output_dir."
        )


def _alike(ids: list[str], folding: Folding) -> tuple[str, str] | None:
    """The first two of ``ids`` spelled alike under ``folding``."""
    spelled: dict[str, str] = {}  # an id's `_spelling` -> the first id spelled so
    for sid in ids:
        twin = spelled.setdefault(_spelling(sid, folding), sid)
        if twin != sid:
            return twin, sid
    return None


def _held(ids: list[str], held: Collection[str], folding: Folding) -> tuple[str, str] | None:
    """The first of ``ids`` spelled alike under ``folding``, not the same, as one of ``held``
    (ids whose files an earlier call made), and that one."""
    earlier, same = {_spelling(h, folding): h for h in held}, set(held)
    for sid in ids:
        twin = earlier.get(_spelling(sid, folding))
        if twin is not None and sid not in same:
            return sid, twin
    return None


def _shown(first: str, second: str) -> tuple[str, str]:
    """Two ids as a message shows them: by their code points where they print alike."""
    nfc = [unicodedata.normalize("NFC", i) for i in (first, second)]
    if nfc[0] == nfc[1]:
        return ascii(first), ascii(second)
    return f"'{first}'", f"'{second}'"
