"""The latest pointer: publish with and without promotion, promote, rollback, old catalogs, CLI."""

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from registry import NotFound, PublishItem, Registry, pointers
from server.cli import main

Make = Callable[..., Path]


def _publish(registry: Registry, make: Make, manifest: dict[str, Any], **kwargs: Any) -> int:
    return registry.publish("acme", "spam", make(), manifest, **kwargs).version


def _latest_flags(registry: Registry) -> dict[int, bool]:
    return {r.version: r.is_latest for r in registry.list_adapters("acme") if r.name == "spam"}


def test_publish_promotes_by_default_and_not_when_asked(
    registry: Registry, make_adapter: Make, manifest: dict[str, Any]
) -> None:
    _publish(registry, make_adapter, manifest)
    first = registry.publish("acme", "spam", make_adapter(seed=1), manifest)
    assert first.is_latest and registry.resolve("acme", "spam").version == 2
    candidate = registry.publish("acme", "spam", make_adapter(seed=2), manifest, promote=False)
    assert candidate.version == 3 and not candidate.is_latest
    assert registry.resolve("acme", "spam").version == 2
    assert registry.resolve("acme", "spam", 3).version == 3  # pinned still reaches it
    assert _latest_flags(registry) == {1: False, 2: True, 3: False}
    # is_latest is a reading of the pointer, not part of the version's identity
    assert registry.resolve("acme", "spam", 2) == first


def test_promote_and_rollback_walk_the_history(
    registry: Registry, make_adapter: Make, manifest: dict[str, Any]
) -> None:
    for seed in range(3):
        _publish(registry, make_adapter, manifest, promote=seed == 0)
    assert registry.resolve("acme", "spam").version == 1
    assert registry.promote("acme", "spam", 3).is_latest
    assert registry.promote("acme", "spam", 3).version == 3  # again: nothing recorded
    registry.promote("acme", "spam", 2)
    assert _latest_flags(registry) == {1: False, 2: True, 3: False}
    left, record = registry.rollback("acme", "spam")
    assert (left, record.version, record.is_latest) == (2, 3, True)
    left, record = registry.rollback("acme", "spam")
    assert (left, record.version) == (3, 1)
    assert registry.resolve("acme", "spam").version == 1
    with pytest.raises(NotFound, match="no previously promoted version.*latest is version 1"):
        registry.rollback("acme", "spam")
    assert registry.resolve("acme", "spam").version == 1


def test_promote_and_rollback_name_what_is_missing(
    registry: Registry, make_adapter: Make, manifest: dict[str, Any]
) -> None:
    _publish(registry, make_adapter, manifest)
    with pytest.raises(NotFound, match=r"no version 9 \(latest is 1\)"):
        registry.promote("acme", "spam", 9)
    for huge in (2**63, 2**70):  # past SQLite's integers: no such version, not OverflowError
        with pytest.raises(NotFound, match=rf"no version {huge} \(latest is 1\)"):
            registry.promote("acme", "spam", huge)
        with pytest.raises(NotFound, match=rf"no version {huge} \(latest is 1\)"):
            registry.resolve("acme", "spam", huge)
    with pytest.raises(NotFound, match="adapter acme/ham not found"):
        registry.promote("acme", "ham", 1)
    with pytest.raises(NotFound, match="adapter acme/ham not found"):
        registry.rollback("acme", "ham")
    with pytest.raises(NotFound, match="tenant 'initech'"):
        registry.promote("initech", "spam", 1)
    with pytest.raises(ValueError, match="version must be an int"):
        registry.promote("acme", "spam", "1")  # type: ignore[arg-type]
    assert registry.resolve("acme", "spam").version == 1


def test_a_first_version_not_promoted_is_only_reachable_pinned(
    registry: Registry, make_adapter: Make, manifest: dict[str, Any]
) -> None:
    _publish(registry, make_adapter, manifest, promote=False)
    with pytest.raises(NotFound, match=r"no promoted version: pin one \(spam@1\)"):
        registry.resolve("acme", "spam")
    assert registry.resolve("acme", "spam", 1).version == 1
    assert _latest_flags(registry) == {1: False}
    registry.promote("acme", "spam", 1)
    assert registry.resolve("acme", "spam").version == 1


