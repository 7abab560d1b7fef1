"""`Registry`: tenants and their API keys, base models, and immutable adapter versions.

Layout of a registry root::

    catalog.sqlite3                      the catalog (see catalog.py)
    catalog.sqlite3-changes              8 bytes each commit rewrites, mapped by readers as
                                         SQLite maps its -shm file: never edit either
    adapters/<tenant>/<name>/<version>/  one directory per version: the adapter's files plus
                                         graft_manifest.json (see store.py)
    orphaned/<tenant>/<name>/<v>-<time>/ version directories the catalog had no row for,
                                         moved aside on open (`_remove_leftovers`)

One `Registry` may be shared by threads, and several processes may open the same root (the CLI
while a server runs); see catalog.py for how. Versions are immutable and numbered 1, 2, 3... per
(tenant, name); every load re-checks the SHA-256 of every file it reads. `publish` and
`publish_many` share one path, `Publisher` (publisher.py). Each name has a `latest` pointer
(pointers.py), which `publish` moves by default and `promote` / `rollback` move explicitly.
"""

import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from registry import catalog, deletion, pointers
from registry.catalog import Catalog
from registry.errors import NotFound, RegistryError
from registry.fsio import make_private_dir
from registry.names import validate_name
from registry.ownership import refuse_another_users
from registry.publisher import Publisher
from registry.read_memo import ReadMemo
from registry.records import AdapterRecord, PublishItem, VerifiedFiles
from registry.store import BlobStore
from registry.tenancy import Tenancy
from registry.verify import read_version_files

logger = logging.getLogger(__name__)

CATALOG_FILE = "catalog.sqlite3"
# Long enough for a burst of publishers queueing on the write lock, each holding it only for its
# renames and inserts (publish_many's docstring asks for batches that keep this short).
_BUSY_TIMEOUT_S = 30.0


