"""`Registry`: tenants and their API keys, base models, and immutable adapter versions.

Layout of a registry root::

    catalog.sqlite3                      the catalog (see catalog.py)
    adapters/<tenant>/<name>/<version>/  one directory per version: the adapter's files plus
                                         graft_manifest.json (see store.py)

One `Registry` may be shared by threads, and several processes may open the same root (the CLI
while a server runs); see catalog.py for how. Versions are immutable and numbered 1, 2, 3... per
(tenant, name); every load re-checks the SHA-256 of every file.
"""

import json
import logging
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from registry import catalog, keys
from registry.catalog import Catalog
from registry.errors import AlreadyExists, NotFound, RegistryError
from registry.manifest import ManifestFields, check_manifest, is_sha256_hex, stored_manifest_text
from registry.names import is_valid_name, validate_name
from registry.records import AdapterRecord, VerifiedFiles
from registry.store import BlobStore, StagedVersion
from registry.verify import read_version_files

logger = logging.getLogger(__name__)

CATALOG_FILE = "catalog.sqlite3"
# Long enough for a burst of publishers queueing on the write lock, each holding it only for a
# rename and one insert.
_BUSY_TIMEOUT_S = 30.0


class Registry:
    """The registry at `root`, created if missing.

    Opening also removes what crashed publishers left: temp dirs no live writer holds, version
    directories without a catalog row, and the tenant/adapter directories that leaves empty.
    """

    def __init__(self, root: str | Path) -> None:
        self._root = Path(root).absolute()
        self._root.mkdir(parents=True, exist_ok=True)
        self._catalog = Catalog(self._root / CATALOG_FILE, _BUSY_TIMEOUT_S)
        self._store = BlobStore(self._root)
        self._is_closed = False
        self._remove_leftovers()

    @property
    def root(self) -> Path:
        """The registry's root directory (absolute)."""
        return self._root

    def close(self) -> None:
        """Refuse further calls. Connections are per call, so nothing else stays open."""
        self._is_closed = True

    def __enter__(self) -> "Registry":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

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
            self._require_tenant(conn, tenant)
            catalog.insert_key(conn, keys.hash_api_key(api_key), tenant, time.time())
        return api_key

    def revoke_keys(self, tenant: str) -> int:
        """Revoke every API key of `tenant`; return how many were revoked."""
        validate_name("tenant", tenant)
        with self._write() as conn:
            self._require_tenant(conn, tenant)
            num_revoked = catalog.delete_keys(conn, tenant)
        logger.info("revoked %d keys of tenant %s", num_revoked, tenant)
        return num_revoked

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

    def authenticate(self, api_key: str) -> str | None:
        """The tenant owning `api_key`, or None; never raises for any key value."""
        if not keys.is_well_formed_key(api_key):
            return None
        with self._read() as conn:
            return catalog.tenant_for_key(conn, keys.hash_api_key(api_key))

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

    # adapters

    def publish(
        self, tenant: str, name: str, source_dir: str | Path, manifest: Mapping[str, Any]
    ) -> AdapterRecord:
        """Store the adapter in `source_dir` as the next version of `tenant/name`.

        `source_dir` is flat: plain files only, at least adapter_config.json and
        adapter_model.safetensors. `manifest` needs labels, base_sha256 and rank; everything
        else is kept as given, and the registry's own keys (manifest.ADDED_KEYS) overwrite any
        given under those names. Either the version appears complete (directory and catalog
        row) or nothing of it remains. Raises NotFound, InvalidName, InvalidAdapter.
        """
        validate_name("tenant", tenant)
        validate_name("adapter", name)
        fields = check_manifest(manifest)
        with self._read() as conn:
            self._require_tenant(conn, tenant)  # fail before copying the files
        staged = self._store.stage(Path(source_dir))
        try:
            record = self._install(tenant, name, staged, manifest, fields)
        finally:
            self._store.discard(staged)
        logger.info("published %s (%d bytes)", record.ref, record.size_bytes)
        return record

    def _install(
        self,
        tenant: str,
        name: str,
        staged: StagedVersion,
        manifest: Mapping[str, Any],
        fields: ManifestFields,
    ) -> AdapterRecord:
        with self._write() as conn:
            self._require_tenant(conn, tenant)
            version = catalog.next_version(conn, tenant, name)
            record, manifest_text = self._new_record(
                tenant, name, version, staged, manifest, fields
            )
            self._store.install(staged, manifest_text, record.path)
            try:
                rel_path = record.path.relative_to(self._root).as_posix()
                catalog.insert_adapter(conn, record, rel_path)
                conn.commit()
            except BaseException:
                # Still under the write lock, so no other publisher can be using this path.
                self._store.remove_version(record.path)
                raise
        return record

    def _new_record(
        self,
        tenant: str,
        name: str,
        version: int,
        staged: StagedVersion,
        manifest: Mapping[str, Any],
        fields: ManifestFields,
    ) -> tuple[AdapterRecord, str]:
        """The record of a new version, and the manifest text to store with it."""
        created_at = time.time()
        text = stored_manifest_text(
            manifest,
            tenant=tenant,
            name=name,
            version=version,
            content_sha256=staged.content_sha256,
            created_at=created_at,
            files=staged.file_sha256,
        )
        stored = json.loads(text)  # what resolve() will return, e.g. tuples become lists
        record = AdapterRecord(
            tenant=tenant,
            name=name,
            version=version,
            content_sha256=staged.content_sha256,
            base_sha256=fields.base_sha256,
            rank=fields.rank,
            labels=fields.labels,
            size_bytes=staged.size_bytes,
            metrics=stored.get("metrics", {}),
            manifest=stored,
            path=self._store.version_dir(tenant, name, version),
            created_at=created_at,
        )
        return record, text

    def resolve(self, tenant: str, name: str, version: int | None = None) -> AdapterRecord:
        """The given version of `tenant/name`, the latest if `version` is None; else NotFound."""
        validate_name("tenant", tenant)
        validate_name("adapter", name)
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise ValueError(f"version must be an int or None, got {version!r}")
        with self._read() as conn:
            record = catalog.select_adapter(conn, self._root, tenant, name, version)
            if record is not None:
                return record
            self._require_tenant(conn, tenant)
            latest = catalog.latest_version(conn, tenant, name)
        if latest is None:
            raise NotFound(f"adapter {tenant}/{name} not found")
        raise NotFound(f"adapter {tenant}/{name} has no version {version} (latest is {latest})")

    def list_adapters(self, tenant: str) -> list[AdapterRecord]:
        """Every version of every adapter of `tenant`, sorted by (name, version)."""
        validate_name("tenant", tenant)
        with self._read() as conn:
            self._require_tenant(conn, tenant)
            return catalog.select_tenant_adapters(conn, self._root, tenant)

    def read_verified(self, record: AdapterRecord) -> VerifiedFiles:
        """Read and check every file of `record`'s version; IntegrityError names a bad file."""
        self._check_open()
        expected_path = self._store.version_dir(record.tenant, record.name, record.version)
        if record.path != expected_path:
            raise RegistryError(f"adapter {record.ref} is not stored in this registry")
        return VerifiedFiles(record=record, files=read_version_files(record))

    # internals

    def _remove_leftovers(self) -> None:
        self._store.remove_stale_temp_dirs()
        # Under the write lock: a publisher is between rename and insert only while holding it.
        with self._write() as conn:
            known = catalog.adapter_versions(conn)
            for tenant, name, version, path in self._store.version_dirs():
                if (tenant, name, version) not in known:
                    logger.warning("removing %s: no catalog row (a crashed publish)", path)
                    self._store.remove_version(path)
            self._store.remove_empty_dirs()

    def _check_open(self) -> None:
        if self._is_closed:
            raise RegistryError(f"registry at {self._root} is closed")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        self._check_open()
        with self._catalog.connect() as conn:
            yield conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._check_open()
        with self._catalog.write() as conn:
            yield conn

    @staticmethod
    def _require_tenant(conn: sqlite3.Connection, tenant: str) -> None:
        if not catalog.has_tenant(conn, tenant):
            raise NotFound(f"tenant {tenant!r} not found")


def _check_base_sha256(value: str) -> None:
    if not is_sha256_hex(value):
        raise ValueError(f"base model SHA-256 must be 64 lowercase hex characters, got {value!r}")
