"""Filesystem steps beyond `io`'s atomic files: their temp files, create-once, directory swaps
(advisory locks: `locks`).

Several processes (fold-parallel CV, SLURM array tasks) may share one output folder: a file
that must be made exactly once appears complete or not at all (a hard link of a finished temp
file), a unit of work is claimed with an advisory lock (`locks`), and a finished folder
replaces an old one with one atomic exchange where the filesystem supports it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import re
import secrets
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path

UMASK = os.umask(0)
os.umask(UMASK)
_RENAME_EXCHANGE = 2
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # not on Windows
# file systems whose permissions are the mount's, not the file's (FAT, exFAT; fusefat: ENOSYS)
_NO_MODES = (errno.ENOSYS, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP)
_NOT_WRITABLE = (errno.EACCES, errno.EROFS)  # a probe's errors that say a folder is read-only


def shareable(path: str | os.PathLike[str] | int, mode: int = 0o666 & ~UMASK) -> None:
    """Give a temp file (mkstemp makes 0600; ``path`` may be its descriptor) the mode of a file
    made as usual, 0666 less the umask, so results are as shareable as the user's other files;
    a file system that keeps no modes (FAT) is left as it is: a failed chmod failed every write
    there."""
    try:
        os.chmod(path, mode)
    except OSError as e:
        if e.errno not in _NO_MODES:
            raise


def read_proc(path: str) -> str:
    """A small /proc file's text, stripped; '' where it cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def machine_id() -> str:
    """Boot id + pid namespace: equal only where a pid means the same process."""
    with contextlib.suppress(OSError):
        ns = os.readlink("/proc/self/ns/pid")
        return f"{read_proc('/proc/sys/kernel/random/boot_id')}:{ns}"
    return ""


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs in this pid namespace (another user's process counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# `new_temp`'s names: ``.<target>.<machine>-<pid>-<random>.tmp``, or ``.<target>.<random>.tmp``
# (mkstemp's random part: lower-case letters, digits, underscores)
TEMP_NAME = re.compile(
    r"\.(?P<target>.+)\.(?:(?P<machine>[0-9a-f]{10})-(?P<pid>\d+)-)?[a-z0-9_]+\.tmp"
)


@functools.cache
def _machine_tag() -> str | None:
    """`machine_id` as 10 hex digits for temp names (a forked child shares it), None where it
    is incomplete: without the boot id every host's first pid namespace looks alike, so a pid
    could be another host's."""
    machine = machine_id()
    if not machine or machine.startswith(":"):
        return None
    return hashlib.blake2b(machine.encode(), digest_size=5).hexdigest()


def new_temp(path: Path) -> tuple[int, str]:
    """Open a temp file beside ``path`` for writing it: ``.<name>.<machine>-<pid>-<random>.tmp``,
    which names its writer, so that the temps of this file that dead writers on this machine
    left (killed before their rename) are removed first (`_remove_dead_temps`). Where that name
    is too long, or the machine unknown (no /proc), ``.<name>.<random>.tmp``, never removed here.

    Errors name ``path`` (a read-only folder), not the temp name mkstemp tried, unless it is the
    temp name that is too long."""
    machine = _machine_tag()
    prefix = f".{path.name}."
    try:
        if machine is not None:
            _remove_dead_temps(path, machine)
            try:
                return tempfile.mkstemp(
                    prefix=f"{prefix}{machine}-{os.getpid()}-", suffix=".tmp", dir=path.parent
                )
            except OSError as e:
                if e.errno != errno.ENAMETOOLONG:
                    raise
        return tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


def _remove_dead_temps(path: Path, machine: str) -> None:
    """Remove the temp files of ``path`` whose writer ran on this machine (boot and pid
    namespace) and is gone. A live writer's is kept, as is one whose pid a new process took
    (kept until that one ends), and any other machine's: its pid means nothing here."""
    prefix = f".{path.name}.{machine}-"
    try:
        names = [name for name in os.listdir(path.parent) if name.startswith(prefix)]
    except OSError:  # no folder yet, or one that cannot be listed: nothing to clean
        return
    for name in names:  # listed before the check: a temp made after it is not looked at
        ours = TEMP_NAME.fullmatch(name)
        if ours is None or (ours["target"], ours["machine"]) != (path.name, machine):
            continue
        if not pid_alive(int(ours["pid"])):
            with contextlib.suppress(OSError):  # renamed or removed meanwhile
                os.unlink(path.parent / name)


def create_once(path: Path, data: bytes) -> bool:
    """Write ``path`` only if it does not exist, complete or not at all; True if this call made it.

    Racing callers: exactly one wins, the others see the winner's complete file. The temp file
    is left if the process is killed, for the next call on this machine (`new_temp`); a cleaner
    (the holder of the folder's lock) may remove it too, even under a live call, which writes a
    new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        made = _link_new(path, data)
        if made is not None:
            return made
    raise OSError(errno.ENOENT, "temp file removed while linking it, three times", str(path))


def _link_new(path: Path, data: bytes) -> bool | None:
    """One try of `create_once`: None if its temp file was removed before the link."""
    fd, tmp = new_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        shareable(tmp)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except FileNotFoundError:
            return None
        except OSError as e:  # a filesystem without hard links: exclusive create instead
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
        try:
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(out, "wb") as f:
            f.write(data)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


@dataclass(frozen=True)
class Folding:
    """What a file system ignores when it looks a name up: letter case (macOS, Windows, SMB
    shares, FAT), and whether accents are composed or not (macOS)."""

    case: bool
    form: bool


def name_folding(folder: str | os.PathLike[str]) -> Folding:
    """How the file system of ``folder`` looks names up, probed with a new file in it found by
    its other spelling, then removed. A folder not made yet is made for the probe (the command
    makes it anyway) and removed after if still empty: a kill between the probe's making and its
    removal leaves it there, never in a folder of the user's. A folder that cannot be written
    (or made) raises the OSError (EACCES, EROFS), naming it: the caller says so, not that names
    fold. A probe inconclusive otherwise (a name the file system cannot hold) counts as folding:
    the caller stays on the safe side."""
    where = Path(folder).absolute()
    for _ in range(3):  # another call may remove the folder it made, and so ours, mid-probe
        made: list[Path] = []
        try:
            _make_folders(where, made)
            return _probe(where)
        except FileNotFoundError:
            continue
        except OSError as e:
            if e.errno in _NOT_WRITABLE:
                raise
            break
        finally:
            for made_now in reversed(made):
                with contextlib.suppress(OSError):  # not empty: another call's, or a kill's
                    made_now.rmdir()
    return Folding(case=True, form=True)


def _make_folders(folder: Path, made: list[Path]) -> None:
    """Make ``folder`` and its missing parents, adding those this call made to ``made``,
    outermost first; one that cannot be made raises the OSError naming its parent."""
    missing: list[Path] = []
    while not folder.is_dir() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        try:
            new.mkdir()
        except FileExistsError:  # another call made it (or a file is there: the probe says)
            continue
        except OSError as e:
            if e.errno in _NOT_WRITABLE:
                raise OSError(e.errno, e.strerror, str(new.parent)) from None
            raise
        made.append(new)


def _probe(folder: Path) -> Folding:
    """`name_folding` of the existing ``folder``."""
    name = f".melanoma-mil-probe-{secrets.token_hex(8)}-Xy"  # Xy: letters, whatever the hex
    accented = f"{name}\u00e9"
    case = _found_as(folder / name, name.swapcase())  # ASCII: Linux vfat folds ASCII case alone
    try:
        form = _found_as(folder / accented, unicodedata.normalize("NFD", accented))
    except FileNotFoundError:
        raise
    except OSError:  # an ASCII name could be made: it is this name that cannot be
        form = True
    return Folding(case=case, form=form)


def _found_as(probe: Path, other: str) -> bool:
    """Whether a new file ``probe`` is found under the name ``other`` beside it (no link
    followed: the probe is made exclusively, and ``other`` looked up as itself)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW
    try:
        os.close(os.open(probe, flags, 0o600))
    except OSError as e:
        if e.errno in _NOT_WRITABLE:  # named by its folder: the name is ours
            raise OSError(e.errno, e.strerror, str(probe.parent)) from None
        if e.errno == errno.ENOENT:  # the folder is gone
            raise
        return True  # names it cannot hold (EPERM on FAT through FUSE)
    try:
        os.lstat(probe.parent / other)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    finally:
        probe.unlink(missing_ok=True)
    return True


def reserve(fd: int, size: int) -> bool:
    """Allocate the first ``size`` bytes of open file ``fd`` with the kernel's fallocate (Linux);
    False where the platform or file system has none (NFSv3, some FUSE mounts). Not
    os.posix_fallocate: glibc emulates that there by writing every block, slow for a store of
    many GB on a network disk."""
    try:
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return False
    fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    if fallocate(fd, 0, 0, size) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a))


def swap_dir(new: Path, final: Path, old: Path) -> None:
    """Put the finished folder ``new`` at ``final``; the previous ``final`` goes to ``old`` (the
    caller decides what of it to keep). With an atomic exchange, ``final`` always holds a
    complete folder; without one (e.g. NFS) there are two renames, and a crash between them is
    undone by `recover_dir`."""
    if _exchange(new, final):
        new.rename(old)
    else:
        final.rename(old)
        new.rename(final)


def recover_dir(new: Path, final: Path, old: Path, new_is_complete: bool) -> None:
    """Finish or undo a `swap_dir` that a crash interrupted between its two renames."""
    if final.exists() or not old.exists():
        return
    if new.exists() and new_is_complete:
        new.rename(final)
    else:
        old.rename(final)
