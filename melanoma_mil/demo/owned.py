"""What a demo made in its output_dir, so that `demo overwrite=true` deletes exactly that.

The demo writes ``demo.json`` into its output_dir before anything else, and when it ends
(finished, failed or interrupted) records there every file and folder it created, with each
file's size and modification time. ``overwrite=true`` deletes only recorded files that are
unchanged since, then recorded folders left empty: a file a user added or edited stays, and so
does every folder holding one. A folder without ``demo.json`` is never written into or deleted.
A demo killed outright (kill -9, power cut) records nothing; its files are then kept and named.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from melanoma_mil.errors import UserError
from melanoma_mil.io import write_json

log = logging.getLogger(__name__)

MARKER = "demo.json"
KIND = "melanoma_mil demo output"


def _stat(path: Path) -> list[int]:
    st = path.lstat()
    return [st.st_size, st.st_mtime_ns]


def snapshot(root: Path) -> tuple[dict[str, list[int]], set[str]]:
    """Files (relative path -> [size, mtime_ns]) and folders under ``root``, marker excluded."""
    files: dict[str, list[int]] = {}
    dirs: set[str] = set()
    for top, subdirs, names in os.walk(root):
        rel = Path(top).relative_to(root)
        dirs.update(str(rel / d) for d in subdirs)
        for name in names:
            if rel == Path(".") and name == MARKER:
                continue
            path = Path(top) / name
            files[str(rel / name)] = _stat(path)
    return files, dirs


@dataclass
class Ledger:
    """The files and folders one demo output_dir holds because a demo made them."""

    root: Path
    files: dict[str, list[int]] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)
    running: bool = False
    before: tuple[dict[str, list[int]], set[str]] = field(default_factory=lambda: ({}, set()))

    @classmethod
    def read(cls, root: Path) -> Ledger | None:
        """The ledger of a demo output_dir, or None when ``root`` holds no demo.json."""
        marker = root / MARKER
        if not marker.is_file():
            return None
        try:
            data: dict[str, Any] = json.loads(marker.read_text())
            if data.get("kind") != KIND:
                raise ValueError("not a demo marker")
            files = {str(k): [int(v[0]), int(v[1])] for k, v in data["files"].items()}
            dirs = {str(d) for d in data["dirs"]}
        except (ValueError, KeyError, TypeError, IndexError):
            raise UserError(
                f"'{marker}' is not a demo record (unreadable or edited); the demo will not "
                "delete anything in that folder: delete it yourself or choose another output_dir."
            ) from None
        return cls(root, files, dirs, bool(data.get("running")))

    def save(self) -> None:
        write_json(
            self.root / MARKER,
            {"kind": KIND, "running": self.running, "files": self.files, "dirs": sorted(self.dirs)},
        )

    def start(self) -> None:
        """Mark the demo as running and remember what is there now."""
        self.running = True
        self.save()
        self.before = snapshot(self.root)

    def finish(self) -> None:
        """Record every file and folder created or rewritten since ``start``."""
        files, dirs = snapshot(self.root)
        old_files, old_dirs = self.before
        for rel, stat in files.items():
            if old_files.get(rel) != stat:  # made or rewritten by this demo
                self.files[rel] = stat
        self.files = {k: v for k, v in self.files.items() if k in files}
        self.dirs = {d for d in self.dirs | (dirs - old_dirs) if d in dirs}
        self.running = False
        self.save()

    def clear(self) -> list[str]:
        """Delete the recorded files that are unchanged, then recorded folders left empty;
        return what was kept (files added or edited by someone else)."""
        kept: list[str] = []
        for rel, stat in sorted(self.files.items()):
            path = self.root / rel
            if path.is_symlink() or not path.is_file():
                continue
            if _stat(path) != stat:
                kept.append(rel)
                continue
            path.unlink()
        for rel in sorted(self.dirs, key=lambda d: -len(Path(d).parts)):
            with contextlib.suppress(OSError):  # not empty (a kept file) or already gone
                (self.root / rel).rmdir()
        self.files, self.dirs = {}, set()
        self.save()
        return kept + sorted(set(snapshot(self.root)[0]) - set(kept))


def claim(root: Path, overwrite: bool) -> Ledger:
    """The ledger for a demo into ``root``: a new or empty folder, or an earlier demo's
    (cleared first with ``overwrite``). Any other folder is refused, whatever ``overwrite``."""
    if root.exists() and not root.is_dir():
        raise UserError(f"output_dir '{root}' is a file; choose a folder for the demo.")
    ledger = Ledger.read(root) if root.is_dir() else None
    if ledger is None:
        if root.is_dir() and any(root.iterdir()):
            raise UserError(
                f"output_dir '{root}' is not empty and was not made by `demo` (no {MARKER}); the "
                "demo never writes into or deletes such a folder: choose a new or empty one."
            )
        root.mkdir(parents=True, exist_ok=True)
        return Ledger(root)
    if overwrite:
        if ledger.running:
            log.warning("demo: the last demo in %s did not finish recording its files", root)
        kept = ledger.clear()
        if kept:
            log.warning(
                "demo: kept %d file(s) in %s that the demo did not make or that were changed "
                "since: %s%s",
                len(kept),
                root,
                kept[:5],
                " ..." if len(kept) > 5 else "",
            )
    return ledger
