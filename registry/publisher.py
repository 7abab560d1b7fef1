"""`Publisher`: the one path by which adapters become versions, for one adapter or thousands.

A call goes through three steps, and a failure at any of them leaves nothing of the call behind:

1. check every item (names, manifest, tenant exists), before any byte is copied;
2. stage every adapter into one locked temp dir (copy, hash, check formats), outside any lock,
   several at once so that their fsyncs overlap (see parallel.py);
3. in one catalog write transaction: number the versions in item order, write the manifests and
   rename the directories into place (`BlobStore.install`, which fsyncs each parent directory
   once per call), insert the rows, move the latest pointers of promoted items (pointers.py) and
   commit once.

What a call pays once, however many items it has: two catalog connections, one temp dir and its
lock, one fsync per parent directory, one commit. What each item pays: its files' fsyncs, its
manifest's and its directory's.
"""

import dataclasses
import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from registry import catalog, formats, pointers
from registry.catalog import Catalog
from registry.errors import RegistryError
from registry.manifest import ManifestFields, check_manifest, stored_manifest_text
from registry.names import validate_name
from registry.parallel import map_in_threads
from registry.records import AdapterRecord, PublishItem
from registry.store import MAX_IO_THREADS, BlobStore, PendingVersion, StagedVersion, Staging


class Publisher:
    """Publishes into the catalog and blob store of one registry root; safe to share by threads."""

    def __init__(self, root: Path, database: Catalog, store: BlobStore) -> None:
        self._root = root
        self._catalog = database
        self._store = store

    def publish(self, items: Sequence[PublishItem], *, is_batch: bool) -> list[AdapterRecord]:
        """Publish `items` all or nothing; return their records in item order.

        With `is_batch`, a RegistryError about one item gets the prefix
        "item <index> (<tenant>/<name>): "; a single publish keeps its messages as they are.
        """
        fields = self._check(items, is_batch)
        if not items:
            return []
        with self._store.staging(len(items)) as staging:
            staged = self._stage_all(staging, items, fields, is_batch)
            return self._install(items, fields, staged)

    def _check(self, items: Sequence[PublishItem], is_batch: bool) -> list[ManifestFields]:
        fields: list[ManifestFields] = []
        for index, item in enumerate(items):
            if not isinstance(item, PublishItem):
                raise TypeError(f"item {index} is a {type(item).__name__}, not a PublishItem")
            if not isinstance(item.promote, bool):
                raise ValueError(f"item {index}: promote must be a bool, got {item.promote!r}")
            with _naming_item(index, item, is_batch):
                validate_name("tenant", item.tenant)
                validate_name("adapter", item.name)
                fields.append(check_manifest(item.manifest))
        checked_tenants: set[tuple[str, float | None]] = set()
        with self._catalog.connect() as conn:
            for index, item in enumerate(items):
                tenant = (item.tenant, item.tenant_created_at)
                if tenant not in checked_tenants:
                    with _naming_item(index, item, is_batch):
                        catalog.require_tenant(conn, *tenant)
                    checked_tenants.add(tenant)
        return fields

    def _stage_all(
        self,
        staging: Staging,
        items: Sequence[PublishItem],
        fields: Sequence[ManifestFields],
        is_batch: bool,
    ) -> list[StagedVersion]:
        def stage(index: int) -> StagedVersion:
            with _naming_item(index, items[index], is_batch):
                staged = staging.stage(index, Path(items[index].source_dir))
                formats.check_lora_rank(staged.lora_rank, fields[index].rank)
                return staged

        return map_in_threads(stage, range(len(items)), MAX_IO_THREADS)

    def _install(
        self,
        items: Sequence[PublishItem],
        fields: Sequence[ManifestFields],
        staged: Sequence[StagedVersion],
    ) -> list[AdapterRecord]:
        with self._catalog.write() as conn:
            for tenant in dict.fromkeys((item.tenant, item.tenant_created_at) for item in items):
                catalog.require_tenant(conn, *tenant)
            versions = _assign_versions(conn, items)
            records: list[AdapterRecord] = []
            pending: list[PendingVersion] = []
            for item, item_fields, version, item_staged in zip(
                items, fields, versions, staged, strict=True
            ):
                record, manifest_text = self._new_record(item, item_fields, version, item_staged)
                records.append(record)
                pending.append(PendingVersion(item_staged, manifest_text, record.path))
            self._store.install(pending)
            try:
                _pin_current(conn, items)
                for record in records:
                    rel_path = record.path.relative_to(self._root).as_posix()
                    catalog.insert_adapter(conn, record, rel_path)
                records = _promote(conn, items, records)
                conn.commit()
            except BaseException:
                # Still under the write lock, so no other publisher can be using these paths.
                # A SIGINT during the commit's fsync raises once it has returned: the rows are
                # in then, and removing their directories left versions with no files
                if not _committed(conn, records[0]):
                    self._store.remove_versions([record.path for record in records])
                raise
        return records

    def _new_record(
        self, item: PublishItem, fields: ManifestFields, version: int, staged: StagedVersion
    ) -> tuple[AdapterRecord, str]:
        """The record of a new version, and the manifest text to store with it."""
        created_at = time.time()
        text = stored_manifest_text(
            item.manifest,
            tenant=item.tenant,
            name=item.name,
            version=version,
            content_sha256=staged.content_sha256,
            created_at=created_at,
            files=staged.file_sha256,
        )
        stored = json.loads(text)  # what resolve() will return, e.g. tuples become lists
        record = AdapterRecord(
            tenant=item.tenant,
            name=item.name,
            version=version,
            content_sha256=staged.content_sha256,
            base_sha256=fields.base_sha256,
            rank=fields.rank,
            labels=fields.labels,
            size_bytes=staged.size_bytes,
            metrics=stored.get("metrics", {}),
            manifest=stored,
            path=self._store.version_dir(item.tenant, item.name, version),
            created_at=created_at,
        )
        return record, text


