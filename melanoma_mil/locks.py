"""Advisory locks (`flock`) that the kernel releases when their process dies, even by SIGKILL:
how processes sharing a folder (fold-parallel CV, sweep processes, SLURM array tasks) take turns.
A file system mounted without locks is refused in one line naming the folder (`flock`)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from melanoma_mil.errors import UserError
from melanoma_mil.fsutil import NOFOLLOW, UMASK

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent writers are not supported there
    fcntl = None  # type: ignore[assignment]

# flock on a file system mounted without locks: Lustre without -o flock or localflock (ENOSYS),
# NFS without a lock manager (ENOLCK), some CIFS and FUSE mounts (EOPNOTSUPP, EINVAL)
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL)


def flock(fd: int, op: int, folder: str | os.PathLike[str], key: str = "", name: str = "") -> None:
    """`fcntl.flock` of ``fd``, a file in ``folder``. A file system mounted without locks
    (`NO_LOCKS`) raises the one-line UserError naming ``folder``, the fix, and ``key``, the
    config key that chose the folder, where the caller knows it (``name``: how the message names
    a folder that key only places, default ``key``): processes sharing a folder cannot take
    turns there, and a traceback would not say why."""
    try:
        fcntl.flock(fd, op)
    except OSError as e:
        if e.errno not in NO_LOCKS:
            raise
        label = name or key
        where = f"{label} " if label else ""
        other = f"set {key} to a folder" if key else "use a folder"
        raise UserError(
            f"{where}'{folder}': this filesystem does not support file locks (flock: "
            f"{e.strerror}); mount it with -o flock, or {other} on a local or lock-capable disk."
        ) from None


def check_locks(fd: int, folder: str | os.PathLike[str], key: str, name: str = "") -> None:
    """Refuse, before any work, ``folder`` (chosen by ``key``, named ``name`` as in `flock`) if
    its file system has no locks, probed on ``fd``, an open file there: a command would meet
    that only at its first lock, with the folder and files made and maybe work done."""
    if fcntl is not None:
        flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, folder, key, name)


class Lock:
    """An exclusive advisory lock on a file, held until ``release`` or the process ends."""

    def __init__(self, fd: int | None, folder: Path) -> None:
        self._fd = fd
        self._folder = folder  # named if its file system turns out to have no locks

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def share(self) -> None:
        """Let others hold the lock too (`shared_lock`), this process still among them."""
        if self._fd is not None and fcntl is not None:
            flock(self._fd, fcntl.LOCK_SH, self._folder)


def _open_lock(path: Path) -> int:
    """The lock file at ``path``, created if missing, never through a link: one planted there
    would have us make a file where it points, outside the output folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o666 & ~UMASK)
    except OSError:
        refuse_link(path)
        raise


def refuse_link(path: Path) -> None:
    """A one-line refusal of a symbolic link where a lock or claim file goes."""
    if path.is_symlink():
        raise UserError(
            f"'{path}' is a symbolic link where a lock file goes (to '{os.readlink(path)}'); "
            "remove the link: only this program makes files there."
        )


def try_lock(path: Path) -> Lock | None:
    """The lock on ``path`` (created if missing), or None when another process holds it."""
    fd = _open_lock(path)
    if fcntl is None:
        return Lock(fd, path.parent)
    try:
        flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, path.parent)
    except BaseException as e:
        os.close(fd)
        if isinstance(e, OSError) and e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return None
        raise
    return Lock(fd, path.parent)


def shared_lock(path: Path) -> Lock:
    """A lock on ``path`` that any number of processes hold together, waiting while one holds
    it alone (`try_lock`): a process that finds none of the others can act for all of them."""
    fd = _open_lock(path)
    if fcntl is not None:
        try:
            flock(fd, fcntl.LOCK_SH, path.parent)
        except BaseException:
            os.close(fd)
            raise
    return Lock(fd, path.parent)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the lock on ``path`` for a block, waiting for other holders first."""
    fd = _open_lock(path)
    try:
        if fcntl is not None:
            flock(fd, fcntl.LOCK_EX, path.parent)
        yield
    finally:
        os.close(fd)
