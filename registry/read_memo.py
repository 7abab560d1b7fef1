"""The records ``Registry.resolve`` returns, kept per thread until the catalog changes.

Every request resolves its model: two or three queries, then a record built from the row
(three JSON documents decoded, paths joined), 28 us a call on the 2-core VM, and each query
lets go of the interpreter lock and must take it back from the model thread. A memo answers
from a dict after one ``PRAGMA data_version`` (4 us), which changes for a connection
whenever any other connection commits, in this process or another. Readers keep one
connection per thread and every write uses a connection of its own, so every change is seen
by the next read, as the catalog promises.

On an event loop the check itself was the cost: the pragma lets go of the interpreter lock,
and taking it back from a busy model thread made it 9% of the engine loop's time behind the
front ends (``benchmarks.server_profile --server-workers 1``). So one check answers the
other reads of the same turn of the loop, for at most ``SHARED_CHECK_S``. A turn runs what
was queued before it began, and the check queues the turn's end as it runs, so a request
queued after a commit reads after that end and checks again. A commit in this process (any
``Registry`` object) ends the sharing at once. Only code that blocks the loop to wait for
another process's commit could read from before it, and then for 1 ms at most.
"""

import asyncio
import sqlite3
import threading
import time
from typing import Any

_MAX_ENTRIES = 4096  # per thread; emptied whole when full
SHARED_CHECK_S = 0.001  # a turn's check answers its later reads for this long at most

_writes = 0  # commits by any catalog of this process; moves before the write returns
_writes_lock = threading.Lock()


def note_write() -> None:
    """Call after every commit (`Catalog.write`): ends every thread's shared check."""
    global _writes
    with _writes_lock:
        _writes += 1


class ReadMemo:
    """One dict per thread, tied to that thread's kept read connection (``data_version``
    counts per connection)."""

    def __init__(self, *, max_entries: int = _MAX_ENTRIES) -> None:
        self._max_entries = max_entries
        self._local = threading.local()

    def entries(self, conn: sqlite3.Connection) -> dict[Any, Any]:
        """This thread's memo, emptied first if the catalog changed since it was filled;
        ``conn`` is this thread's kept read connection."""
        local = self._local
        memo: dict[Any, Any] | None = getattr(local, "entries", None)
        if memo is not None and len(memo) < self._max_entries and _checked_this_turn(local):
            return memo
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if memo is None or version != local.version or len(memo) >= self._max_entries:
            memo = local.entries = {}
            local.version = version
        _note_check(local)
        return memo


def _checked_this_turn(local: threading.local) -> bool:
    """Whether a check earlier in this turn of this thread's event loop still answers."""
    loop = asyncio._get_running_loop()  # None outside a loop, where every read checks
    if loop is None or getattr(local, "open_loop", None) is not loop:
        return False
    return local.writes == _writes and time.monotonic() - local.checked_s < SHARED_CHECK_S


def _note_check(local: threading.local) -> None:
    loop = asyncio._get_running_loop()
    local.writes = _writes
    local.checked_s = time.monotonic()
    if loop is None:
        local.open_loop = None
    elif getattr(local, "open_loop", None) is not loop:
        local.open_loop = loop  # until this turn's end, queued now: after all queued so far
        loop.call_soon(_end_turn, local, loop)


def _end_turn(local: threading.local, loop: asyncio.AbstractEventLoop) -> None:
    if local.open_loop is loop:
        local.open_loop = None
