"""Deleting versions, names and tenants: files and rows go together, numbers are never reused."""

import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from registry import NotFound, Registry, RegistryError, VersionInUse, deletion
from server.cli import main

Make = Callable[..., Path]


def _publish(registry: Registry, make: Make, manifest: dict[str, Any], **kwargs: Any) -> int:
    return registry.publish("acme", "spam", make(), manifest, **kwargs).version


def _versions(registry: Registry, name: str = "spam") -> list[int]:
    return [r.version for r in registry.list_adapters("acme") if r.name == name]


def _leftovers(registry: Registry) -> list[str]:
    return sorted(e for e in os.listdir(registry.root / "adapters") if e.startswith("."))


def test_delete_one_version_keeps_the_others_and_never_reuses_its_number(
    registry: Registry, make_adapter: Make, manifest: dict[str, Any]
) -> None:
    for _ in range(3):
        _publish(registry, make_adapter, manifest)
    registry.promote("acme", "spam", 2)
    third = registry.resolve("acme", "spam", 3)
    (deleted,) = registry.delete("acme", "spam", 3)
    assert deleted == third and not third.path.exists()
    assert _versions(registry) == [1, 2] and registry.resolve("acme", "spam").version == 2
    with pytest.raises(NotFound, match="acme/spam version 3 was deleted"):
        registry.resolve("acme", "spam", 3)
    with pytest.raises(NotFound, match="version 3 was deleted"):
        registry.delete("acme", "spam", 3)
    # the highest number was deleted, and still the next publish numbers after it
    assert _publish(registry, make_adapter, manifest, promote=False) == 4
    assert _leftovers(registry) == []


def test_the_version_a_name_serves_is_refused_while_others_remain(
    registry: Registry, make_adapter: Make, manifest: dict[str, Any]
) -> None:
    _publish(registry, make_adapter, manifest)
    latest = registry.resolve("acme", "spam", _publish(registry, make_adapter, manifest))
    with pytest.raises(VersionInUse, match="version 2 is what acme/spam serves"):
        registry.delete("acme", "spam", 2)
    assert latest.path.is_dir() and _versions(registry) == [1, 2]
    assert registry.resolve("acme", "spam") == latest
    registry.rollback("acme", "spam")
    registry.delete("acme", "spam", 2)
    assert registry.resolve("acme", "spam").version == 1 and _leftovers(registry) == []


def test_rollback_skips_a_deleted_version(
    registry: Registry, make_adapter: Make, manifest: dict[str, Any]
) -> None:
    for _ in range(3):
        _publish(registry, make_adapter, manifest)  # promoted in turn: history 1, 2, 3
    registry.delete("acme", "spam", 2)
    assert registry.rollback("acme", "spam")[1].version == 1


def test_delete_a_whole_name(
    registry: Registry, make_adapter: Make, manifest: dict[str, Any]
) -> None:
    for _ in range(2):
        _publish(registry, make_adapter, manifest)
    registry.publish("acme", "news", make_adapter(), manifest)
    assert [r.version for r in registry.delete("acme", "spam")] == [1, 2]
    assert not (registry.root / "adapters" / "acme" / "spam").exists()
    assert [r.name for r in registry.list_adapters("acme")] == ["news"]
    with pytest.raises(NotFound, match="adapter acme/spam was deleted"):
        registry.resolve("acme", "spam")
    with pytest.raises(NotFound, match="adapter acme/spam was deleted"):
        registry.delete("acme", "spam")
    with pytest.raises(NotFound, match="not found"):
        registry.delete("acme", "never")
    with pytest.raises(NotFound, match="tenant 'nobody' not found"):
        registry.delete("nobody", "spam")
    # published again, the name starts after every number it ever had, with a fresh history
    again = registry.publish("acme", "spam", make_adapter(), manifest)
    assert again.version == 3 and again.is_latest
    with pytest.raises(NotFound, match="no previously promoted version"):
        registry.rollback("acme", "spam")


