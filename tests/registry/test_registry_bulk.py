"""publish_many: all or nothing, in one transaction."""

import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from registry import (
    AdapterRecord,
    InvalidAdapter,
    InvalidName,
    NotFound,
    PublishItem,
    Registry,
)
from registry import catalog as registry_catalog
from registry import store as registry_store

REPO_ROOT = Path(__file__).resolve().parents[2]
OTHER_BASE_SHA256 = "cd" * 32

# Publishes a batch, but dies (no cleanup, no exception handlers) at the chosen call of a step.
_CRASHING_BATCH_PUBLISHER = textwrap.dedent(
    """
    import os
    import sys

    from registry import PublishItem, Registry
    from registry import catalog

    root, base_sha256, step, *sources = sys.argv[1:]
    registry = Registry(root)
    real_rename = os.rename
    num_renames = 0

    def rename_then_crash(*args):
        global num_renames
        num_renames += 1
        if num_renames == 3:
            os._exit(3)
        real_rename(*args)

    def crash(*args, **kwargs):
        os._exit(3)

    if step == "rename":
        os.rename = rename_then_crash
    else:
        catalog.insert_adapter = crash
    manifest = {"labels": ["ham", "spam"], "base_sha256": base_sha256, "rank": 4}
    registry.publish_many([PublishItem("acme", "spam", source, manifest) for source in sources])
    """
)


def assert_nothing_stored(opened: Registry, tenants: tuple[str, ...] = ("acme",)) -> None:
    """No catalog row, no version directory and no temp dir in a registry that had none."""
    for tenant in tenants:
        assert opened.list_adapters(tenant) == []
    with sqlite3.connect(opened.root / "catalog.sqlite3") as conn:
        assert conn.execute("SELECT COUNT(*) FROM adapters").fetchone()[0] == 0
    assert list((opened.root / "adapters").iterdir()) == []


