"""`Registry`: tenants and their API keys, base models, and immutable adapter versions.

Layout of a registry root::

    catalog.sqlite3                      the catalog (see catalog.py)
    catalog.sqlite3-changes              8 bytes each commit rewrites, mapped by readers as
                                         SQLite maps its -shm file: never edit either
    adapters/<tenant>/<name>/<version>/  one directory per version: the adapter's files plus
                                         graft_manifest.json (see store.py)

One `Registry` may be shared by threads, and several processes may open the same root (the CLI
while a server runs); see catalog.py for how. Versions are immutable and numbered 1, 2, 3... per
(tenant, name); every load re-checks the SHA-256 of every file it reads. `publish` and
`publish_many` share one path, `Publisher` (publisher.py). Each name has a `latest` pointer
(pointers.py), which `publish` moves by default and `promote` / `rollback` move explicitly.
"""

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from registry import catalog, keys, pointers
from registry.catalog import Catalog
from registry.errors import AlreadyExists, NotFound, RegistryError
from registry.manifest import is_sha256_hex
from registry.names import is_valid_name, validate_name
from registry.publisher import Publisher
from registry.read_memo import ReadMemo
from registry.records import AdapterRecord, PublishItem, VerifiedFiles
from registry.store import BlobStore
from registry.verify import read_version_files

logger = logging.getLogger(__name__)

CATALOG_FILE = "catalog.sqlite3"
# Long enough for a burst of publishers queueing on the write lock, each holding it only for its
# renames and inserts (publish_many's docstring asks for batches that keep this short).
_BUSY_TIMEOUT_S = 30.0