def test_delete_tenant_removes_keys_settings_and_files(
    registry: Registry, make_adapter: Make, manifest: dict[str, Any]
) -> None:
    key = registry.issue_key("acme")
    registry.set_tenant_settings("acme", {"weight": 2.0})
    _publish(registry, make_adapter, manifest)
    registry.publish("acme", "news", make_adapter(), manifest)
    registry.create_tenant("bob")
    registry.publish("bob", "spam", make_adapter(), manifest)
    assert registry.authenticate(key) == "acme"
    assert sorted(r.name for r in registry.delete_tenant("acme")) == ["news", "spam"]
    assert registry.authenticate(key) is None and registry.tenants() == ["bob"]
    assert registry.tenant_settings() == {}
    assert not (registry.root / "adapters" / "acme").exists()
    assert registry.resolve("bob", "spam").path.is_dir()
    with pytest.raises(NotFound, match="tenant 'acme' not found"):
        registry.delete_tenant("acme")
    # a tenant created again under the name never gets the old numbers
    registry.create_tenant("acme")
    assert _publish(registry, make_adapter, manifest) == 2


def test_a_failed_delete_changes_nothing(
    registry: Registry, make_adapter: Make, manifest: dict[str, Any], monkeypatch
) -> None:
    key = registry.issue_key("acme")
    for _ in range(2):
        _publish(registry, make_adapter, manifest)
    before = registry.list_adapters("acme")

    def fail(*args: Any) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(deletion, "delete_tenant_rows", fail)
    with pytest.raises(OSError, match="disk gone"):
        registry.delete_tenant("acme")
    assert registry.list_adapters("acme") == before and registry.authenticate(key) == "acme"
    for record in before:  # the files were put back, and still verify
        assert registry.read_verified(record).files
    assert _leftovers(registry) == []


def test_another_process_sees_the_delete(
    registry: Registry, make_adapter: Make, manifest: dict[str, Any]
) -> None:
    for _ in range(2):
        _publish(registry, make_adapter, manifest, promote=False)
    with Registry(registry.root) as other:
        assert other.resolve("acme", "spam", 1).version == 1  # now in its memo
        registry.delete("acme", "spam", 1)
        with pytest.raises(NotFound, match="version 1 was deleted"):
            other.resolve("acme", "spam", 1)


def test_cli_delete_asks_for_yes_then_deletes(
    tmp_path: Path, make_adapter: Make, manifest: dict[str, Any], capsys
) -> None:
    root = tmp_path / "reg"
    with Registry(root) as registry:
        registry.create_tenant("acme")
        for _ in range(3):
            _publish(registry, make_adapter, manifest, promote=False)
        registry.promote("acme", "spam", 1)
    reg = ["--registry", str(root)]
    assert main(["adapters", "delete", "acme/spam@2", *reg]) == 1  # a dry run
    assert capsys.readouterr().out.strip() == (
        "acme/spam: would delete version(s) 2, files included; repeat with --yes to delete"
    )
    assert main(["adapters", "delete", "acme/spam@2", "--yes", *reg]) == 0
    assert capsys.readouterr().out.strip() == "acme/spam: deleted version(s) 2"
    for confirmed in ([], ["--yes"]):  # the dry run refuses what the real one would
        assert main(["adapters", "delete", "acme/spam@1", *confirmed, *reg]) == 2
        assert "version 1 is what acme/spam serves" in capsys.readouterr().err
    assert main(["adapters", "delete", "acme/spam@9", *reg]) == 2
    assert "no version 9" in capsys.readouterr().err
    assert main(["adapters", "delete", "spam", "--yes", *reg]) == 2
    assert "expected TENANT/NAME[@VERSION]" in capsys.readouterr().err
    assert main(["adapters", "delete", "acme/spam", "--yes", *reg]) == 0
    assert capsys.readouterr().out.strip() == "acme/spam: deleted version(s) 1, 3"
    assert main(["tenants", "delete", "acme", *reg]) == 1
    assert "its API keys and its 0 adapter version(s)" in capsys.readouterr().out
    assert main(["tenants", "delete", "acme", "--yes", *reg]) == 0
    assert "deleted tenant 'acme'" in capsys.readouterr().out
    assert main(["tenants", "delete", "acme", "--yes", *reg]) == 2
    assert "tenant 'acme' not found" in capsys.readouterr().err
    with Registry(root) as registry:
        assert registry.tenants() == []


