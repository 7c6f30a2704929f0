"""What a demo made in its output_dir, so that `demo overwrite=true` deletes exactly that.

The demo writes ``demo.json`` into its output_dir before anything else, and when it ends
(finished, failed or interrupted) records there every file and folder it created, with each
file's size and modification time. ``overwrite=true`` deletes only recorded files that are
unchanged since, then recorded folders left empty: a file a user added or edited stays, and so
does every folder holding one. Such a file where the next demo writes (it would be overwritten,
read as the demo's own, or stop a stage halfway) refuses the next demo, a plain rerun as well
as ``overwrite=true``, before anything is written or deleted. A folder without ``demo.json``
is never written into or deleted, and nothing is deleted through a folder that has since
become a link.

A demo killed outright (kill -9, power cut) cannot record anything as it dies. So a running
demo's record also holds what was there when it started, and the demo touches the record every
``BEAT_S`` seconds and after every stage. The next demo in that folder takes as the killed one's
every file created or changed since that start no later than the last touch, by the file's
change time (ctime, which the kernel sets and no copy or touch can set back). Files changed
later are the killed demo's very last writes, or yours: those created since it started in the
folders whose stages check and redo a killed run's leftovers (``resumable``: tiles, features)
are taken as its own (recorded, so a plain rerun resumes over them and ``overwrite=true``
deletes them); any other (an edit of a file it wrote, a file elsewhere) stays unrecorded, so it
is kept and, where the demo writes, refuses the next demo.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISLNK
from typing import Any

from melanoma_mil.errors import UserError
from melanoma_mil.io import write_json
from melanoma_mil.outdir import refuse_linked

log = logging.getLogger(__name__)

MARKER = "demo.json"
KIND = "melanoma_mil demo output"
BEAT_S = 0.5  # a running demo touches its record this often
STALE_S = 5.0  # a running record untouched this long was left by a demo that is gone

Stat = list[int]  # [size, mtime_ns]
State = tuple[dict[str, Stat], set[str]]  # files (relative path -> Stat) and folders


def _stat(path: Path) -> Stat:
    st = path.lstat()
    return [st.st_size, st.st_mtime_ns]


def _walk(root: Path) -> tuple[dict[str, os.stat_result], dict[str, os.stat_result]]:
    """lstat of every file and folder under ``root`` (marker aside), links not followed."""
    files: dict[str, os.stat_result] = {}
    dirs: dict[str, os.stat_result] = {}
    for top, subdirs, names in os.walk(root):
        rel = Path(top).relative_to(root)
        for found, entries in ((dirs, subdirs), (files, names)):
            for name in entries:
                if found is files and rel == Path(".") and name == MARKER:
                    continue
                with contextlib.suppress(FileNotFoundError):  # a temp file just renamed
                    found[str(rel / name)] = (Path(top) / name).lstat()
    return files, dirs


def snapshot(root: Path) -> State:
    """Files (relative path -> [size, mtime_ns]) and folders under ``root``, marker excluded."""
    files, dirs = _walk(root)
    return {k: [st.st_size, st.st_mtime_ns] for k, st in files.items()}, set(dirs)


def _fs_now(root: Path) -> int:
    """The time now on the clock of ``root``'s filesystem (a server's, on NFS), in ns."""
    try:
        with tempfile.TemporaryFile(dir=root) as f:
            return os.fstat(f.fileno()).st_mtime_ns
    except OSError:
        return time.time_ns()


def _inside(name: object) -> str:
    """A recorded relative path; ValueError if it leads out of the output_dir (edited)."""
    path = Path(str(name))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ValueError(f"path {name!r} leaves the folder")
    return str(path)


def _files(raw: dict[str, Any]) -> dict[str, Stat]:
    return {_inside(k): [int(v[0]), int(v[1])] for k, v in raw.items()}


@dataclass
class Ledger:
    """The files and folders one demo output_dir holds because a demo made them."""

    root: Path
    files: dict[str, Stat] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)
    running: bool = False
    before: State | None = None  # what was there when the running demo started
    _stop: threading.Event | None = field(default=None, repr=False, compare=False)
    _beats: threading.Thread | None = field(default=None, repr=False, compare=False)

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
            files = _files(data["files"])
            dirs = {_inside(d) for d in data["dirs"]}
            raw = data.get("before")
            before = (
                None if raw is None else (_files(raw["files"]), {_inside(d) for d in raw["dirs"]})
            )
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise UserError(
                f"'{marker}' is not a demo record (unreadable or edited); the demo will not "
                "delete anything in that folder: delete it yourself or choose another output_dir."
            ) from None
        return cls(root, files, dirs, bool(data.get("running")), before)

    def save(self) -> None:
        doc: dict[str, Any] = {
            "kind": KIND, "running": self.running, "files": self.files, "dirs": sorted(self.dirs)
        }  # fmt: skip
        if self.running and self.before is not None:
            doc["before"] = {"files": self.before[0], "dirs": sorted(self.before[1])}
        write_json(self.root / MARKER, doc)

    def beat(self) -> None:
        """Touch the record: everything written so far is this demo's, should it be killed."""
        with contextlib.suppress(OSError):  # the record deleted by hand: nothing to mark
            os.utime(self.root / MARKER)

    def _beat_until(self, stop: threading.Event) -> None:
        while not stop.wait(BEAT_S):
            self.beat()

    def start(self) -> None:
        """Mark the demo as running with what is there now, and keep touching the record."""
        self.before = snapshot(self.root)
        self.running = True
        self.save()
        self._stop = threading.Event()
        self._beats = threading.Thread(
            target=self._beat_until, args=(self._stop,), name="demo-beat", daemon=True
        )
        self._beats.start()

    def finish(self) -> None:
        """Record every file and folder created or rewritten since ``start``."""
        if self._stop is not None and self._beats is not None:
            self._stop.set()
            self._beats.join()
            self._stop = self._beats = None
        files, dirs = snapshot(self.root)
        old_files, old_dirs = self.before or ({}, set())
        for rel, stat in files.items():
            if old_files.get(rel) != stat:  # made or rewritten by this demo
                self.files[rel] = stat
        self.files = {k: v for k, v in self.files.items() if k in files}
        self.dirs = {d for d in self.dirs | (dirs - old_dirs) if d in dirs}
        self.running, self.before = False, None
        self.save()

    def stopped(self) -> bool:
        """Whether the demo that left this running record is gone: it has not touched the
        record for ``STALE_S`` (waiting out the rest of that time if needed)."""
        marker = self.root / MARKER
        seen = marker.stat().st_mtime_ns
        age_s = (_fs_now(self.root) - seen) / 1e9
        if age_s < STALE_S:
            time.sleep(min(STALE_S, STALE_S - age_s))
        return marker.stat().st_mtime_ns == seen

    def recover(self, resumable: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
        """Record what a demo killed while running made (see the module docstring). Files
        changed after its last touch are its last writes or yours: those absent when it
        started, in ``resumable`` (folders ending in '/' whose stages check and redo their own
        leftovers), are taken as its own, with the new folders holding them. Return (taken,
        late): the taken files, and the files new or changed since it started that stay
        unrecorded."""
        alive = (self.root / MARKER).stat().st_mtime_ns
        files, dirs = _walk(self.root)
        late: list[str] = []
        taken: list[str] = []
        made: set[str] = set()
        if self.before is None:  # a record without its start state (older version): claim none
            late = sorted(set(files) - set(self.files))
        else:
            old_files, old_dirs = self.before
            for rel, st in sorted(files.items()):
                stat = [st.st_size, st.st_mtime_ns]
                if old_files.get(rel) == stat:  # there before, unchanged
                    continue
                if st.st_ctime_ns <= alive:
                    self.files[rel] = stat
                elif rel not in old_files and _where(rel, resumable) and not _is_link(st):
                    self.files[rel] = stat  # its last writes (a stage redoes what is half-done)
                    taken.append(rel)
                else:
                    late.append(rel)
            holding = {str(p) for rel in taken for p in Path(rel).parents} - {"."}
            made = {
                d for d, st in dirs.items()
                if d not in old_dirs and (st.st_ctime_ns <= alive or d in holding)
            }  # fmt: skip
        self.files = {k: v for k, v in self.files.items() if k in files}
        self.dirs = {d for d in self.dirs | made if d in dirs}
        self.running, self.before = False, None
        self.save()
        return taken, late

    def _linked(self) -> Path | None:
        """The first folder on a recorded path that is now a link (to somewhere else)."""
        recorded = [Path(p) for p in [*self.files, *self.dirs]]
        folders = {parent for p in recorded for parent in p.parents} - {Path(".")}
        return next((self.root / f for f in sorted(folders) if (self.root / f).is_symlink()), None)

    def _kept(self) -> list[str]:
        """The files ``clear`` would keep: added or edited by someone else, or links."""
        now = snapshot(self.root)[0]
        return sorted(
            rel for rel, stat in now.items()
            if self.files.get(rel) != stat or (self.root / rel).is_symlink()
        )  # fmt: skip

    def refuse_yours(self, writes: tuple[str, ...], overwrite: bool) -> list[str]:
        """Refuse, before anything is written or deleted, when a file the record does not hold
        as the demo's (unchanged) lies where the demo writes (``writes``: paths, or folders
        ending in '/'): any run would overwrite it, read it as the demo's own or stop halfway.
        Return the files kept (``_kept``) otherwise."""
        kept = self._kept()
        blocking = [rel for rel in kept if _where(rel, writes)]
        if blocking:
            what = (
                "overwrite=true would replace them or stop halfway"
                if overwrite
                else "rerunning the demo would overwrite them, use them as its own or stop halfway"
            )
            raise UserError(
                f"'{self.root}' holds {len(blocking)} file(s) where the demo writes its own that "
                "its record does not hold as the demo's (added or edited since, or written as a "
                f"demo was killed): {blocking[:5]}{' ...' if len(blocking) > 5 else ''}; "
                f"{what}: move them out of output_dir, or choose another output_dir."
            )
        return kept

    def clear(self, writes: tuple[str, ...] = ()) -> list[str]:
        """Delete the recorded files that are unchanged, then recorded folders left empty;
        return what was kept (files added or edited by someone else). Refused before any
        deletion as in `refuse_yours`, and when a folder was replaced by a link, as nothing is
        deleted through one."""
        link = self._linked()
        if link is not None:
            raise UserError(
                f"'{link}' is now a link to '{os.readlink(link)}', not the folder the demo made; "
                "overwrite=true deletes nothing through links: remove the link (what it points "
                "to stays) or choose another output_dir."
            )
        kept = self.refuse_yours(writes, overwrite=True)
        for rel, stat in sorted(self.files.items()):
            path = self.root / rel
            if not path.is_symlink() and path.is_file() and _stat(path) == stat:
                path.unlink()
        for rel in sorted(self.dirs, key=lambda d: -len(Path(d).parts)):
            with contextlib.suppress(OSError):  # not empty (a kept file) or already gone
                (self.root / rel).rmdir()
        self.files, self.dirs = {}, set()
        self.save()
        return kept


def _where(rel: str, writes: tuple[str, ...]) -> bool:
    """Whether ``rel`` lies where the demo writes (``writes``: paths, or folders ending in
    '/')."""
    return rel in writes or rel.startswith(tuple(w for w in writes if w.endswith("/")))


def _is_link(st: os.stat_result) -> bool:
    """Whether an lstat result is a link's."""
    return S_ISLNK(st.st_mode)


def _refuse_links(root: Path, writes: tuple[str, ...]) -> None:
    """A link on the way to where the demo writes (``tiles`` -> a folder of yours) would take
    its writes outside ``root``: refused, as a plain rerun and with overwrite."""
    ways = {Path(*p.parts[:d]) for p in map(Path, writes) for d in range(1, len(p.parts) + 1)}
    refuse_linked(root, "demo", sorted(map(str, ways)))


def claim(
    root: Path, overwrite: bool, writes: tuple[str, ...] = (), resumable: tuple[str, ...] = ()
) -> Ledger:
    """The ledger for a demo into ``root``: a new or empty folder, or an earlier demo's
    (cleared first with ``overwrite``; either way refused when a file of the user's lies in
    ``writes``, see `Ledger.refuse_yours`; a killed demo's last writes in ``resumable`` are
    its own, see `Ledger.recover`). Any other folder is refused, whatever ``overwrite``, and
    so is a folder a demo is writing into now."""
    if root.exists() and not root.is_dir():
        raise UserError(f"output_dir '{root}' is a file; choose a folder for the demo.")
    _refuse_links(root, writes)
    ledger = Ledger.read(root) if root.is_dir() else None
    if ledger is None:
        if root.is_dir() and any(root.iterdir()):
            raise UserError(
                f"output_dir '{root}' is not empty and was not made by `demo` (no {MARKER}); the "
                "demo never writes into or deletes such a folder: choose a new or empty one."
            )
        root.mkdir(parents=True, exist_ok=True)
        return Ledger(root)
    if ledger.running:
        if not ledger.stopped():
            raise UserError(
                f"a demo is writing into '{root}' now ({MARKER} keeps changing); wait for it to "
                "end, or choose another output_dir."
            )
        taken, late = ledger.recover(resumable)
        log.warning(
            "demo: the last demo in %s was killed; its record now holds %d file(s)%s%s",
            root,
            len(ledger.files),
            f", {len(taken)} of them its last writes (checked or redone by the stages)"
            if taken
            else "",
            f"; {len(late)} changed after it stopped are not: {late[:5]}" if late else "",
        )
    if not overwrite:  # a plain rerun rewrites (or reads) what is there: same refusal
        ledger.refuse_yours(writes, overwrite=False)
        return ledger
    kept = ledger.clear(writes)
    if kept:
        log.warning(
            "demo: kept %d file(s) in %s that the demo did not make or that were changed "
            "since (none where the demo writes): %s%s",
            len(kept),
            root,
            kept[:5],
            " ..." if len(kept) > 5 else "",
        )
    return ledger
