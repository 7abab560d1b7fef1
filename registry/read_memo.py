"""The records ``Registry.resolve`` returns, kept per thread until the catalog changes.

Every request resolves its model and authenticates its key: queries, then a record built from
the row (three JSON documents decoded, paths joined), 28 us a call on the 2-core VM, and each
query lets go of the interpreter lock and must take it back from the model thread. A memo
answers from a dict while the catalog has not changed.

How a reader learns of a change without a system call: every commit by graft, in any process,
then rewrites the eight bytes of a file beside the catalog (``ChangeSignal``) with fresh random
ones, and readers map that file and compare it with what they saw before they filled the memo.
A commit after a reader's query signals after it, so the reader finds the bytes changed. The
check used to be ``PRAGMA data_version``, once per turn of the event loop: it lets go of the
interpreter lock and must take it back from the model thread, and it left a turn that blocked
on another process's commit reading from before it for up to 1 ms. Four reads a turn beside a
busy model thread took 3.9 us each with that check, 2.2 us with the signal (ad hoc, in the
commit that made the change).

``PRAGMA data_version`` (which changes for a connection whenever any other connection commits)
still runs every ``BACKSTOP_S``: a commit whose writer died before it signalled, or made by a
program that does not signal, is seen within that. Without a signal file (one that could not be
opened), every read checks the pragma.
"""

import contextlib
import logging
import mmap
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_MAX_ENTRIES = 4096  # per thread; emptied whole when full
BACKSTOP_S = 0.05  # a memo checks the catalog itself at least this often
_SIGNAL_BYTES = 8


class ChangeSignal:
    """Eight bytes in a file that every catalog commit rewrites, after the commit, with fresh
    random ones: mapped into memory, a reader compares them with no system call.

    The file takes the catalog's mode and owner, as SQLite's own -wal and -shm files do, so
    that every account that may write the catalog may signal too. A process that may only
    read it still reads the signal, but its own commits reach other processes' memos through
    their ``BACKSTOP_S`` check alone (a warning says so).
    """

    def __init__(self, path: Path, *, like: Path) -> None:
        self._path = path
        self._lock = threading.Lock()  # close() must not free the fd under signal()
        self._fd: int | None = None  # for signalling; None where this process may not
        self._map: mmap.mmap | None = None
        try:
            fd, writable = _open_signal(path, like)
        except OSError as exc:
            log.warning("catalog change signal %s unavailable (%s): reads check SQLite", path, exc)
            return
        try:
            if writable and os.fstat(fd).st_size < _SIGNAL_BYTES:  # new: two may write, fine
                os.pwrite(fd, os.urandom(_SIGNAL_BYTES), 0)
            self._map = mmap.mmap(fd, _SIGNAL_BYTES, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            log.warning("catalog change signal %s unreadable (%s): reads check SQLite", path, exc)
        if writable:
            self._fd = fd  # kept even when the map failed: other processes read it
        else:
            os.close(fd)  # the map holds its own reference
            log.warning(
                "catalog change signal %s is read-only here: this process's commits reach "
                "other processes within %.0f ms, not at once",
                path,
                BACKSTOP_S * 1000,
            )

    def read(self) -> bytes | None:
        """The current bytes; None when there is no signal (every read must check)."""
        try:
            return self._map[:_SIGNAL_BYTES] if self._map is not None else None
        except ValueError:  # closed
            return None

    def signal(self) -> None:
        """Call after every commit (or a write that may have committed), before returning.
        Never raises: the commit it follows stands, and the backstop covers a lost signal."""
        with self._lock:
            if self._fd is None:
                return
            try:
                os.pwrite(self._fd, os.urandom(_SIGNAL_BYTES), 0)
            except OSError as exc:
                log.warning("catalog change signal %s not written: %s", self._path, exc)

    def close(self) -> None:
        with self._lock:
            if self._map is not None:
                self._map.close()
            if self._fd is not None:
                os.close(self._fd)
            self._map = self._fd = None


def _open_signal(path: Path, like: Path) -> tuple[int, bool]:
    """The signal file's descriptor, and whether it is open for writing. A new file takes
    ``like``'s mode (whatever the umask) and, for root, its owner."""
    try:
        made_like = os.stat(like)
    except FileNotFoundError:
        made_like = None
    mode = stat.S_IMODE(made_like.st_mode) if made_like is not None else 0o644
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        try:
            return os.open(path, os.O_RDWR), True
        except PermissionError:
            return os.open(path, os.O_RDONLY), False
    with contextlib.suppress(OSError):  # best effort, as SQLite's
        os.fchmod(fd, mode)
        if made_like is not None and os.geteuid() == 0:
            os.fchown(fd, made_like.st_uid, made_like.st_gid)
    return fd, True


class ReadMemo:
    """One dict per thread, tied to that thread's kept read connection (``data_version``
    counts per connection), emptied when ``signal``'s bytes or the data version change."""

    def __init__(
        self, signal: ChangeSignal | None = None, *, max_entries: int = _MAX_ENTRIES
    ) -> None:
        self._signal = signal
        self._max_entries = max_entries
        self._local = threading.local()

    def entries(self, conn: sqlite3.Connection) -> dict[Any, Any]:
        """This thread's memo, emptied first if the catalog changed since it was filled;
        ``conn`` is this thread's kept read connection. Read the memo's misses after this
        call, never before: what this call saw must precede them."""
        local = self._local
        memo: dict[Any, Any] | None = getattr(local, "entries", None)
        seen = self._signal.read() if self._signal is not None else None
        now = time.monotonic()
        if (
            memo is not None
            and seen is not None
            and seen == local.seen
            and now - local.checked_s < BACKSTOP_S
            and len(memo) < self._max_entries
        ):
            return memo
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if (
            memo is None
            or version != local.version
            or seen != local.seen
            or len(memo) >= self._max_entries
        ):
            memo = local.entries = {}
        local.version, local.seen, local.checked_s = version, seen, now
        return memo
