"""Deleting adapter versions, whole names and tenants from the catalog.

A deleted version leaves a row in ``deleted_versions``, kept even when its tenant is deleted:
version numbers are never reused, so ``acme/spam@3`` names the same bytes for as long as the
registry exists. Servers key their caches by that name (``adapter_key``), and a client that
pinned a version must get that version or a 404, never a newer adapter under the old number.
The row holds the SHA-256 of ``tenant/name``, not the names: a deleted tenant's model names do
not stay readable in the catalog, and a lookup by name still finds the row.

The functions take a connection inside the catalog's write transaction. The caller removes the
version directories once that transaction has committed (`BlobStore.remove_deleted`): until
then every file is in place, so a delete that fails or is refused changes nothing on disk.
"""

import hashlib
import sqlite3
from collections.abc import Sequence

from registry import pointers
from registry.errors import VersionInUse

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS deleted_versions (
        name_sha256 TEXT NOT NULL,
        version INTEGER NOT NULL,
        deleted_at REAL NOT NULL,
        PRIMARY KEY (name_sha256, version)
    )""",
)


def upgrade(conn: sqlite3.Connection) -> None:
    """Convert a ``deleted_versions`` table that holds names (tenant, name), as development
    builds wrote it for a few commits, to hashed names; a no-op otherwise."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(deleted_versions)")}
    if "tenant" not in columns:
        return
    old = conn.execute("SELECT tenant, name, version, deleted_at FROM deleted_versions").fetchall()
    conn.execute("DROP TABLE deleted_versions")
    for statement in SCHEMA:
        conn.execute(statement)
    conn.executemany(
        "INSERT INTO deleted_versions (name_sha256, version, deleted_at) VALUES (?, ?, ?) "
        "ON CONFLICT DO NOTHING",
        [(name_key(tenant, name), version, at) for tenant, name, version, at in old],
    )


def delete_versions(
    conn: sqlite3.Connection, tenant: str, name: str, versions: Sequence[int], now: float
) -> None:
    """Delete `versions` (existing ones) of `tenant/name`, with their history rows.

    Deleting some but not all versions refuses the one the name serves (VersionInUse), before
    any change: which version serves next is the caller's choice (promote or roll back first).
    Deleting every version also removes the name's pointer and history.
    """
    remaining = {
        row[0]
        for row in conn.execute(
            "SELECT version FROM adapters WHERE tenant = ? AND name = ?", (tenant, name)
        )
    } - set(versions)
    if remaining:
        latest = pointers.latest(conn, tenant, name)
        if latest in versions:
            raise VersionInUse(
                f"version {latest} is what {tenant}/{name} serves: promote or roll back to "
                "another version first, or delete the whole name"
            )
    else:
        pointers.forget(conn, tenant, name)
    key = name_key(tenant, name)
    for version in versions:
        conn.execute(
            "DELETE FROM promotions WHERE tenant = ? AND name = ? AND version = ?",
            (tenant, name, version),
        )
        conn.execute(
            "INSERT INTO deleted_versions (name_sha256, version, deleted_at) VALUES (?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            (key, version, now),
        )
        conn.execute(
            "DELETE FROM adapters WHERE tenant = ? AND name = ? AND version = ?",
            (tenant, name, version),
        )
    if remaining:
        pointers.drop_repeats(conn, tenant, name)


def delete_tenant_rows(conn: sqlite3.Connection, tenant: str) -> None:
    """Delete `tenant`'s keys, settings and tenant row; its adapters must be deleted first."""
    conn.execute("DELETE FROM api_keys WHERE tenant = ?", (tenant,))
    conn.execute("DELETE FROM tenant_settings WHERE tenant = ?", (tenant,))
    conn.execute("DELETE FROM tenants WHERE name = ?", (tenant,))


def deleted_at(conn: sqlite3.Connection, tenant: str, name: str, version: int) -> float | None:
    """When version `version` of `tenant/name` was deleted, or None if it never was."""
    if not 0 < version < 2**63:  # no row holds it, and SQLite cannot even bind it
        return None
    row = conn.execute(
        "SELECT deleted_at FROM deleted_versions WHERE name_sha256 = ? AND version = ?",
        (name_key(tenant, name), version),
    ).fetchone()
    return None if row is None else row[0]


def highest_deleted(conn: sqlite3.Connection, tenant: str, name: str) -> int | None:
    """The highest version of `tenant/name` ever deleted, or None."""
    row = conn.execute(
        "SELECT MAX(version) FROM deleted_versions WHERE name_sha256 = ?",
        (name_key(tenant, name),),
    ).fetchone()
    return row[0]


def stamp(conn: sqlite3.Connection) -> int:
    """What `since` takes to find only later deletions."""
    return conn.execute("SELECT COALESCE(MAX(rowid), 0) FROM deleted_versions").fetchone()[0]


def since(conn: sqlite3.Connection, stamp: int) -> tuple[int, frozenset[tuple[str, int]]]:
    """The versions deleted after `stamp` (0: all of them) as (name_key, version), and the
    stamp to ask from next time. Rows are only ever added, so rowids grow with time."""
    rows = conn.execute(
        "SELECT rowid, name_sha256, version FROM deleted_versions WHERE rowid > ?", (stamp,)
    ).fetchall()
    return max((row[0] for row in rows), default=stamp), frozenset((n, v) for _, n, v in rows)


def name_key(tenant: str, name: str) -> str:
    """How ``deleted_versions`` names `tenant/name`: its SHA-256, not the names themselves."""
    return hashlib.sha256(f"{tenant}/{name}".encode()).hexdigest()
