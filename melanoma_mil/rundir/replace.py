"""Replacing a run (`fit overwrite=true`) replaces the run's own entries (`layout.run_owns`),
not what the user added to its folder.

The new run is built beside the old one (``.<name>.fit-new``) and swapped in once complete; the
old run goes to ``.<name>.fit-old``. Then every other entry of the old folder (notes, outputs of
other commands) is moved into the new run folder, never over an entry there, and the old run is
deleted. If an entry cannot be moved, the old folder is kept, visible, as
``<name>.replaced-<run id>`` and the log says so. `recover` finishes each step after a crash.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

from melanoma_mil.fsutil import recover_dir, swap_dir
from melanoma_mil.outdir import MARKER, read_marker
from melanoma_mil.rundir.layout import REPLACE_LOCK, SUMMARY, run_owns

log = logging.getLogger(__name__)


def run_path(out: Path) -> Path:
    """The folder a replacement swaps: ``out`` with links and '.'/'..' resolved. A linked
    output_dir is the user's link: the run is replaced where it points and the link kept (the
    link itself swapped would move the run off that disk); 'output_dir=.' has no name to build
    a replacement beside."""
    return Path(os.path.realpath(out))


def staging(out: Path) -> tuple[Path, Path]:
    """(where a replacement of ``out`` is built, where the replaced run goes before removal)."""
    real = run_path(out)
    return real.parent / f".{real.name}.fit-new", real.parent / f".{real.name}.fit-old"


def display_name(run_dir: Path) -> str:
    """The run's name, also while it is built beside the run it replaces."""
    name = Path(run_dir).resolve().name
    return (
        name[1 : -len(".fit-new")] if name.startswith(".") and name.endswith(".fit-new") else name
    )


def recover(out: Path) -> None:
    """Finish (or undo) a replacement a crash interrupted, carrying over the user's entries."""
    out = run_path(out)
    new, old = staging(out)
    if _swapped_back(new, out):  # killed between the exchange and the rename that follows
        new.rename(old)
    recover_dir(new, out, old, new.exists() and (new / SUMMARY).is_file())
    if out.is_dir() and old.is_dir() and (read_marker(old) or {}).get("command") == "fit":
        _retire(old, out)
    if not new.exists():  # no swap under way: a lock a crash left in the run would make the
        (out / REPLACE_LOCK).unlink(missing_ok=True)  # next swap's crash read as swapped back


def _swapped_back(new: Path, out: Path) -> bool:
    """Whether ``new`` holds the replaced run: a replacement is built holding REPLACE_LOCK
    until it is swapped in, so after the exchange the lock is in ``out`` and not in ``new``."""
    return (
        (out / REPLACE_LOCK).is_file()
        and new.is_dir()
        and not (new / REPLACE_LOCK).exists()
        and (read_marker(new) or {}).get("command") == "fit"
    )


def replace_run(out: Path, new: Path) -> None:
    """Swap the complete run ``new`` in at ``out`` (one atomic exchange where the filesystem
    has one, else two renames that `recover` completes), then retire the old run."""
    out = run_path(out)
    old = staging(out)[1]
    swap_dir(new, out, old)
    (out / REPLACE_LOCK).unlink(missing_ok=True)  # swapped: the lock marks a run being built
    _retire(old, out)


def _retire(old: Path, out: Path) -> None:
    """Carry the user's entries of the replaced run ``old`` into ``out``, then delete ``old``;
    if one cannot be carried, ``old`` is kept beside ``out`` (never deleted silently)."""
    moved, stuck = _carry(old, out)
    if moved:
        log.info("fit: kept in '%s' what you added to the replaced run: %s", out, ", ".join(moved))
    if not stuck:
        _drop(old)
        return
    run_id = str((read_marker(old) or {}).get("run_id", "old"))
    aside = out.parent / f"{out.name}.replaced-{run_id[:8]}"
    with contextlib.suppress(FileNotFoundError):  # else another process kept it aside
        old.rename(aside)
        log.warning(
            "fit: '%s' holds the new run, but %s could not be moved there from the replaced "
            "run: it is kept, with them, in '%s'; take what you need, then delete that folder",
            out,
            ", ".join(stuck),
            aside,
        )


def _carry(old: Path, out: Path) -> tuple[list[str], list[str]]:
    """Move each entry of ``old`` that is not the run's into ``out``, never over an entry there:
    (the entries moved, the others with why). Safe when processes recovering ``out`` race."""
    moved: list[str] = []
    stuck: list[str] = []
    try:
        entries = sorted(old.iterdir())
    except FileNotFoundError:  # retired by another process meanwhile
        return moved, stuck
    for entry in entries:
        if run_owns(entry.name):
            continue
        target = out / entry.name
        try:
            if os.path.lexists(target):
                if os.path.lexists(entry):  # else another process just moved it there
                    stuck.append(f"{entry.name} (the new run folder has one too)")
                continue
            entry.rename(target)
        except FileNotFoundError:
            continue  # moved by another process meanwhile
        except OSError as e:
            stuck.append(f"{entry.name} ({e.strerror})")
            continue
        moved.append(entry.name + ("/" if target.is_dir() else ""))
    return moved, stuck


def _drop(old: Path) -> None:
    """Delete the replaced run, its marker last: a crash midway leaves a folder `recover` still
    recognises as a replaced run."""
    with contextlib.suppress(FileNotFoundError):  # another process retiring it too
        for entry in old.iterdir():
            if entry.name == MARKER:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        shutil.rmtree(old)
