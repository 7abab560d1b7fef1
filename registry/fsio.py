"""Low-level file operations the store needs to be crash-safe and to refuse unsafe files.

Every open here refuses symlinks (``O_NOFOLLOW``) and anything that is not a regular file, checked
on the open descriptor, so a file swapped for a link between listing and reading is still refused.
Durability follows the usual recipe: fsync the file, then fsync the directory holding its name.
The writers take `is_durable`; False skips the fsync (a scratch registry, see `Registry`), which
changes what survives a power loss but not what other processes see.
"""

import errno
import fcntl
import hashlib
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

_COPY_CHUNK_BYTES = 1 << 20
# O_NONBLOCK keeps an open of a FIFO from hanging; it changes nothing for regular files.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Stored files are read-only: versions are immutable, and this makes accidental edits fail loudly.
_STORED_FILE_MODE = 0o444


class NotRegularFile(OSError):
    """A path that is a symlink, directory, FIFO... where a regular file was required."""


def open_regular(path: Path) -> BinaryIO:
    """Open `path` for reading; raise NotRegularFile unless it is a regular file (not a symlink).

    FileNotFoundError passes through unchanged.
    """
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise NotRegularFile(f"{path.name} is a symlink") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # before fdopen, which refuses a directory
        os.close(fd)
        raise NotRegularFile(f"{path.name} is not a regular file")
    return os.fdopen(fd, "rb")


def copy_synced(source: Path, target: Path, *, is_durable: bool = True) -> tuple[str, int]:
    """Copy `source` to the new file `target`, fsync it; return (hex SHA-256, size in bytes).

    The hash is computed over the bytes written, in the same pass, so it describes the copy.
    With `is_durable` False the fsync is skipped.
    """
    digest = hashlib.sha256()
    num_bytes = 0
    with open_regular(source) as reader, _create(target) as writer:
        while chunk := reader.read(_COPY_CHUNK_BYTES):
            digest.update(chunk)
            writer.write(chunk)
            num_bytes += len(chunk)
        _finish(writer, is_durable)
    return digest.hexdigest(), num_bytes


def write_synced(target: Path, data: bytes, *, is_durable: bool = True) -> None:
    """Write `data` to the new file `target` and fsync it (unless `is_durable` is False)."""
    with _create(target) as writer:
        writer.write(data)
        _finish(writer, is_durable)


def _finish(writer: BinaryIO, is_durable: bool) -> None:
    writer.flush()
    if is_durable:
        os.fsync(writer.fileno())


def _create(target: Path) -> BinaryIO:
    return os.fdopen(os.open(target, _CREATE_FLAGS, _STORED_FILE_MODE), "wb")


def fsync_dir(path: Path) -> None:
    """Make the names in directory `path` (created, renamed, removed) durable."""
    fd = _open_dir(path)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Remove directory `path` and its contents; a missing path is fine, other failures are logged.

    Used on cleanup paths, where raising would hide the error that caused the cleanup; whatever
    stays behind is found and removed the next time a registry opens this root.
    """
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        logger.warning("could not remove %s: %s", path, error)


def prune_empty_dirs(start: Path, stop: Path) -> None:
    """Remove `start` and then its parents while they are empty, never removing `stop` itself."""
    path = start
    while path != stop and path.is_relative_to(stop):
        try:
            path.rmdir()
        except OSError:
            return
        path = path.parent


def lock_dir(path: Path) -> int:
    """Open directory `path` and take an exclusive ``flock`` on it, waiting; return the descriptor.

    The lock lasts until the descriptor is closed or its process dies, whatever way it dies:
    that is what tells a live writer's directory from a crashed one's.
    """
    fd = _open_dir(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def try_lock_dir(path: Path) -> int | None:
    """Like `lock_dir`, but return None at once if another descriptor holds the lock."""
    fd = _open_dir(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_dir(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) for tenants' data: a directory graft creates is
    its owner's alone (0700). One that exists keeps its mode, the operator's choice, but open
    to every local user it gets a warning, since stored versions hold tenants' texts."""
    if not path.exists():
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)  # mkdir's mode is cut by the umask, never widened
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o007:
        logger.warning(
            "%s is open to every local user (mode %04o), and so are the tenants' texts and "
            "weights under it: chmod o-rwx %s",
            path,
            mode,
            path,
        )