def test_publish_many_moves_pointers_in_item_order(
    registry: Registry, make_adapter: Make, manifest: dict[str, Any]
) -> None:
    items = [
        PublishItem("acme", "spam", make_adapter(), manifest),
        PublishItem("acme", "spam", make_adapter(), manifest),
        PublishItem("acme", "spam", make_adapter(), manifest, promote=False),
        PublishItem("acme", "ham", make_adapter(), manifest, promote=False),
    ]
    records = registry.publish_many(items)
    assert [r.is_latest for r in records] == [False, True, False, False]
    assert registry.resolve("acme", "spam").version == 2
    assert registry.rollback("acme", "spam")[1].version == 1
    with pytest.raises(NotFound, match="no promoted version"):
        registry.resolve("acme", "ham")
    with pytest.raises(ValueError, match="promote must be a bool"):
        registry.publish_many([PublishItem("acme", "x", make_adapter(), manifest, promote=1)])  # type: ignore[arg-type]


def test_a_failed_move_changes_nothing(
    registry: Registry, make_adapter: Make, manifest: dict[str, Any], monkeypatch
) -> None:
    """The pointer, its history and (for publish) the version commit together or not at all."""
    _publish(registry, make_adapter, manifest)
    _publish(registry, make_adapter, manifest, promote=False)
    original = pointers._set_pointer

    def set_then_fail(*args: Any) -> None:
        original(*args)
        raise OSError("disk full")

    monkeypatch.setattr(pointers, "_set_pointer", set_then_fail)
    with pytest.raises(OSError, match="disk full"):
        registry.promote("acme", "spam", 2)
    with pytest.raises(OSError, match="disk full"):
        registry.publish("acme", "spam", make_adapter(), manifest)
    monkeypatch.undo()
    assert registry.resolve("acme", "spam").version == 1
    assert _latest_flags(registry) == {1: True, 2: False}
    with pytest.raises(NotFound, match="no previously promoted"):
        registry.rollback("acme", "spam")


def test_readers_never_see_a_half_moved_pointer(
    registry: Registry, make_adapter: Make, manifest: dict[str, Any]
) -> None:
    for _ in range(2):
        _publish(registry, make_adapter, manifest)
    stop = threading.Event()
    seen: set[int] = set()
    errors: list[BaseException] = []

    def read() -> None:
        while not stop.is_set():
            try:
                seen.add(registry.resolve("acme", "spam").version)
                assert sum(_latest_flags(registry).values()) == 1
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)
                return

    readers = [threading.Thread(target=read) for _ in range(2)]
    for thread in readers:
        thread.start()
    try:
        for i in range(40):
            registry.promote("acme", "spam", 1 + i % 2)
    finally:
        stop.set()
        for thread in readers:
            thread.join()
    assert not errors, errors[0]
    assert seen <= {1, 2}


def _downgrade(root: Path, *, keep_version: bool = False) -> None:
    """Make the catalog look as if older graft wrote it: no pointers, no history."""
    conn = sqlite3.connect(root / "catalog.sqlite3")
    with conn:
        conn.execute("DELETE FROM latest_pointers")
        conn.execute("DELETE FROM promotions")
        if not keep_version:
            conn.execute("DROP TABLE latest_pointers")
            conn.execute("DROP TABLE promotions")
            conn.execute("PRAGMA user_version = 1")
    conn.close()


def test_an_old_catalog_is_upgraded_with_its_history(
    tmp_path: Path, make_adapter: Make, manifest: dict[str, Any]
) -> None:
    root = tmp_path / "old"
    with Registry(root) as registry:
        registry.create_tenant("acme")
        for _ in range(3):
            _publish(registry, make_adapter, manifest)
    _downgrade(root)
    with Registry(root) as registry:
        assert registry.resolve("acme", "spam").version == 3
        assert _latest_flags(registry) == {1: False, 2: False, 3: True}
        assert registry.rollback("acme", "spam")[1].version == 2  # each publish was a promotion


