"""Claims on shared work items (slides) in a folder that any number of processes and hosts see.

A claim is a file created atomically (a hard link, which fails if the claim exists) that names
its owner: host, a machine id (boot id + pid namespace), pid and the process start time. It is
stale when its owner is provably gone (same machine: the pid is dead, or now belongs to a
process that started at another time, as happens when containers recycle pids), or when its
heartbeat (the file's mtime) is older than ``stale_after`` seconds (another host that died, a
hung process). A stale claim is taken over.

Breakers of a claim take turns through a gate, ``.<claim>.breaking``, placed like a claim and
stale after ``GATE_STALE_S`` (or at once where its process is provably gone), and remove the claim
only if it still is the stale one they saw. Without the gate, a breaker late to a claim another
had already broken and retaken could move that fresh claim aside, fail to put it back (a third
process had claimed the empty path meanwhile), and so leave two processes holding one slide.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import tempfile
import time
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from melanoma_mil.fsutil import machine_id, pid_alive, read_proc, shareable
from melanoma_mil.locks import refuse_link

log = logging.getLogger(__name__)

DEFAULT_STALE_S = 900.0
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
STOP_FIX = "make room (or use another output_dir) and re-run: finished slides are kept"


def disk_full(e: BaseException) -> bool:
    """A write failed for lack of space: every later slide would fail too, so stop claiming."""
    return isinstance(e, OSError) and e.errno in DISK_FULL


def disk_full_reason(e: OSError, folder: Path) -> str:
    """The one line a slide fails with when the disk it is written to is full."""
    return f"disk full ({e.strerror}) in {folder}"


def says_disk_full(reason: str) -> bool:
    """Whether a slide's reason holds `disk_full_reason`'s (as is, or quoted by a later step):
    a plain re-run once there is room finishes that slide."""
    return "disk full (" in reason


def process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (/proc), None where unknown."""
    stat = read_proc(f"/proc/{pid}/stat")
    if not stat:
        return None
    try:  # the command name may hold spaces and parentheses: split after the last ')'
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def me() -> dict[str, Any]:
    """This process as a claim owner."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "machine": machine_id(),
        "pid": pid,
        "start": process_start(pid),
        "since": time.time(),
    }


def owner_gone(owner: Mapping[str, Any], here: Mapping[str, Any] | None = None) -> bool | None:
    """True when ``owner``'s process is provably gone, False when it runs, None when it cannot
    be told from here (another host or pid namespace: only the heartbeat age can tell)."""
    here = here or me()
    pid = owner.get("pid")
    same = owner.get("host") == here["host"] and owner.get("machine") == here["machine"]
    if not same or not isinstance(pid, int):
        return None
    if not pid_alive(pid):
        return True
    start = owner.get("start")
    now = process_start(pid)
    return start is not None and now is not None and now != start  # pid recycled


def describe(owner: Mapping[str, Any]) -> str:
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"


NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)


def _place(draft: Path, path: Path) -> None:
    """Create ``path`` with ``draft``'s content, failing if it exists; whole at once (a hard
    link) where the filesystem allows, else created empty then written (some FUSE mounts)."""
    try:
        os.link(draft, path)
        return
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in NO_HARD_LINKS:
            raise
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(draft.read_text())
    except OSError:  # e.g. a full disk: leave no claim without an owner
        path.unlink(missing_ok=True)
        raise


DRAFT = ".claiming"  # suffix of the hidden draft a claim is written to before it is linked
GATE = ".breaking"  # suffix of the hidden gate breakers of a claim take turns through
# a gate is held for a read and a rename: older than this, its breaker died or hangs (another
# host; on this one a dead pid frees it at once). Kept short: a stale claim waits for it
GATE_STALE_S = 30.0


def _owner_of(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _age(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _drafted(path: Path, owner: Mapping[str, Any]) -> Iterator[Path]:
    """A hidden draft of ``owner`` beside ``path``, to be placed there whole (`_place`). Its
    name is unique (mkstemp): claimants on two hosts may share a pid (containers' pid 1)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=DRAFT, dir=path.parent)
    draft = Path(name)
    try:
        with os.fdopen(fd, "w") as f:
            shareable(f.fileno(), 0o644)  # mkstemp's 0600 would hide the owner from peers
            f.write(json.dumps(owner))
        yield draft
    finally:
        draft.unlink(missing_ok=True)


def _remove_if(path: Path, seen: Mapping[str, Any]) -> None:
    """Remove ``path`` if it holds ``seen``. Checked before it is moved aside (atomic), and
    checked again after: put back if it changed hands in between."""
    if _owner_of(path) != dict(seen):
        return
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    try:
        if _owner_of(aside) != dict(seen):
            with contextlib.suppress(FileExistsError):
                _place(aside, path)
    except OSError:
        pass
    aside.unlink(missing_ok=True)


def _stale(owner: Mapping[str, Any], age: float | None, stale_after: float) -> bool:
    """No file (age None), a provably gone owner, or no heartbeat for ``stale_after``."""
    return age is None or owner_gone(owner) is True or age > stale_after


def clear_drafts(folder: Path, stale_after: float = DEFAULT_STALE_S) -> None:
    """Remove the claim drafts and breakers' gates in ``folder`` (see `Claim.acquire`) of owners
    that are gone or silent: left by a process killed between writing a draft and linking it, or
    while breaking a claim. One listing of the folder, however many claims it holds. One that
    cannot be removed (another user's, an immutable file) is named in one warning: a leftover
    costs nothing but a hidden file, so the others are removed and the run goes on."""
    failed: list[str] = []
    try:
        with os.scandir(folder) as listing:
            entries = [e for e in listing if e.name[0] == "." and e.name.endswith((DRAFT, GATE))]
    except FileNotFoundError:
        return
    except OSError as e:
        entries, failed = [], [str(e)]
    for entry in entries:
        try:
            owner = json.loads(Path(entry.path).read_text() or "{}")
            age = time.time() - entry.stat().st_mtime
        except (OSError, ValueError):
            continue
        owner = owner if isinstance(owner, dict) else {}  # not ours: stale by age alone
        if not _stale(owner, age, stale_after):
            continue
        try:
            if entry.name.endswith(GATE):
                _remove_if(Path(entry.path), owner)  # a breaker may have just placed a new one
            else:
                Path(entry.path).unlink(missing_ok=True)
        except OSError as e:
            failed.append(f"{entry.path} ({e.strerror or e})")
    warn_left(folder, "processes killed while claiming", failed)


def warn_left(folder: Path, what: str, failed: list[str]) -> None:
    """One warning naming what ``what`` left in ``folder`` that could not be removed (``failed``:
    each path and why), if any: it costs space, not the run, which goes on."""
    if failed:
        log.warning("could not remove what %s left in '%s': %s; it takes disk space until "
                    "removed (check its owner and permissions), the run goes on",
                    what, folder, "; ".join(failed))  # fmt: skip


class Claim:
    """Exclusive claim on one work item; ``acquire`` breaks a stale claim, ``heartbeat`` keeps a
    live one fresh for other hosts."""

    def __init__(self, path: Path, stale_after: float = DEFAULT_STALE_S) -> None:
        self.path = path
        self.stale_after = stale_after
        self.heartbeat_s = heartbeat_every(stale_after)
        self.gate_stale_s = min(GATE_STALE_S, stale_after)
        self.held = False
        self.owner: dict[str, Any] = {}
        self._touched = 0.0
        self._me: dict[str, Any] = {}

    def read(self) -> dict[str, Any]:
        return _owner_of(self.path)

    def age(self) -> float | None:
        """Seconds since the last heartbeat, None when there is no claim file."""
        return _age(self.path)

    def stale(self, owner: Mapping[str, Any]) -> bool:
        """Its process is gone, or its heartbeat stopped (a dead host, or a hung process)."""
        return _stale(owner, self.age(), self.stale_after)

    def live_owner(self) -> dict[str, Any] | None:
        """The owner of a live claim by someone else, or None (no claim, or a stale one)."""
        if not self.path.exists():
            return None
        owner = self.read()
        return None if self.stale(owner) else owner

    def acquire(self) -> bool:
        """Take the claim (breaking a stale one); False if another live process holds it.

        OSError (e.g. a full disk) propagates: the caller decides whether that ends the run.
        """
        self._me = me()
        # the claim appears whole (hard link of a written file), never empty: a process killed
        # while claiming leaves no claim without an owner for the others to wait on
        with _drafted(self.path, self._me) as draft:
            for _ in range(3):
                try:
                    _place(draft, self.path)
                except FileExistsError:
                    self.owner = self.read()
                    if not self.stale(self.owner):
                        return False
                    self._break(self.owner)
                    continue
                self.held, self._touched, self.owner = True, time.time(), dict(self._me)
                return True
        return False

    def clear_stale(self) -> bool:
        """Remove a claim whose owner is gone (e.g. killed between writing its work and
        releasing the claim), so that no lock outlives the work; True if one was removed."""
        if self.held or not self.path.exists():
            return False
        owner = self.read()
        if not self.stale(owner):
            return False
        self._break(owner)
        return not self.path.exists()

    def _break(self, seen: Mapping[str, Any]) -> None:
        """Remove the stale claim ``seen`` if it still is that one and still stale, holding the
        gate, so that no breaker moves a claim another has just retaken; a breaker already at
        it (a live gate) is left to it: the claim will be free when our caller tries again."""
        refuse_link(self.path)  # it reads as a claim without an owner: stale, and removed
        gate = self.path.with_name(f".{self.path.name}{GATE}")
        mine = me()
        with _drafted(gate, mine) as draft:
            for _ in range(2):  # the second try follows the removal of a dead breaker's gate
                try:
                    _place(draft, gate)
                    break
                except FileExistsError:
                    held = _owner_of(gate)
                    age = _age(gate)
                    if age is not None and not _stale(held, age, self.gate_stale_s):
                        return
                    _remove_if(gate, held)
            else:
                return
        try:
            if self.stale(seen):  # its owner may have beaten again since it was seen
                _remove_if(self.path, seen)
        finally:
            _remove_if(gate, mine)  # not if a peer took it over from us as stale

    def heartbeat(self) -> None:
        """Refresh the mtime (at most every ``heartbeat_s``) so no one takes the claim over."""
        now = time.time()
        if self.held and now - self._touched > self.heartbeat_s:
            with contextlib.suppress(OSError):
                os.utime(self.path)
            self._touched = now

    def release(self) -> None:
        """Drop the claim if it is still ours (a peer may have taken over a hung process's)."""
        if self.held and self.read() == self.owner:
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)
        self.held = False


def heartbeat_every(stale_after: float) -> float:
    """Seconds between a claim's heartbeats: often enough that a live one never looks stale."""
    return min(30.0, stale_after / 5)


def held_by(path: Path, pids: Collection[int], here: Mapping[str, Any]) -> dict[str, Any] | None:
    """The owner of the claim at ``path`` when one of ``pids`` on the machine of ``here`` (`me`)
    holds it (a caller's worker processes, whose slide the caller watches); None when the claim
    is not theirs (none yet, or a peer's)."""
    owner = _owner_of(path)
    if owner.get("pid") not in pids or any(owner.get(k) != here[k] for k in ("host", "machine")):
        return None
    return owner


def beat(path: Path, every: float) -> None:
    """Refresh the heartbeat of the claim at ``path`` once it is older than ``every`` s: done by
    the process that watches its owner, a worker busy in a slide reader that beats nothing."""
    age = _age(path)
    if age is not None and age > every:
        with contextlib.suppress(OSError):  # gone meanwhile: released, or taken over as stale
            os.utime(path)