def test_a_refused_or_dry_delete_leaves_the_files_untouched(
    registry: Registry, make_adapter: Make, manifest: dict[str, Any]
) -> None:
    """Readers of the served version must never find it gone because of a delete that did not
    happen: nothing is moved until the rows are deleted and committed."""
    for _ in range(2):
        _publish(registry, make_adapter, manifest)
    served = registry.resolve("acme", "spam")
    stamps = [(p.stat().st_ino, p.stat().st_ctime_ns) for p in (served.path, served.path.parent)]
    with pytest.raises(VersionInUse):
        registry.delete("acme", "spam", served.version)
    assert [r.version for r in registry.delete("acme", "spam", dry_run=True)] == [1, 2]
    assert [r.version for r in registry.delete_tenant("acme", dry_run=True)] == [1, 2]
    assert [(p.stat().st_ino, p.stat().st_ctime_ns) for p in (served.path, served.path.parent)] == (
        stamps
    )
    assert _versions(registry) == [1, 2] and registry.tenants() == ["acme"]


def test_a_crash_before_the_commit_keeps_everything_and_after_it_loses_nothing_served(
    registry: Registry, make_adapter: Make, manifest: dict[str, Any]
) -> None:
    for _ in range(3):
        _publish(registry, make_adapter, manifest, promote=False)
    records = registry.list_adapters("acme")

    def crash_in(step: str) -> None:
        pid = os.fork()
        if pid == 0:  # the child dies at `step`, as a killed process would
            target = deletion if step == "rows" else registry._store
            name = "delete_versions" if step == "rows" else "remove_deleted"
            original = getattr(target, name)

            def die(*args: Any) -> None:
                original(*args)
                os._exit(1) if step == "rows" else os._exit(0)

            setattr(target, name, die if step == "rows" else lambda paths: os._exit(0))
            registry.delete("acme", "spam", 1 if step == "rows" else 2)
            os._exit(2)
        assert os.waitpid(pid, 0)[1] != 2 << 8

    crash_in("rows")  # died inside the transaction: rolled back, files in place
    with Registry(registry.root) as reopened:
        assert _versions(reopened) == [1, 2, 3]
        assert all(reopened.read_verified(record).files for record in records)
    crash_in("files")  # died after the commit, before removing the files
    assert records[1].path.is_dir()
    with Registry(registry.root) as reopened:  # opening removes what the crash left
        assert _versions(reopened) == [1, 3] and not records[1].path.exists()
        assert reopened.read_verified(records[0]).files and _leftovers(reopened) == []


def test_history_without_the_deleted_versions_has_no_empty_rollback(
    registry: Registry, make_adapter: Make, manifest: dict[str, Any]
) -> None:
    for _ in range(2):
        _publish(registry, make_adapter, manifest)
    registry.promote("acme", "spam", 1)  # history 1, 2, 1
    registry.delete("acme", "spam", 2)
    with pytest.raises(NotFound, match="no previously promoted version"):
        registry.rollback("acme", "spam")  # not "from 1 to 1"


def test_deleted_names_are_kept_as_hashes_and_newer_catalogs_are_refused(
    registry: Registry, make_adapter: Make, manifest: dict[str, Any]
) -> None:
    registry.publish("acme", "confidential-merger", make_adapter(), manifest)
    registry.resolve("acme", "confidential-merger")  # a reader connection stays open
    registry.delete_tenant("acme")
    for path in registry.root.glob("catalog.sqlite3*"):  # the catalog and its log
        raw = path.read_bytes()
        assert b"confidential-merger" not in raw and b"acme" not in raw, path.name
    conn = sqlite3.connect(registry.root / "catalog.sqlite3")
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(RegistryError, match="schema 99, newer than this graft's"):
        Registry(registry.root)


