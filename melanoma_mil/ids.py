"""Slide ids and the paths made from them: the one owner of what a valid id is.

Every stage turns a slide id into a file name (``coords/<id>.h5``, ``<cache>/<id>.h5``,
``<heatmaps>/<id>/``), and ids come from users' CSVs. An id holding a separator, ``..`` or an
absolute path would read or write outside the command's folders, so ids are checked where they
enter (manifests, labels CSVs, file names) and every path built from one is checked again.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from melanoma_mil.errors import UserError

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
