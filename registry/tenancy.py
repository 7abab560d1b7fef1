"""Tenants, their API keys and scheduling settings, and base models: the part of `Registry`
that holds no adapter files. `Registry` (registry.py) inherits it and opens the catalog."""

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from registry import catalog, keys
from registry.catalog import Catalog
from registry.errors import AlreadyExists, NotFound, RegistryError
from registry.manifest import is_sha256_hex
from registry.names import is_valid_name, validate_name
from registry.read_memo import ReadMemo
from registry.records import AdapterRecord

logger = logging.getLogger(__name__)


class Tenancy:
    """Tenant, key, settings and base-model methods over the catalog `Registry` opens."""

    _root: Path
    _catalog: Catalog
    _memo: ReadMemo  # records, until the catalog changes
    _is_closed: bool

    # tenants and keys

    def create_tenant(self, tenant: str) -> str:
        """Create `tenant` and return its first API key (shown once; only its hash is stored)."""
        validate_name("tenant", tenant)
        api_key = keys.new_api_key()
        with self._write() as conn:
            now = time.time()
            if not catalog.insert_tenant(conn, tenant, now):
                raise AlreadyExists(f"tenant {tenant!r} already exists")
            catalog.insert_key(conn, keys.hash_api_key(api_key), tenant, now)
        logger.info("created tenant %s", tenant)
        return api_key

    def issue_key(self, tenant: str) -> str:
        """Return another API key for the existing `tenant`."""
        validate_name("tenant", tenant)
        api_key = keys.new_api_key()
        with self._write() as conn:
            catalog.require_tenant(conn, tenant)
            catalog.insert_key(conn, keys.hash_api_key(api_key), tenant, time.time())
        return api_key

    def revoke_keys(self, tenant: str) -> int:
        """Revoke every API key of `tenant`; return how many were revoked."""
        validate_name("tenant", tenant)
        with self._write() as conn:
            catalog.require_tenant(conn, tenant)
            num_revoked = catalog.delete_keys(conn, tenant)
        logger.info("revoked %d keys of tenant %s", num_revoked, tenant)
        return num_revoked

    def revoke_key(self, tenant: str, api_key: str) -> None:
        """Revoke one API key of `tenant` (a leaked one), leaving its other keys working;
        NotFound when it is not one of `tenant`'s keys."""
        validate_name("tenant", tenant)
        key = api_key.strip() if isinstance(api_key, str) else None
        with self._write() as conn:
            catalog.require_tenant(conn, tenant)
            # a key of no shape we issue (None, non-ASCII) is no tenant's key either
            if not keys.is_well_formed_key(key) or not catalog.delete_key(
                conn, tenant, keys.hash_api_key(key)
            ):
                raise NotFound(f"that key is not one of the keys of tenant {tenant!r}")
        logger.info("revoked a key of tenant %s", tenant)

    def tenants(self) -> list[str]:
        """All tenant names, sorted."""
        with self._read() as conn:
            return catalog.list_tenants(conn)

    def has_tenant(self, tenant: str) -> bool:
        """True if `tenant` exists; False (not an error) for a name that could not be a tenant."""
        if not is_valid_name("tenant", tenant):
            return False
        with self._read() as conn:
            return catalog.has_tenant(conn, tenant)

    def tenant_created_at(self, tenant: str) -> float | None:
        """When `tenant` was created (a tenant deleted and created again: the second time), or
        None when it does not exist: what tells a deleted tenant's leftovers from the new one's."""
        if not is_valid_name("tenant", tenant):
            return None
        with self._read() as conn:
            row = conn.execute(
                "SELECT created_at FROM tenants WHERE name = ?", (tenant,)
            ).fetchone()
        return None if row is None else row[0]

    def set_tenant_settings(self, tenant: str, settings: Mapping[str, Any] | None) -> None:
        """Store `tenant`'s scheduling overrides (a JSON object), or with None remove them.

        The registry does not interpret them; a running engine picks changes up by polling
        `settings_stamp()`.
        """
        validate_name("tenant", tenant)
        if settings is not None and not isinstance(settings, Mapping):
            raise ValueError(f"tenant settings must be a JSON object, got {settings!r}")
        with self._write() as conn:
            catalog.require_tenant(conn, tenant)
            if settings is None:
                _delete_settings(conn, tenant)
            else:
                text = json.dumps(dict(settings), sort_keys=True, allow_nan=False)
                _upsert_settings(conn, tenant, text, time.time())

    def update_tenant_settings(
        self,
        tenant: str,
        changes: Mapping[str, Any],
        check: Callable[[dict[str, Any]], object] | None = None,
    ) -> dict[str, Any]:
        """Merge `changes` into `tenant`'s stored overrides and return the result.

        The read and the write share one write transaction, so two concurrent updates of
        different fields both survive. `check` sees the merged settings first and may raise to
        refuse them; then nothing is stored.
        """
        validate_name("tenant", tenant)
        if not isinstance(changes, Mapping):
            raise ValueError(f"tenant settings must be a JSON object, got {changes!r}")
        with self._write() as conn:
            catalog.require_tenant(conn, tenant)
            stored = _select_settings(conn).get(tenant)
            merged = {**(json.loads(stored) if stored else {}), **changes}
            if check is not None:
                check(merged)
            text = json.dumps(merged, sort_keys=True, allow_nan=False)
            _upsert_settings(conn, tenant, text, time.time())
        return merged

    def tenant_settings(self) -> dict[str, dict[str, Any]]:
        """Every tenant's stored overrides, by tenant."""
        with self._read() as conn:
            return {t: json.loads(text) for t, text in _select_settings(conn).items()}

    def settings_stamp(self) -> tuple[int, float, int, float]:
        """A cheap value that changes whenever any tenant's settings change, and whenever a
        tenant is created or deleted (what an engine keeps per tenant must then go too)."""
        with self._read() as conn:
            return _settings_stamp(conn)

    def tenant_stamps(self) -> dict[str, float]:
        """Every tenant's `tenant_created_at`, by name."""
        with self._read() as conn:
            rows = conn.execute("SELECT name, created_at FROM tenants").fetchall()
        return {row[0]: row[1] for row in rows}

    def authenticate(self, api_key: str) -> str | None:
        """The tenant owning `api_key`, or None; never raises for any key value."""
        if not keys.is_well_formed_key(api_key):
            return None
        key_sha256 = keys.hash_api_key(api_key)
        conn = self._reader()  # every request asks: answered from the memo, as resolve
        memo = self._memo.entries(conn)
        tenant = memo.get(("api_key", key_sha256))
        if tenant is None:
            tenant = catalog.tenant_for_key(conn, key_sha256)
            if tenant is not None:  # unknown keys are not kept: guesses cannot fill it
                memo[("api_key", key_sha256)] = tenant
        return tenant

    # base models

    def register_base(self, sha256: str, name: str) -> None:
        """Record base model weights `sha256` under a display `name`; idempotent."""
        _check_base_sha256(sha256)
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"base model name must be a non-empty string, got {name!r}")
        with self._write() as conn:
            catalog.upsert_base(conn, sha256, name, time.time())

    def dependents(self, base_sha256: str) -> list[AdapterRecord]:
        """Every adapter version trained on base `base_sha256`, sorted by (tenant, name, version).

        A base nobody registered still has its dependents listed: adapters name their base
        by hash, and registering it is optional.
        """
        _check_base_sha256(base_sha256)
        with self._read() as conn:
            return catalog.select_dependents(conn, self._root, base_sha256)

    # catalog access

    def _check_open(self) -> None:
        if self._is_closed:
            raise RegistryError(f"registry at {self._root} is closed")

    def _reader(self) -> sqlite3.Connection:
        self._check_open()
        return self._catalog.reader()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        yield self._reader()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._check_open()
        with self._catalog.write() as conn:
            yield conn


