"""Replacing a whole folder so that readers see the old one or the new one, never a mix or nothing.

The new content is written into a hidden sibling ``.<name>.new-<pid>``, then swapped with
``<name>`` in one step by ``renameat2(RENAME_EXCHANGE)`` (Linux >= 3.15; ext4, xfs, btrfs,
tmpfs...), and the sibling, which now holds the old content, is removed. A kill before the swap
leaves the old folder and a stale sibling; after it, the new folder and a stale sibling; stale
siblings are removed by the next save into the same folder.

Where the exchange is not available (other systems, some network filesystems) the swap is two
renames with a journal: ``<name>`` -> ``.<name>.old``, then the new sibling -> ``<name>``. A kill
between them leaves no ``<name>`` but a complete ``.<name>.old``: :func:`resolve` (used by
``modapt.load``) reads it instead, and the next save renames it back (roll back) before
writing. Either way, at every instant the folder that ``load`` reads is one complete save.

Concurrent writers into one folder take an exclusive ``flock`` on ``.<name>.lock`` beside it
without waiting: the second one fails at once with :class:`FolderBusyError` (one wins whole).
The holder unlinks the lock file before releasing it (a waiter that opened the unlinked inode
notices and retries on the path), so nothing stays beside the folder.
Files in the old folder that the writer does not own (a Trainer's optimizer state, a README)
are hard-linked (or copied) into the new folder before the swap, so nothing else is lost.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import ModaptError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class FolderBusyError(ModaptError):
    """Another process is writing the same output folder."""


class FolderWriteError(ModaptError):
    """An output folder could not be written (disk full, read-only, file size limit...)."""


def _libc_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _libc_renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap the two existing paths ``a`` and ``b`` atomically; ``False`` when the system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _journal(directory: Path) -> Path:
    return directory.parent / f".{directory.name}.old"


def resolve(directory: str | os.PathLike) -> Path:
    """The folder a reader should read for ``directory``: itself, or its journal copy when a
    two-rename swap was killed between its renames (``directory`` missing, ``.<name>.old`` there)."""
    directory = Path(directory)
    if not directory.exists() and _journal(directory).is_dir():
        return _journal(directory)
    return directory


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _carry_over(old: Path, new: Path, owned: set[str]) -> None:
    for entry in old.iterdir():
        if entry.name in owned or (new / entry.name).exists():
            continue
        target = new / entry.name
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def _link_or_copy(src, dst) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def replace_folder(directory: str | os.PathLike, write: Callable[[Path], Iterable[str] | None], *,
                   owned: Iterable[str] = ()) -> Path:
    """Write a new ``directory`` with ``write(tmp_folder)`` and swap it in atomically; return its path.

    ``owned`` names the files of the old folder that the new content replaces (they are dropped
    even when ``write`` does not write them again); any other file of the old folder is kept.
    Raises :class:`FolderBusyError` when another writer holds the folder, and
    :class:`FolderWriteError` (one line) on an OS failure; the old folder is then intact.
    """
    directory = Path(directory)
    parent = directory.parent
    lock = parent / f".{directory.name}.lock"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        if directory.exists() and not directory.is_dir():
            raise FolderWriteError(f"{directory}: exists and is not a folder")
        lock_fd = _take_lock(lock, directory)
    except OSError as exc:
        raise FolderWriteError(f"{directory}: cannot be written: {exc.strerror or exc}") from None
    try:
        try:
            return _replace_locked(directory, write, set(owned))
        except OSError as exc:
            raise FolderWriteError(f"{directory}: cannot be written ({exc.strerror or exc}); "
                                   "the previous content is unchanged") from None
    finally:
        # unlink while still holding the lock, so no file is left beside the folder; a waiter
        # that opened the old inode sees it is no longer the lock file and takes a fresh one
        try:
            lock.unlink()
        except OSError:
            pass
        os.close(lock_fd)  # releases the flock


def _take_lock(lock: Path, directory: Path) -> int:
    """An fd holding an exclusive flock on ``lock`` (the file at that path now), or FolderBusyError."""
    for _ in range(100):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderBusyError(f"{directory}: another process is saving into this folder; "
                                  "nothing was written") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder before us unlinked this inode: take the lock file anew
    raise FolderBusyError(f"{directory}: the lock file {lock.name} keeps changing; nothing was written")


def _replace_locked(directory: Path, write, owned: set[str]) -> Path:
    parent, journal = directory.parent, _journal(directory)
    if journal.is_dir():  # a two-rename swap killed earlier: roll back, or drop the journal
        if not directory.exists():
            os.rename(journal, directory)
        else:
            shutil.rmtree(journal, ignore_errors=True)
    for stale in parent.glob(f".{directory.name}.new-*"):  # killed writers of this folder (we hold its lock)
        shutil.rmtree(stale, ignore_errors=True)
    new = parent / f".{directory.name}.new-{os.getpid()}"
    new.mkdir()
    try:
        written = write(new)
        if directory.is_dir():
            _carry_over(directory, new, owned | set(written or ()))
        _fsync_dir(new)
        if not directory.exists():
            os.rename(new, directory)
        elif exchange(new, directory):
            pass
        else:
            os.rename(directory, journal)
            os.rename(new, directory)
            new = journal
        _fsync_dir(parent)
    finally:
        shutil.rmtree(new, ignore_errors=True)
    return directory