def count_copies(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every file the store copies from here on."""
    copied: list[Path] = []
    real_copy = registry_store.copy_synced

    def counting_copy(source: Path, target: Path, **kwargs: Any) -> tuple[str, int]:
        copied.append(source)
        return real_copy(source, target, **kwargs)

    monkeypatch.setattr(registry_store, "copy_synced", counting_copy)
    return copied


def fail_on_call(number: int, real: Callable[..., Any], error: BaseException) -> Callable[..., Any]:
    """`real`, except that call `number` (1-based) raises `error`."""
    num_calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal num_calls
        num_calls += 1
        if num_calls == number:
            raise error
        return real(*args, **kwargs)

    return wrapper


# round trips


def test_publish_many_round_trip(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    registry.create_tenant("globex")
    first = registry.publish("acme", "spam", make_adapter(), manifest)
    on_other = {**manifest, "base_sha256": OTHER_BASE_SHA256}
    wanted = [
        ("acme", "spam", manifest),
        ("acme", "legal", manifest),
        ("globex", "spam", on_other),
        ("acme", "spam", on_other),
        ("acme", "spam", manifest),
    ]
    sources = [make_adapter(seed=seed) for seed in range(len(wanted))]
    items = [
        PublishItem(tenant, name, source, item_manifest)
        for (tenant, name, item_manifest), source in zip(wanted, sources, strict=True)
    ]

    records = registry.publish_many(items)

    refs = [record.ref for record in records]
    assert refs == ["acme/spam@2", "acme/legal@1", "globex/spam@1", "acme/spam@3", "acme/spam@4"]
    for record, source in zip(records, sources, strict=True):
        assert registry.resolve(record.tenant, record.name, record.version) == record
        verified = registry.read_verified(record)
        assert dict(verified.files) == {path.name: path.read_bytes() for path in source.iterdir()}
        assert record.manifest["version"] == record.version
    listed = [record.ref for record in registry.list_adapters("acme")]
    assert listed == ["acme/legal@1", "acme/spam@1", "acme/spam@2", "acme/spam@3", "acme/spam@4"]
    dependents = [record.ref for record in registry.dependents(manifest["base_sha256"])]
    assert dependents == ["acme/legal@1", "acme/spam@1", "acme/spam@2", "acme/spam@4"]
    on_other_refs = [record.ref for record in registry.dependents(OTHER_BASE_SHA256)]
    assert on_other_refs == ["acme/spam@3", "globex/spam@1"]
    assert registry.resolve("acme", "spam", 1) == first
    assert not list((registry.root / "adapters").glob(".tmp-*"))


def test_publish_many_of_one_item_equals_publish(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    source = make_adapter()
    (record,) = registry.publish_many([PublishItem("acme", "spam", str(source), manifest)])
    assert record.ref == "acme/spam@1"
    assert registry.read_verified(record).record == record
    assert registry.publish("acme", "spam", source, manifest).content_sha256 == (
        record.content_sha256
    )


def test_publish_many_of_nothing_does_nothing(registry: Registry) -> None:
    assert registry.publish_many([]) == []
    assert_nothing_stored(registry)


def test_publish_item_is_frozen(manifest: dict[str, Any]) -> None:
    item = PublishItem("acme", "spam", "source", manifest)
    with pytest.raises(AttributeError):
        item.name = "ham"  # type: ignore[misc]


def test_concurrent_batches_get_consecutive_versions(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    batch_size = 5
    sources = [make_adapter(seed=seed) for seed in range(batch_size)]
    items = [PublishItem("acme", "spam", source, manifest) for source in sources]
    start = threading.Barrier(4)

    def publish_batch(_: int) -> list[AdapterRecord]:
        start.wait()
        return registry.publish_many(items)

    with ThreadPoolExecutor(max_workers=4) as pool:
        batches = list(pool.map(publish_batch, range(4)))
    for batch in batches:
        versions = [record.version for record in batch]
        assert versions == list(range(versions[0], versions[0] + batch_size))
    all_versions = sorted(record.version for batch in batches for record in batch)
    assert all_versions == list(range(1, 4 * batch_size + 1))


def test_a_thousand_items_in_one_call(
    tmp_path: Path, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    num_items = 1_000
    sources = [make_adapter(seed=seed) for seed in range(50)]
    items = [
        PublishItem("acme", f"adapter-{index % 100}", sources[index % 50], manifest)
        for index in range(num_items)
    ]
    with Registry(tmp_path / "registry", durable=False) as opened:
        opened.create_tenant("acme")
        records = opened.publish_many(items)
        assert [record.name for record in records] == [item.name for item in items]
        assert [record.version for record in records] == [
            index // 100 + 1 for index in range(num_items)
        ]
        assert len(opened.list_adapters("acme")) == num_items
        for record in records[::97]:
            assert opened.read_verified(record).record == record
        assert not list((opened.root / "adapters").glob(".tmp-*"))


# all or nothing


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"manifest": {"labels": ["ham"], "rank": 4}}, InvalidAdapter, "base_sha256"),
        ({"tenant": "initech"}, NotFound, "tenant 'initech' not found"),
        ({"name": "Bad/Name"}, InvalidName, "invalid adapter name"),
    ],
    ids=["bad-manifest", "missing-tenant", "bad-name"],
)
def test_a_bad_item_fails_the_batch_before_anything_is_copied(
    registry: Registry,
    make_adapter: Callable[..., Path],
    manifest: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    change: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    items = [PublishItem("acme", f"adapter-{i}", make_adapter(), manifest) for i in range(5)]
    fields = {"tenant": "acme", "name": "adapter-3", "source_dir": items[3].source_dir}
    items[3] = PublishItem(**{**fields, "manifest": manifest, **change})
    copied = count_copies(monkeypatch)
    with pytest.raises(error, match=rf"^item 3 \({items[3].tenant}/{items[3].name}\): .*{message}"):
        registry.publish_many(items)
    assert copied == []
    assert_nothing_stored(registry)


def test_a_non_item_is_refused(registry: Registry) -> None:
    with pytest.raises(TypeError, match="item 0 is a tuple"):
        registry.publish_many([("acme", "spam", "dir", {})])  # type: ignore[list-item]


def test_a_bad_adapter_fails_the_batch_and_leaves_nothing(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    sources = [make_adapter(seed=seed) for seed in range(6)]
    (sources[4] / "adapter_model.safetensors").write_bytes(b"not safetensors at all")
    items = [PublishItem("acme", "spam", source, manifest) for source in sources]
    with pytest.raises(InvalidAdapter, match=r"^item 4 \(acme/spam\): adapter_model.safetensors"):
        registry.publish_many(items)
    assert_nothing_stored(registry)
    # The message is the one publish gives, without the prefix.
    with pytest.raises(InvalidAdapter, match=r"^adapter_model.safetensors is not a safetensors"):
        registry.publish("acme", "spam", sources[4], manifest)


def insert_then_break_the_commit(
    conn: sqlite3.Connection, record: AdapterRecord, rel_path: str
) -> None:
    """insert_adapter, plus a deferred foreign-key violation: the INSERT passes, COMMIT fails."""
    REAL_INSERT_ADAPTER(conn, record, rel_path)
    conn.execute("PRAGMA defer_foreign_keys = ON")
    conn.execute("INSERT OR IGNORE INTO api_keys VALUES ('k', 'no-such-tenant', 0)")


REAL_INSERT_ADAPTER = registry_catalog.insert_adapter


@pytest.mark.parametrize(
    ("step", "failing_call"),
    [("rename", 1), ("rename", 4), ("insert", 1), ("insert", 5), ("commit", 0)],
)
def test_a_failure_during_install_leaves_nothing(
    registry: Registry,
    make_adapter: Callable[..., Path],
    manifest: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    step: str,
    failing_call: int,
) -> None:
    registry.create_tenant("globex")
    names = [("acme", "spam"), ("acme", "ham"), ("globex", "spam"), ("acme", "spam"), ("acme", "x")]
    items = [
        PublishItem(tenant, name, make_adapter(seed=seed), manifest)
        for seed, (tenant, name) in enumerate(names)
    ]
    failure = OSError("disk on fire")
    if step == "rename":
        monkeypatch.setattr(os, "rename", fail_on_call(failing_call, os.rename, failure))
    elif step == "insert":
        broken = fail_on_call(failing_call, REAL_INSERT_ADAPTER, failure)
        monkeypatch.setattr(registry_catalog, "insert_adapter", broken)
    else:
        monkeypatch.setattr(registry_catalog, "insert_adapter", insert_then_break_the_commit)
    with pytest.raises((OSError, sqlite3.IntegrityError)):
        registry.publish_many(items)
    monkeypatch.undo()
    assert_nothing_stored(registry, tenants=("acme", "globex"))
    records = registry.publish_many(items)
    assert [record.ref for record in records][:4] == [
        "acme/spam@1",
        "acme/ham@1",
        "globex/spam@1",
        "acme/spam@2",
    ]


@pytest.mark.parametrize("step", ["rename", "insert"])
def test_a_crashed_batch_is_cleaned_up_on_open(
    tmp_path: Path, make_adapter: Callable[..., Path], manifest: dict[str, Any], step: str
) -> None:
    root = tmp_path / "registry"
    with Registry(root) as opened:
        opened.create_tenant("acme")
    sources = [str(make_adapter(seed=seed)) for seed in range(4)]
    command = [sys.executable, "-c", _CRASHING_BATCH_PUBLISHER, str(root)]
    command += [manifest["base_sha256"], step, *sources]
    assert subprocess.run(command, cwd=REPO_ROOT, check=False).returncode == 3
    adapters = root / "adapters"
    # One temp dir for the whole batch, one slot per item not yet renamed.
    num_left_in_temp = 2 if step == "rename" else 0
    assert len(list(adapters.glob(".tmp-*/*/adapter_model.safetensors"))) == num_left_in_temp
    assert len(list(adapters.glob("acme/spam/*/graft_manifest.json"))) == 4 - num_left_in_temp

    with Registry(root) as reopened:
        assert list(adapters.iterdir()) == []
        assert reopened.list_adapters("acme") == []
        items = [PublishItem("acme", "spam", source, manifest) for source in sources]
        assert [record.version for record in reopened.publish_many(items)] == [1, 2, 3, 4]


def test_parent_directories_are_fsynced_once_per_batch(
    registry: Registry,
    make_adapter: Callable[..., Path],
    manifest: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    synced: list[Path] = []
    real_fsync_dir = registry_store.fsync_dir

    def recording_fsync_dir(path: Path) -> None:
        synced.append(path)
        real_fsync_dir(path)

    monkeypatch.setattr(registry_store, "fsync_dir", recording_fsync_dir)
    sources = [make_adapter(seed=seed) for seed in range(6)]
    names = ["spam", "spam", "ham", "spam", "ham", "legal"]
    items = [
        PublishItem("acme", name, source, manifest)
        for name, source in zip(names, sources, strict=True)
    ]
    registry.publish_many(items)
    adapters = registry.root / "adapters"
    parents = [adapters / "acme" / name for name in ("spam", "ham", "legal")]
    parents += [adapters / "acme", adapters]
    # Each staged directory once (with its manifest), then each parent once for the batch.
    staged = [path for path in synced if path.parent.name.startswith(".tmp-")]
    assert len(staged) == len(set(staged)) == len(items)
    assert sorted(path for path in synced if path not in staged) == sorted(parents)