def _check_base_sha256(value: str) -> None:
    if not is_sha256_hex(value):
        raise ValueError(f"base model SHA-256 must be 64 lowercase hex characters, got {value!r}")


def _upsert_settings(conn: sqlite3.Connection, tenant: str, settings_json: str, now: float) -> None:
    conn.execute(
        "INSERT INTO tenant_settings (tenant, settings_json, updated_at) VALUES (?, ?, ?) "
        "ON CONFLICT(tenant) DO UPDATE SET settings_json = excluded.settings_json, "
        "updated_at = excluded.updated_at",
        (tenant, settings_json, now),
    )


def _delete_settings(conn: sqlite3.Connection, tenant: str) -> None:
    conn.execute("DELETE FROM tenant_settings WHERE tenant = ?", (tenant,))


def _select_settings(conn: sqlite3.Connection) -> dict[str, str]:
    rows = conn.execute("SELECT tenant, settings_json FROM tenant_settings").fetchall()
    return {row[0]: row[1] for row in rows}


def _settings_stamp(conn: sqlite3.Connection) -> tuple[int, float, int, float]:
    """(count, newest update) of the settings and of the tenants: changes whenever any
    tenant's settings change or vanish, and whenever a tenant comes or goes."""
    row = conn.execute(
        "SELECT COUNT(*), MAX(updated_at), (SELECT COUNT(*) FROM tenants), "
        "(SELECT MAX(created_at) FROM tenants) FROM tenant_settings"
    ).fetchone()
    return int(row[0]), float(row[1] or 0.0), int(row[2]), float(row[3] or 0.0)
