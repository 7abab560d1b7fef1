"""The SQLite catalog: tenants, API key hashes, base models, adapter versions, latest pointers.

Each call opens its own connection (cheap next to the work it guards), which makes the catalog
safe to use from several threads without a shared lock, and lets several processes share one
catalog through SQLite's own locking: WAL mode, so readers never wait for the writer, writes inside
``BEGIN IMMEDIATE`` so a transaction takes the write lock before it reads what it will change,
and a busy timeout so contenders queue rather than fail.

The `Catalog` also keeps one idle connection open until `close`. In WAL mode SQLite checkpoints the
log into the database and deletes it whenever the last connection to it closes, which would make
every per-call connection pay a checkpoint (and its fsyncs) on close; the idle connection keeps
the log in place, so commits append to it and checkpoints run every ~1,000 pages as usual.

`synchronous = FULL` (the default) fsyncs the log at every commit; a catalog made with
`is_durable` False uses OFF: a crash of the process still loses nothing committed, but an OS crash
or power loss may drop the latest commits or even corrupt the file (SQLite's documented trade).

The functions below take an open connection, so one transaction can span several of them.
"""

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from registry import deletion, pointers, read_memo
from registry.errors import NotFound, RegistryError
from registry.records import AdapterRecord

# 2: the latest pointer and promotion history (pointers.py); opening a version-1 catalog backfills
# 3: deleted_versions (deletion.py), which keeps deleted version numbers from being reused
SCHEMA_VERSION = 3
# how long truncating the log after a delete waits for readers to finish
_CHECKPOINT_WAIT_MS = 200
_POINTERS_SINCE = 2
_MAX_INTEGER = 2**63 - 1  # SQLite's largest INTEGER
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS tenants (
        name TEXT PRIMARY KEY,
        created_at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS api_keys (
        key_sha256 TEXT PRIMARY KEY,
        tenant TEXT NOT NULL REFERENCES tenants(name),
        created_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS api_keys_by_tenant ON api_keys(tenant)",
    """CREATE TABLE IF NOT EXISTS base_models (
        sha256 TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        registered_at REAL NOT NULL
    )""",
    # base_sha256 is deliberately not a foreign key: an adapter may be published before
    # anyone registers its base, and dependents() must still find it.
    """CREATE TABLE IF NOT EXISTS adapters (
        tenant TEXT NOT NULL REFERENCES tenants(name),
        name TEXT NOT NULL,
        version INTEGER NOT NULL CHECK (version >= 1),
        content_sha256 TEXT NOT NULL,
        base_sha256 TEXT NOT NULL,
        rank INTEGER NOT NULL,
        labels_json TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        metrics_json TEXT NOT NULL,
        manifest_json TEXT NOT NULL,
        rel_path TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (tenant, name, version)
    )""",
    "CREATE INDEX IF NOT EXISTS adapters_by_base ON adapters(base_sha256)",
    # per-tenant scheduling overrides (weight, budgets) as JSON: the registry stores them,
    # the engine interprets them and polls updated_at to apply changes without a restart
    """CREATE TABLE IF NOT EXISTS tenant_settings (
        tenant TEXT PRIMARY KEY REFERENCES tenants(name),
        settings_json TEXT NOT NULL,
        updated_at REAL NOT NULL
    )""",
    *pointers.SCHEMA,
    *deletion.SCHEMA,
)
_ADAPTER_COLUMNS = (
    "tenant, name, version, content_sha256, base_sha256, rank, labels_json, size_bytes, "
    "metrics_json, manifest_json, rel_path, created_at"
)
# adapters rows (alias a) with is_latest: whether the name's latest pointer names the row
_SELECT_ADAPTERS = (
    "SELECT "
    + ", ".join(f"a.{column}" for column in _ADAPTER_COLUMNS.split(", "))
    + f", {pointers.IS_LATEST_SQL} AS is_latest FROM adapters a "
    "LEFT JOIN latest_pointers p ON p.tenant = a.tenant AND p.name = a.name"
)


class Catalog:
    """Opens connections to the catalog file; creates the schema on first use. Call `close`."""

    def __init__(self, path: Path, busy_timeout_s: float, *, is_durable: bool = True) -> None:
        self._path = path
        self._busy_timeout_s = busy_timeout_s
        self._synchronous = "FULL" if is_durable else "OFF"
        # one read connection per thread, kept open: opening one (connect and two pragmas)
        # cost more than the query itself (authenticate 146 us a call, resolve 243 us)
        self._local = threading.local()
        self._readers: dict[threading.Thread, sqlite3.Connection] = {}
        self._readers_lock = threading.Lock()
        self._idle_conn: sqlite3.Connection | None = None
        self.changes: read_memo.ChangeSignal | None = None  # made below, for the memos
        try:
            # Never used after this, so sharing it across threads (for close) is safe.
            self._idle_conn = self._open(check_same_thread=False)
            # Asking first avoids taking the lock a mode change needs when WAL is already on.
            if self._idle_conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                self._idle_conn.execute("PRAGMA journal_mode = WAL")
            # rewritten after every commit: read memos compare it without a system call; made
            # once the catalog's file exists, to take its mode
            self.changes = read_memo.ChangeSignal(path.with_name(path.name + "-changes"), like=path)
            with self.write() as conn:
                _migrate(conn)
            # A read opens the log for this connection, which keeps it open (a pragma does not).
            self._idle_conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as exc:  # not a database, a directory, unreadable...
            self.close()
            raise RegistryError(f"cannot open the registry's catalog {path}: {exc}") from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close every connection (the last one out checkpoints the log); idempotent. Call it
        when no thread reads any more."""
        with self._readers_lock:
            readers, self._readers = list(self._readers.values()), {}
        for conn in readers:
            conn.close()
        if self._idle_conn is not None:
            self._idle_conn.close()
            self._idle_conn = None
        if self.changes is not None:
            self.changes.close()

    def reader(self) -> sqlite3.Connection:
        """This thread's autocommit read connection, opened on its first read and kept.

        Autocommit: each statement reads the latest committed state (WAL), so a kept
        connection never serves a stale snapshot once its statements are done.
        """
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # used by this thread only; not checked so that close() may run on another
            conn = self._open(check_same_thread=False)
            with self._readers_lock:
                # threads come and go (executor pools): close what ended ones left behind
                ended = [t for t in self._readers if not t.is_alive()]
                for thread in ended:
                    self._readers.pop(thread).close()
                self._readers[threading.current_thread()] = conn
            self._local.conn = conn
        return conn

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """`reader()` as a context, for the reads that are not on every request's path."""
        yield self.reader()

    @contextmanager
    def _fresh(self) -> Iterator[sqlite3.Connection]:
        conn = self._open(check_same_thread=True)
        try:
            yield conn
        finally:
            conn.close()

    def _open(self, *, check_same_thread: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path,
            timeout=self._busy_timeout_s,
            isolation_level=None,
            check_same_thread=check_same_thread,
        )
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            # deleted rows (a deleted tenant's keys, labels, metrics) are overwritten with
            # zeros rather than left in free space, where a copy of the file would keep them
            conn.execute("PRAGMA secure_delete = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def truncate_log(self) -> bool:
        """Copy the write-ahead log into the catalog and empty it, so that it keeps no older
        page images (a deletion's rows); False when a reader held it and it stays as it was."""
        with self._fresh() as conn:
            # a checkpoint that waits for readers holds every writer of every process back
            # meanwhile: past a moment it gives up, and a later one copies the log
            conn.execute(f"PRAGMA busy_timeout = {_CHECKPOINT_WAIT_MS}")
            busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        return not busy

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A connection inside ``BEGIN IMMEDIATE``: committed on normal exit, rolled back on error.

        The body may commit early itself (``conn.commit()``) to act on a failed commit.
        """
        with self._fresh() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                try:
                    yield conn
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                if conn.in_transaction:
                    conn.execute("COMMIT")
            finally:  # after any commit (the body's own too), before returning (read_memo.py)
                if self.changes is not None:
                    self.changes.signal()


def _migrate(conn: sqlite3.Connection) -> None:
    """Create what is missing and upgrade an older catalog; call in a write transaction."""
    found_version = conn.execute("PRAGMA user_version").fetchone()[0]
    if found_version > SCHEMA_VERSION:  # it may rely on rows this version would not keep
        raise RegistryError(
            f"the catalog has schema {found_version}, newer than this graft's "
            f"{SCHEMA_VERSION}: upgrade graft to open it"
        )
    for statement in _SCHEMA:
        conn.execute(statement)
    if found_version < _POINTERS_SINCE:
        pointers.backfill(conn)
    deletion.upgrade(conn)
    if found_version < SCHEMA_VERSION:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def insert_tenant(conn: sqlite3.Connection, tenant: str, created_at: float) -> bool:
    """Add `tenant`; False if it exists already."""
    cursor = conn.execute(
        "INSERT INTO tenants (name, created_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
        (tenant, created_at),
    )
    return cursor.rowcount == 1


def has_tenant(conn: sqlite3.Connection, tenant: str) -> bool:
    return conn.execute("SELECT 1 FROM tenants WHERE name = ?", (tenant,)).fetchone() is not None


def require_tenant(conn: sqlite3.Connection, tenant: str, created_at: float | None = None) -> None:
    """Raise NotFound unless `tenant` exists; with `created_at`, unless it is that tenant and not
    one deleted and created again under its name since."""
    row = conn.execute("SELECT created_at FROM tenants WHERE name = ?", (tenant,)).fetchone()
    if row is None or (created_at is not None and row[0] != created_at):
        raise NotFound(f"tenant {tenant!r} not found")


def list_tenants(conn: sqlite3.Connection) -> list[str]:
    return [row["name"] for row in conn.execute("SELECT name FROM tenants ORDER BY name")]


def insert_key(conn: sqlite3.Connection, key_sha256: str, tenant: str, created_at: float) -> None:
    conn.execute(
        "INSERT INTO api_keys (key_sha256, tenant, created_at) VALUES (?, ?, ?)",
        (key_sha256, tenant, created_at),
    )


def delete_keys(conn: sqlite3.Connection, tenant: str) -> int:
    """Delete every key of `tenant`; return how many there were."""
    return conn.execute("DELETE FROM api_keys WHERE tenant = ?", (tenant,)).rowcount


def delete_key(conn: sqlite3.Connection, tenant: str, key_sha256: str) -> bool:
    """Delete one of `tenant`'s keys by its hash; whether it was one."""
    query = "DELETE FROM api_keys WHERE key_sha256 = ? AND tenant = ?"
    return conn.execute(query, (key_sha256, tenant)).rowcount > 0


def tenant_for_key(conn: sqlite3.Connection, key_sha256: str) -> str | None:
    row = conn.execute("SELECT tenant FROM api_keys WHERE key_sha256 = ?", (key_sha256,)).fetchone()
    return None if row is None else row["tenant"]


def upsert_base(conn: sqlite3.Connection, sha256: str, name: str, registered_at: float) -> None:
    """Record base model `sha256` under `name`; registering again updates the name only."""
    conn.execute(
        "INSERT INTO base_models (sha256, name, registered_at) VALUES (?, ?, ?) "
        "ON CONFLICT (sha256) DO UPDATE SET name = excluded.name",
        (sha256, name, registered_at),
    )


def next_version(conn: sqlite3.Connection, tenant: str, name: str) -> int:
    """The version a new publish of `tenant/name` gets, after every version it ever had
    (deleted ones too); call under the write lock."""
    row = conn.execute(
        "SELECT COALESCE(MAX(version), 0) + 1 FROM adapters WHERE tenant = ? AND name = ?",
        (tenant, name),
    ).fetchone()
    return max(int(row[0]), (deletion.highest_deleted(conn, tenant, name) or 0) + 1)


def insert_adapter(conn: sqlite3.Connection, record: AdapterRecord, rel_path: str) -> None:
    """Add the catalog row for `record`, whose directory is `rel_path` under the root."""
    conn.execute(
        f"INSERT INTO adapters ({_ADAPTER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            record.tenant,
            record.name,
            record.version,
            record.content_sha256,
            record.base_sha256,
            record.rank,
            json.dumps(list(record.labels)),
            record.size_bytes,
            json.dumps(record.metrics, sort_keys=True),
            json.dumps(record.manifest, sort_keys=True),
            rel_path,
            record.created_at,
        ),
    )


def select_adapter(
    conn: sqlite3.Connection, root: Path, tenant: str, name: str, version: int | None
) -> AdapterRecord | None:
    """The given version of `tenant/name` (the latest if `version` is None), or None."""
    if version is None:
        version = pointers.latest(conn, tenant, name)
        if version is None:
            return None
    if not 0 < version <= _MAX_INTEGER:  # no row holds it, and SQLite cannot even bind it
        return None
    row = conn.execute(
        f"{_SELECT_ADAPTERS} WHERE a.tenant = ? AND a.name = ? AND a.version = ?",
        (tenant, name, version),
    ).fetchone()
    return None if row is None else _record(root, row)


def has_adapter(conn: sqlite3.Connection, tenant: str, name: str, version: int) -> bool:
    row = conn.execute(
        "SELECT 1 FROM adapters WHERE tenant = ? AND name = ? AND version = ?",
        (tenant, name, version),
    ).fetchone()
    return row is not None


def highest_version(conn: sqlite3.Connection, tenant: str, name: str) -> int | None:
    row = conn.execute(
        "SELECT MAX(version) FROM adapters WHERE tenant = ? AND name = ?", (tenant, name)
    ).fetchone()
    return row[0]


def select_tenant_adapters(
    conn: sqlite3.Connection, root: Path, tenant: str
) -> list[AdapterRecord]:
    rows = conn.execute(
        f"{_SELECT_ADAPTERS} WHERE a.tenant = ? ORDER BY a.name, a.version",
        (tenant,),
    )
    return [_record(root, row) for row in rows]


def select_dependents(
    conn: sqlite3.Connection, root: Path, base_sha256: str
) -> list[AdapterRecord]:
    rows = conn.execute(
        f"{_SELECT_ADAPTERS} WHERE a.base_sha256 = ? ORDER BY a.tenant, a.name, a.version",
        (base_sha256,),
    )
    return [_record(root, row) for row in rows]


def adapter_versions(conn: sqlite3.Connection) -> set[tuple[str, str, int]]:
    """Every (tenant, name, version) in the catalog."""
    rows = conn.execute("SELECT tenant, name, version FROM adapters")
    return {(row["tenant"], row["name"], row["version"]) for row in rows}


def _record(root: Path, row: sqlite3.Row) -> AdapterRecord:
    return AdapterRecord(
        tenant=row["tenant"],
        name=row["name"],
        version=row["version"],
        content_sha256=row["content_sha256"],
        base_sha256=row["base_sha256"],
        rank=row["rank"],
        labels=tuple(json.loads(row["labels_json"])),
        size_bytes=row["size_bytes"],
        metrics=json.loads(row["metrics_json"]),
        manifest=json.loads(row["manifest_json"]),
        path=root / row["rel_path"],
        created_at=row["created_at"],
        is_latest=bool(row["is_latest"]),
    )