def test_a_name_without_pointer_serves_its_highest_version(
    tmp_path: Path, make_adapter: Make, manifest: dict[str, Any]
) -> None:
    """Rows an older graft wrote into an upgraded catalog have no pointer: highest wins."""
    root = tmp_path / "mixed"
    with Registry(root) as registry:
        registry.create_tenant("acme")
        for _ in range(2):
            _publish(registry, make_adapter, manifest)
    _downgrade(root, keep_version=True)
    with Registry(root) as registry:
        assert registry.resolve("acme", "spam").version == 2
        assert _latest_flags(registry) == {1: False, 2: True}
        _publish(registry, make_adapter, manifest, promote=False)
        assert registry.resolve("acme", "spam").version == 2  # pinned before version 3 arrived
        registry.promote("acme", "spam", 3)
        assert registry.rollback("acme", "spam")[1].version == 2
    _downgrade(root, keep_version=True)
    with Registry(root) as registry:
        registry.promote("acme", "spam", 1)  # from an implicit latest (3): rollback returns there
        assert registry.rollback("acme", "spam")[1].version == 3
    _downgrade(root, keep_version=True)
    with Registry(root) as registry:
        _publish(registry, make_adapter, manifest)  # promoted over an implicit latest (3)
        assert registry.rollback("acme", "spam")[1].version == 3


# command line


def test_cli_promote_and_rollback(
    tmp_path: Path, make_adapter: Make, manifest: dict[str, Any], capsys
) -> None:
    root = tmp_path / "reg"
    with Registry(root) as registry:
        registry.create_tenant("acme")
        _publish(registry, make_adapter, manifest)
        _publish(registry, make_adapter, manifest, promote=False)
    reg = ["--registry", str(root)]
    assert main(["adapters", "promote", "acme/spam@2", *reg]) == 0
    assert capsys.readouterr().out.strip() == "acme/spam: latest is now version 2"
    assert main(["adapters", "rollback", "acme/spam", *reg]) == 0
    assert capsys.readouterr().out.strip() == "acme/spam: rolled back from version 2 to 1"
    assert main(["adapters", "rollback", "acme/spam", *reg]) == 2
    assert "no previously promoted version" in capsys.readouterr().err
    for argv in (["promote", "acme/spam"], ["promote", "spam@2"], ["rollback", "acme/spam@1"]):
        assert main(["adapters", *argv, *reg]) == 2
        assert "expected TENANT/NAME" in capsys.readouterr().err
    assert main(["adapters", "promote", "acme/spam@7", *reg]) == 2
    assert "no version 7" in capsys.readouterr().err
    with Registry(root) as registry:
        assert registry.resolve("acme", "spam").version == 1


def test_a_resolved_record_is_reused_until_another_process_moves_the_pointer(
    registry: Registry, make_adapter: Make, manifest: dict[str, Any]
) -> None:
    for seed in range(2):
        _publish(registry, make_adapter, manifest, promote=seed == 0)
    first = registry.resolve("acme", "spam")
    assert registry.resolve("acme", "spam") is first  # answered from the memo, no query
    with Registry(registry.root) as cli:  # the CLI in another process, in effect
        cli.promote("acme", "spam", 2)
        assert registry.resolve("acme", "spam").version == 2  # the very next read
        cli.rollback("acme", "spam")
    assert registry.resolve("acme", "spam").version == 1
    # another thread keeps its own memo and connection, and sees the same
    seen: list[int] = []
    worker = threading.Thread(target=lambda: seen.append(registry.resolve("acme", "spam").version))
    worker.start()
    worker.join()
    registry.promote("acme", "spam", 2)  # this process's own write: a connection of its own
    assert seen == [1] and registry.resolve("acme", "spam").version == 2


def test_the_read_memo_is_bounded() -> None:
    from registry.read_memo import ReadMemo

    conn = sqlite3.connect(":memory:")
    memo = ReadMemo(max_entries=2)
    entries = memo.entries(conn)
    entries.update(a=1, b=2)
    assert memo.entries(conn) == {}  # full: emptied whole, not grown
    memo.entries(conn)["c"] = 3
    assert memo.entries(conn) == {"c": 3}  # nothing changed: kept
