"""The per-name `latest` pointer and its promotion history, in the catalog.

`resolve(tenant, name)` without a version follows the pointer. Every move of it (a publish that
promotes, `promote`, `rollback`) updates the pointer row and the history in the caller's write
transaction, so readers see the old pointer or the new one, never a half-moved state.

- ``latest_pointers``: one row per (tenant, name) with the version served as latest. A NULL
  version means nothing was promoted yet (a first version published with ``promote=False``).
  No row at all means the highest version: catalogs from before pointers existed, and rows an
  older graft wrote, keep resolving exactly as they used to.
- ``promotions``: every promotion in order. Rollback marks the current one rolled back and moves
  the pointer to the version of the promotion before it, so repeated rollbacks walk back in time.

The functions take an open connection; write functions must run under the catalog's write lock.
"""

import itertools
import sqlite3

from registry.errors import NotFound

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS latest_pointers (
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER,
        updated_at REAL NOT NULL,
        PRIMARY KEY (tenant, name),
        FOREIGN KEY (tenant, name, version) REFERENCES adapters(tenant, name, version)
    )""",
    """CREATE TABLE IF NOT EXISTS promotions (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        promoted_at REAL NOT NULL,
        rolled_back_at REAL,
        FOREIGN KEY (tenant, name, version) REFERENCES adapters(tenant, name, version)
    )""",
    "CREATE INDEX IF NOT EXISTS promotions_by_name ON promotions(tenant, name, seq)",
)

# SQL for "this adapters row (alias a) is its name's latest version"; needs the pointer joined
# as p (LEFT JOIN latest_pointers p ON p.tenant = a.tenant AND p.name = a.name).
IS_LATEST_SQL = (
    "CASE WHEN p.tenant IS NULL THEN a.version = (SELECT MAX(m.version) FROM adapters m "
    "WHERE m.tenant = a.tenant AND m.name = a.name) ELSE a.version IS p.version END"
)


def backfill(conn: sqlite3.Connection) -> None:
    """Give names without a pointer one at their highest version, and a history in which every
    version was promoted when published (what the catalog meant before pointers existed).

    Run once when a catalog is upgraded, so `rollback` works on versions published before.
    """
    conn.execute(
        "INSERT INTO promotions (tenant, name, version, promoted_at) "
        "SELECT a.tenant, a.name, a.version, a.created_at FROM adapters a "
        "WHERE NOT EXISTS (SELECT 1 FROM latest_pointers p "
        "WHERE p.tenant = a.tenant AND p.name = a.name) "
        "ORDER BY a.tenant, a.name, a.version"
    )
    conn.execute(
        "INSERT INTO latest_pointers (tenant, name, version, updated_at) "
        "SELECT tenant, name, MAX(version), MAX(created_at) FROM adapters GROUP BY tenant, name "
        "ON CONFLICT (tenant, name) DO NOTHING"
    )


def latest(conn: sqlite3.Connection, tenant: str, name: str) -> int | None:
    """The version `resolve` serves for `tenant/name`; None if none (no versions, or none
    promoted yet)."""
    row = conn.execute(
        "SELECT version FROM latest_pointers WHERE tenant = ? AND name = ?", (tenant, name)
    ).fetchone()
    if row is not None:
        return row[0]
    row = conn.execute(
        "SELECT MAX(version) FROM adapters WHERE tenant = ? AND name = ?", (tenant, name)
    ).fetchone()
    return row[0]


def has_pointer(conn: sqlite3.Connection, tenant: str, name: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM latest_pointers WHERE tenant = ? AND name = ?", (tenant, name)
    ).fetchone()
    return row is not None


def pin_current(conn: sqlite3.Connection, tenant: str, name: str, now: float) -> None:
    """Make an implicit pointer (the highest version, or none for a new name) explicit, with
    its history row: call before adding versions, so that an unpromoted one never becomes
    latest and `rollback` can return to what was served. A no-op when the name has a row."""
    if has_pointer(conn, tenant, name):
        return
    current = latest(conn, tenant, name)
    _set_pointer(conn, tenant, name, current, now)
    if current is not None:
        _record_promotion(conn, tenant, name, current, now)


def promote(conn: sqlite3.Connection, tenant: str, name: str, version: int, now: float) -> bool:
    """Point `tenant/name` at `version` (which must exist) and record the promotion.

    Returns False, changing nothing, when the pointer is already there.
    """
    pin_current(conn, tenant, name, now)  # so that rollback can return to an implicit latest
    if latest(conn, tenant, name) == version:
        return False
    _set_pointer(conn, tenant, name, version, now)
    _record_promotion(conn, tenant, name, version, now)
    return True


def rollback(conn: sqlite3.Connection, tenant: str, name: str, now: float) -> tuple[int, int]:
    """Undo the current promotion of `tenant/name`: (the version left, the version now latest).

    Raises NotFound when there is no earlier promotion to go back to.
    """
    rows = conn.execute(
        "SELECT seq, version FROM promotions WHERE tenant = ? AND name = ? "
        "AND rolled_back_at IS NULL ORDER BY seq DESC LIMIT 2",
        (tenant, name),
    ).fetchall()
    current = latest(conn, tenant, name)
    if len(rows) < 2 or rows[0]["version"] != current:
        shown = "none" if current is None else f"version {current}"
        raise NotFound(
            f"adapter {tenant}/{name} has no previously promoted version to roll back to "
            f"(latest is {shown})"
        )
    conn.execute("UPDATE promotions SET rolled_back_at = ? WHERE seq = ?", (now, rows[0]["seq"]))
    _set_pointer(conn, tenant, name, rows[1]["version"], now)
    return current, rows[1]["version"]


def forget(conn: sqlite3.Connection, tenant: str, name: str) -> None:
    """Remove the pointer and history of `tenant/name`: its last versions are being deleted."""
    conn.execute("DELETE FROM latest_pointers WHERE tenant = ? AND name = ?", (tenant, name))
    conn.execute("DELETE FROM promotions WHERE tenant = ? AND name = ?", (tenant, name))


def drop_repeats(conn: sqlite3.Connection, tenant: str, name: str) -> None:
    """Drop each promotion that repeats the one before it, as deleting the versions between
    them leaves (1, 2, 1 without 2): a rollback between them would move nothing."""
    rows = conn.execute(
        "SELECT seq, version FROM promotions WHERE tenant = ? AND name = ? "
        "AND rolled_back_at IS NULL ORDER BY seq",
        (tenant, name),
    ).fetchall()
    for before, after in itertools.pairwise(rows):
        if before["version"] == after["version"]:
            conn.execute("DELETE FROM promotions WHERE seq = ?", (after["seq"],))


def _set_pointer(
    conn: sqlite3.Connection, tenant: str, name: str, version: int | None, now: float
) -> None:
    conn.execute(
        "INSERT INTO latest_pointers (tenant, name, version, updated_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (tenant, name) DO UPDATE SET version = excluded.version, "
        "updated_at = excluded.updated_at",
        (tenant, name, version, now),
    )


def _record_promotion(
    conn: sqlite3.Connection, tenant: str, name: str, version: int, now: float
) -> None:
    conn.execute(
        "INSERT INTO promotions (tenant, name, version, promoted_at) VALUES (?, ?, ?, ?)",
        (tenant, name, version, now),
    )