class Registry:
    """The registry at `root`, created if missing.

    Opening also removes what crashed publishers left: temp dirs no live writer holds, version
    directories without a catalog row, and the tenant/adapter directories that leaves empty.

    `durable` (the default) means a change is on disk when its call returns: every stored file and
    directory is fsynced, and SQLite syncs its log at each commit (``synchronous = FULL``), so a
    power loss or kernel crash loses nothing that was returned. ``durable=False`` skips all of
    that (no fsync; ``synchronous = OFF``) and publishes several times faster: for tests,
    benchmarks and scratch registries that can be rebuilt. It keeps everything else: other
    processes see exactly what they would see of a durable registry, a crash of this process
    loses nothing committed, and a version is still either complete or absent (renames stay
    atomic). It gives up the power-loss guarantees: after an OS crash the latest changes may be
    gone, a catalog row may survive its files (`read_verified` then raises IntegrityError), and
    SQLite may even find the catalog corrupt. The setting is per `Registry` object, not stored:
    a durable registry may open a root written by a scratch one, and sees all of it.
    """

    def __init__(self, root: str | Path, *, durable: bool = True) -> None:
        if not isinstance(durable, bool):
            raise ValueError(f"durable must be a bool, got {durable!r}")
        self._root = Path(root).absolute()
        if self._root.exists() and not self._root.is_dir():
            raise RegistryError(f"registry {self._root} is not a directory")
        self._root.mkdir(parents=True, exist_ok=True)
        self._catalog = Catalog(self._root / CATALOG_FILE, _BUSY_TIMEOUT_S, is_durable=durable)
        self._memo = ReadMemo(self._catalog.changes)  # records, until the catalog changes
        self._store = BlobStore(self._root, is_durable=durable)
        self._publisher = Publisher(self._root, self._catalog, self._store)
        self._is_closed = False
        try:
            self._remove_leftovers()
        except BaseException:
            self.close()
            raise

    @property
    def root(self) -> Path:
        """The registry's root directory (absolute)."""
        return self._root

    def close(self) -> None:
        """Refuse further calls and close the catalog's idle connection; idempotent.

        Other connections are per call, so nothing else stays open.
        """
        self._is_closed = True
        self._catalog.close()

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
                catalog.delete_settings(conn, tenant)
            else:
                text = json.dumps(dict(settings), sort_keys=True, allow_nan=False)
                catalog.upsert_settings(conn, tenant, text, time.time())

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
            stored = catalog.select_settings(conn).get(tenant)
            merged = {**(json.loads(stored) if stored else {}), **changes}
            if check is not None:
                check(merged)
            text = json.dumps(merged, sort_keys=True, allow_nan=False)
            catalog.upsert_settings(conn, tenant, text, time.time())
        return merged

    def tenant_settings(self) -> dict[str, dict[str, Any]]:
        """Every tenant's stored overrides, by tenant."""
        with self._read() as conn:
            return {t: json.loads(text) for t, text in catalog.select_settings(conn).items()}

    def settings_stamp(self) -> tuple[int, float]:
        """A cheap value that changes whenever any tenant's settings change."""
        with self._read() as conn:
            return catalog.settings_stamp(conn)

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

    # adapters

    def publish(
        self,
        tenant: str,
        name: str,
        source_dir: str | Path,
        manifest: Mapping[str, Any],
        *,
        promote: bool = True,
    ) -> AdapterRecord:
        """Store the adapter in `source_dir` as the next version of `tenant/name`.

        `source_dir` is flat: plain files only, at least adapter_config.json and
        adapter_model.safetensors. `manifest` needs labels, base_sha256 and rank; everything
        else is kept as given, and the registry's own keys (manifest.ADDED_KEYS) overwrite any
        given under those names. Either the version appears complete (directory and catalog
        row) or nothing of it remains. With `promote` (the default) the new version becomes
        the name's latest in the same transaction; with False it is only reachable pinned
        (``name@version``) until `promote`d. Raises NotFound, InvalidName, InvalidAdapter.
        """
        self._check_open()
        item = PublishItem(tenant, name, source_dir, manifest, promote)
        (record,) = self._publisher.publish([item], is_batch=False)
        logger.info("published %s (%d bytes)", record.ref, record.size_bytes)
        return record

    def publish_many(self, items: Sequence[PublishItem]) -> list[AdapterRecord]:
        """Publish every item as `publish` would, all or nothing; return the records in item order.

        Every item is checked first (names, manifest, tenant exists), so a bad item fails the
        call before anything is copied; then every adapter is staged (copied, hashed and
        format-checked, several at once); then one catalog write transaction numbers the versions
        in item order (a name given twice gets consecutive versions), renames the directories into
        place and commits once. If anything fails, no directory and no catalog row of the batch
        remains. Errors raised while checking or staging an item are the type `publish` would
        raise, with the message prefixed by "item <index> (<tenant>/<name>): ".

        Batch size: the call holds the catalog's write lock, which every other writer (other
        publishers, the CLI's tenant commands) waits for, while it writes the manifests, renames
        the directories and commits. Staging, the bulk of the work, happens before the lock.
        On the development VM the lock was held ~0.4 ms per item (0.4 s for 1,000 durable items,
        1.2 s for the whole call; half that with durable=False). Writers give up after 30 s, and
        the staged copies wait on disk until the commit, so callers with many thousands of
        adapters should split them into batches of about 1,000, each all or nothing by itself.
        """
        self._check_open()
        records = self._publisher.publish(list(items), is_batch=True)
        size_bytes = sum(record.size_bytes for record in records)
        logger.info("published %d adapter versions (%d bytes)", len(records), size_bytes)
        return records

    def resolve(self, tenant: str, name: str, version: int | None = None) -> AdapterRecord:
        """The given version of `tenant/name`, or with None the one its latest pointer names
        (the highest version where the name has no pointer); else NotFound."""
        validate_name("tenant", tenant)
        validate_name("adapter", name)
        _check_version(version, allow_none=True)
        conn = self._reader()  # every request: a context manager here cost 2% of the loop
        memo = self._memo.entries(conn)
        record = memo.get((tenant, name, version))
        if record is not None:
            return record
        record = catalog.select_adapter(conn, self._root, tenant, name, version)
        if record is not None:
            memo[(tenant, name, version)] = record
            return record
        catalog.require_tenant(conn, tenant)
        highest = catalog.highest_version(conn, tenant, name)
        latest = pointers.latest(conn, tenant, name)
        if highest is None:
            raise NotFound(f"adapter {tenant}/{name} not found")
        if latest is None:
            hint = f"pin one ({name}@{highest}) or promote it"
            if version is None:
                raise NotFound(f"adapter {tenant}/{name} has no promoted version: {hint}")
            raise NotFound(
                f"adapter {tenant}/{name} has no version {version} (highest is {highest})"
            )
        raise NotFound(f"adapter {tenant}/{name} has no version {version} (latest is {latest})")

    def promote(self, tenant: str, name: str, version: int) -> AdapterRecord:
        """Make `version` the one `resolve(tenant, name)` serves; return its record.

        The pointer moves in one write transaction (readers see the old or the new version) and
        the move is recorded, so `rollback` can undo it. Promoting the current latest changes
        nothing. Raises NotFound for an unknown tenant, name or version.
        """
        validate_name("tenant", tenant)
        validate_name("adapter", name)
        _check_version(version, allow_none=False)
        with self._write() as conn:
            catalog.require_tenant(conn, tenant)
            exists = catalog.select_adapter(conn, self._root, tenant, name, version) is not None
            if exists:
                pointers.promote(conn, tenant, name, version, time.time())
        if not exists:
            return self.resolve(tenant, name, version)  # raises the NotFound naming what exists
        logger.info("promoted %s/%s@%d to latest", tenant, name, version)
        return self.resolve(tenant, name, version)

    def rollback(self, tenant: str, name: str) -> tuple[int | None, AdapterRecord]:
        """Undo the last promotion of `tenant/name`: the pointer goes back to the version promoted
        before it. Returns (the version it left, the record now latest).

        Raises NotFound when there is no earlier promotion (or no such tenant or name).
        """
        validate_name("tenant", tenant)
        validate_name("adapter", name)
        with self._write() as conn:
            catalog.require_tenant(conn, tenant)
            if catalog.highest_version(conn, tenant, name) is None:
                raise NotFound(f"adapter {tenant}/{name} not found")
            left, now_latest = pointers.rollback(conn, tenant, name, time.time())
        logger.info("rolled %s/%s back from version %s to %d", tenant, name, left, now_latest)
        return left, self.resolve(tenant, name, now_latest)

    def list_adapters(self, tenant: str) -> list[AdapterRecord]:
        """Every version of every adapter of `tenant`, sorted by (name, version); `is_latest`
        marks the version each name resolves to."""
        validate_name("tenant", tenant)
        with self._read() as conn:
            catalog.require_tenant(conn, tenant)
            return catalog.select_tenant_adapters(conn, self._root, tenant)

    def read_verified(
        self, record: AdapterRecord, only: Collection[str] | None = None
    ) -> VerifiedFiles:
        """Read and check the files of `record`'s version named in `only` (default: every
        one); IntegrityError names a bad file."""
        self._check_open()
        expected_path = self._store.version_dir(record.tenant, record.name, record.version)
        if record.path != expected_path:
            raise RegistryError(f"adapter {record.ref} is not stored in this registry")
        return VerifiedFiles(record=record, files=read_version_files(record, only))

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


def _check_version(version: int | None, *, allow_none: bool) -> None:
    if version is None and allow_none:
        return
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"version must be an int, got {version!r}")


def _check_base_sha256(value: str) -> None:
    if not is_sha256_hex(value):
        raise ValueError(f"base model SHA-256 must be 64 lowercase hex characters, got {value!r}")