def test_a_catalog_whose_tombstones_hold_names_is_upgraded(
    registry: Registry, make_adapter: Make, manifest: dict[str, Any]
) -> None:
    """A few development commits stored deleted versions by (tenant, name)."""
    for _ in range(2):
        _publish(registry, make_adapter, manifest)
    registry.close()
    conn = sqlite3.connect(registry.root / "catalog.sqlite3")
    conn.execute("DROP TABLE deleted_versions")
    conn.execute(
        "CREATE TABLE deleted_versions (tenant TEXT NOT NULL, name TEXT NOT NULL, "
        "version INTEGER NOT NULL, deleted_at REAL NOT NULL, PRIMARY KEY (tenant, name, version))"
    )
    conn.execute("INSERT INTO deleted_versions VALUES ('acme', 'spam', 7, 1.0)")
    conn.commit()
    conn.close()
    with Registry(registry.root) as reopened:
        with pytest.raises(NotFound, match="version 7 was deleted"):
            reopened.resolve("acme", "spam", 7)
        assert _publish(reopened, make_adapter, manifest) == 8


def test_deletions_since_a_stamp_name_each_deleted_version_once(
    registry: Registry, make_adapter: Make, manifest: dict[str, Any]
) -> None:
    assert registry.deletion_stamp() == 0 and registry.deletions_since(0) == (0, frozenset())
    for _ in range(3):
        _publish(registry, make_adapter, manifest)
    registry.publish("acme", "news", make_adapter(), manifest)
    registry.delete("acme", "spam", 1)
    first = registry.deletion_stamp()
    spam = deletion.name_key("acme", "spam")
    assert registry.deletions_since(0) == (first, frozenset({(spam, 1)}))
    registry.delete("acme", "spam", 2, dry_run=True)  # a dry run deletes nothing
    assert registry.deletions_since(first) == (first, frozenset())
    registry.delete_tenant("acme")
    stamp, deleted = registry.deletions_since(first)
    assert deleted == {(spam, 2), (spam, 3), (deletion.name_key("acme", "news"), 1)}
    assert stamp == registry.deletion_stamp() > first
    assert registry.deletions_since(stamp) == (stamp, frozenset())


def test_a_reader_holding_the_log_delays_a_delete_a_moment_not_the_busy_timeout(
    registry: Registry, make_adapter: Make, manifest: dict[str, Any], caplog
) -> None:
    """Truncating the log after a delete waits for readers, and every writer of every process
    waits behind it: a reader in a long transaction (a backup) held them all 30 s."""
    for _ in range(2):
        _publish(registry, make_adapter, manifest)
    reader = sqlite3.connect(registry.root / "catalog.sqlite3")
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM adapters").fetchone()
        started = time.monotonic()
        registry.delete("acme", "spam", 1)
        assert time.monotonic() - started < 5
    finally:
        reader.close()
    assert "log still holds deleted rows" in caplog.text
    assert _versions(registry) == [2]


def test_a_delete_whose_tidying_is_locked_out_still_reports_it_deleted(
    registry: Registry, make_adapter: Make, manifest: dict[str, Any], monkeypatch, caplog
) -> None:
    """After the commit, pruning empty directories takes the write lock again; another writer
    holding it past the busy timeout must not turn a done delete into an error."""
    record = registry.publish("acme", "spam", make_adapter(), manifest)
    write = registry._catalog.write
    calls = []

    def locked_after_the_first(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise sqlite3.OperationalError("database is locked")
        return write(*args, **kwargs)

    monkeypatch.setattr(registry._catalog, "write", locked_after_the_first)
    assert [r.version for r in registry.delete("acme", "spam")] == [1]
    monkeypatch.undo()
    assert not record.path.exists() and "stay until the registry next opens" in caplog.text
    with pytest.raises(NotFound, match="was deleted"):
        registry.resolve("acme", "spam", 1)


def test_cli_reports_a_locked_catalog_as_an_error_not_a_traceback(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    root = tmp_path / "reg"
    assert main(["--registry", str(root), "tenants", "create", "acme"]) == 0

    def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(Registry, "list_adapters", locked)
    assert main(["--registry", str(root), "adapters", "list", "--tenant", "acme"]) == 2
    assert "graft: error: the registry's catalog: database is locked" in capsys.readouterr().err