@contextmanager
def _naming_item(index: int, item: PublishItem, is_batch: bool) -> Iterator[None]:
    """In a batch, prefix a RegistryError's message with the item it is about.

    The error keeps its type (NotFound stays NotFound); any other error gets the same words as a
    note, so its type and attributes (an OSError's errno) stay untouched.
    """
    try:
        yield
    except RegistryError as error:
        if not is_batch:
            raise
        raise type(error)(f"item {index} ({item.tenant}/{item.name}): {error}") from error
    except Exception as error:
        if is_batch:
            error.add_note(f"while publishing item {index} ({item.tenant}/{item.name})")
        raise


def _committed(conn: sqlite3.Connection, record: AdapterRecord) -> bool:
    """Whether the transaction that inserted `record` committed (one that failed to commit
    may have been rolled back by SQLite: no longer in a transaction, and no row)."""
    if conn.in_transaction:
        return False
    return catalog.has_adapter(conn, record.tenant, record.name, record.version)


def _assign_versions(conn: sqlite3.Connection, items: Sequence[PublishItem]) -> list[int]:
    """The version each item gets, in item order; call under the catalog's write lock."""
    next_versions: dict[tuple[str, str], int] = {}
    versions: list[int] = []
    for item in items:
        key = (item.tenant, item.name)
        if key not in next_versions:
            next_versions[key] = catalog.next_version(conn, item.tenant, item.name)
        versions.append(next_versions[key])
        next_versions[key] += 1
    return versions


def _pin_current(conn: sqlite3.Connection, items: Sequence[PublishItem]) -> None:
    """Make each name's implicit latest (its highest version, where it has no pointer row)
    explicit before new rows arrive, so that an unpromoted version never becomes latest and a
    promoted one can be rolled back to what was served before."""
    now = time.time()
    for tenant, name in dict.fromkeys((item.tenant, item.name) for item in items):
        pointers.pin_current(conn, tenant, name, now)


def _promote(
    conn: sqlite3.Connection, items: Sequence[PublishItem], records: list[AdapterRecord]
) -> list[AdapterRecord]:
    """Move the pointers of promoted items, in item order; return the records with `is_latest`
    set on the last promoted version of each name."""
    now = time.time()
    latest: dict[tuple[str, str], int] = {}
    for item, record in zip(items, records, strict=True):
        if item.promote:
            pointers.promote(conn, item.tenant, item.name, record.version, now)
            latest[(item.tenant, item.name)] = record.version
    return [
        dataclasses.replace(r, is_latest=latest.get((r.tenant, r.name)) == r.version)
        for r in records
    ]