class Registry(Tenancy):
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
        if self._root.exists() and not os.access(self._root, os.W_OK | os.X_OK):
            raise RegistryError(  # rather than SQLite's "attempt to write a readonly database"
                f"no write access to the registry {self._root}: opening one tidies what "
                "crashed writers left and keeps its catalog current, so every graft command "
                "and server needs it; run as the registry's owner "
                f"(uid {self._root.stat().st_uid})"
            )
        refuse_another_users(self._root)
        make_private_dir(self._root)
        self._store = BlobStore(self._root, is_durable=durable)
        _refuse_without_catalog(self._root, self._store)  # before making an empty one
        self._catalog = Catalog(self._root / CATALOG_FILE, _BUSY_TIMEOUT_S, is_durable=durable)
        self._memo = ReadMemo(self._catalog.changes)  # records, until the catalog changes
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

    # adapters

    def publish(
        self,
        tenant: str,
        name: str,
        source_dir: str | Path,
        manifest: Mapping[str, Any],
        *,
        promote: bool = True,
        tenant_created_at: float | None = None,
    ) -> AdapterRecord:
        """Store the adapter in `source_dir` as the next version of `tenant/name`.

        `source_dir` is flat: plain files only, at least adapter_config.json and
        adapter_model.safetensors. `manifest` needs labels, base_sha256 and rank; everything
        else is kept as given, and the registry's own keys (manifest.ADDED_KEYS) overwrite any
        given under those names. Either the version appears complete (directory and catalog
        row) or nothing of it remains. With `promote` (the default) the new version becomes
        the name's latest in the same transaction; with False it is only reachable pinned
        (``name@version``) until `promote`d. With `tenant_created_at` (the tenant's stamp when
        the caller learnt of it) a tenant deleted and created again since is NotFound, checked
        in the commit's transaction. Raises NotFound, InvalidName, InvalidAdapter.
        """
        self._check_open()
        item = PublishItem(tenant, name, source_dir, manifest, promote, tenant_created_at)
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
        conn = self._reader()  # every request: a context manager here cost 2% of the loop
        memo = self._memo.entries(conn)
        # a remembered key was checked when it was stored: checking the names again on each
        # request was 2.5% of the engine's loop on an H200 (bool is kept out: True == 1)
        if type(tenant) is str and type(name) is str and type(version) in (int, type(None)):
            record = memo.get((tenant, name, version))
            if record is not None:
                return record
        validate_name("tenant", tenant)
        validate_name("adapter", name)
        _check_version(version, allow_none=True)
        record = catalog.select_adapter(conn, self._root, tenant, name, version)
        if record is not None:
            memo[(tenant, name, version)] = record
            return record
        catalog.require_tenant(conn, tenant)
        highest = catalog.highest_version(conn, tenant, name)
        latest = pointers.latest(conn, tenant, name)
        if version is not None and deletion.deleted_at(conn, tenant, name, version) is not None:
            raise NotFound(f"adapter {tenant}/{name} version {version} was deleted")
        if highest is None:
            was_deleted = deletion.highest_deleted(conn, tenant, name) is not None
            raise NotFound(
                f"adapter {tenant}/{name} {'was deleted' if was_deleted else 'not found'}"
            )
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

    def deletion_stamp(self) -> int:
        """The stamp of the latest deletion so far (0: none), for `deletions_since`."""
        with self._read() as conn:
            return deletion.stamp(conn)

    def deletions_since(self, stamp: int) -> tuple[int, frozenset[tuple[str, int]]]:
        """Versions deleted, by any process, after `stamp` (0: ever), as pairs of the SHA-256
        of ``tenant/name`` (`registry.deletion.name_key`) and the version; with the stamp to
        pass next time. How a server hears of deletions made elsewhere."""
        with self._read() as conn:
            return deletion.since(conn, stamp)

    def delete(
        self, tenant: str, name: str, version: int | None = None, *, dry_run: bool = False
    ) -> list[AdapterRecord]:
        """Delete version `version` of `tenant/name`, or with None the whole name (every version,
        its pointer and history); return the records deleted.

        The rows go in one write transaction, and the files once it has committed: a delete
        that fails or is refused changes nothing, and a crash after the commit leaves files the
        next open removes. Version numbers are never reused; a later publish of the name numbers
        after every version it ever had. Deleting the version the name serves while others
        remain raises VersionInUse; an unknown tenant, name or version raises NotFound. With
        `dry_run`, every check runs and nothing changes. Servers answer 404 for the deleted
        versions from their next request on; requests already running finish as they were.
        """
        validate_name("tenant", tenant)
        validate_name("adapter", name)
        _check_version(version, allow_none=True)
        with self._write() as conn:
            catalog.require_tenant(conn, tenant)
            records = [
                record
                for record in catalog.select_tenant_adapters(conn, self._root, tenant)
                if record.name == name and version in (None, record.version)
            ]
            if records:
                self._delete_rows(conn, records, dry_run)
        if not records:
            self.resolve(tenant, name, version)  # raises the NotFound naming what exists
            raise NotFound(f"adapter {tenant}/{name} has nothing to delete")  # published since
        if not dry_run:
            self._remove_files(records)
            logger.info("deleted %d version(s) of %s/%s", len(records), tenant, name)
        return records

    def delete_tenant(self, tenant: str, *, dry_run: bool = False) -> list[AdapterRecord]:
        """Delete `tenant`: its API keys, its settings and every version of its adapters, files
        included, as `delete` deletes; return the adapter records deleted.

        Its version numbers stay used: a tenant created again under the same name numbers its
        adapters' versions after them.
        """
        validate_name("tenant", tenant)
        with self._write() as conn:
            catalog.require_tenant(conn, tenant)
            records = catalog.select_tenant_adapters(conn, self._root, tenant)
            then = functools.partial(deletion.delete_tenant_rows, conn, tenant)
            self._delete_rows(conn, records, dry_run, then)
        if not dry_run:
            self._remove_files(records)
            logger.info("deleted tenant %s and %d adapter version(s)", tenant, len(records))
        return records

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
        """Tidy what a crashed or interrupted writer left: stale temp dirs, and the files of
        deleted versions that outlived their commit. A version directory the catalog never
        recorded is moved aside, never removed: a publish that crashed before its commit left
        it, or the catalog is older than its files (restored from a copy). Stored versions
        beside a catalog that knows no tenant mean the catalog was lost or replaced: opening
        is refused, and nothing is touched."""
        # Under the write lock: a publisher is between rename and insert only while holding it.
        with self._write() as conn:
            known = catalog.adapter_versions(conn)
            deleted, unrecorded = [], []
            for version in self._store.version_dirs():
                if version[:3] not in known:
                    was_deleted = deletion.deleted_at(conn, *version[:3]) is not None
                    (deleted if was_deleted else unrecorded).append(version)
            if unrecorded and not catalog.list_tenants(conn):
                raise _lost_catalog(self._root, "records no tenant", len(unrecorded))
            self._store.remove_stale_temp_dirs()
            for *_, path in deleted:
                logger.info("removing %s: deleted, and its files outlived the commit", path)
                self._store.remove_version(path)
            for tenant, name, _, path in unrecorded:
                aside = self._store.set_aside(path)
                logger.warning(
                    "moved %s to %s: the catalog has no row for it (a publish that crashed "
                    "before its commit, or a catalog older than its files); `graft adapters "
                    "import %s --tenant %s --name %s` registers it again",
                    path,
                    aside,
                    aside,
                    tenant,
                    name,
                )
            self._store.remove_empty_dirs()

    def _delete_rows(
        self,
        conn: sqlite3.Connection,
        records: Sequence[AdapterRecord],
        dry_run: bool,
        then: Callable[[], None] | None = None,
    ) -> None:
        """Delete the rows of `records` (one tenant's), then run `then`; roll it all back
        again for a dry run. The caller's transaction commits."""
        now = time.time()
        versions: dict[tuple[str, str], list[int]] = {}
        for record in records:
            versions.setdefault((record.tenant, record.name), []).append(record.version)
        for (tenant, name), numbers in versions.items():
            deletion.delete_versions(conn, tenant, name, numbers, now)
        if then is not None:
            then()
        if dry_run:
            conn.rollback()

    def _remove_files(self, records: Sequence[AdapterRecord]) -> None:
        """Remove the directories of committed deletions, then, under the write lock, the
        tenant and name directories that leaves empty."""
        paths = [record.path for record in records]
        self._store.remove_deleted(paths)
        try:
            with self._write():
                self._store.prune_empty_parents(paths)
        except sqlite3.OperationalError as exc:  # the delete has committed all the same
            logger.warning("empty directories stay until the registry next opens: %s", exc)
        try:
            truncated = self._catalog.truncate_log()
        except sqlite3.OperationalError as exc:  # locked past the busy timeout
            truncated, reason = False, str(exc)
        else:
            reason = "a reader held it"
        if not truncated:
            logger.warning(
                "the catalog's log still holds deleted rows until its next checkpoint: %s", reason
            )


def _refuse_without_catalog(root: Path, store: BlobStore) -> None:
    """Stored versions beside no catalog, or an empty file: refused before SQLite writes a
    new catalog there, which would then stand in the way of restoring the old one."""
    try:
        if (root / CATALOG_FILE).stat().st_size > 0:
            return
        what = "is empty"
    except FileNotFoundError:
        what = "is missing"
    num_versions = sum(1 for _ in store.version_dirs())
    if num_versions:
        raise _lost_catalog(root, what, num_versions)


def _lost_catalog(root: Path, what: str, num_versions: int) -> RegistryError:
    return RegistryError(
        f"{root / CATALOG_FILE} {what}, yet {num_versions} adapter version(s) are stored "
        f"under {root / 'adapters'}: the catalog was lost or replaced. Restore it, or move "
        "adapters/ away to start an empty registry; nothing was changed"
    )


def _check_version(version: int | None, *, allow_none: bool) -> None:
    if version is None and allow_none:
        return
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"version must be an int, got {version!r}")
