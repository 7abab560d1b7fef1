"""The records ``Registry.resolve`` returns, kept per thread until the catalog changes.

Every request resolves its model: two or three queries, then a record built from the row
(three JSON documents decoded, paths joined), 28 us a call on the 2-core VM, and each query
lets go of the interpreter lock and must take it back from the model thread. A memo answers
from a dict after one ``PRAGMA data_version`` (4 us), which changes for a connection
whenever any other connection commits, in this process or another. Readers keep one
connection per thread and every write uses a connection of its own, so every change is seen
by the next read, as the catalog promises.
"""

import sqlite3
import threading
from typing import Any

_MAX_ENTRIES = 4096  # per thread; emptied whole when full


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
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        memo: dict[Any, Any] | None = getattr(local, "entries", None)
        if memo is None or version != local.version or len(memo) >= self._max_entries:
            memo = local.entries = {}
            local.version = version
        return memo
