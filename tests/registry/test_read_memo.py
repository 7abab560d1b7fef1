"""Reads answered from the memo see every commit: graft's own commits at once, through the
change signal beside the catalog (no query), and anyone's within BACKSTOP_S."""

import asyncio
import logging
import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from registry import Registry, read_memo
from registry.read_memo import BACKSTOP_S, ChangeSignal, ReadMemo

PRAGMA = "PRAGMA data_version"


def _traced(registry: Registry) -> list[str]:
    statements: list[str] = []
    with registry._read() as conn:
        conn.set_trace_callback(statements.append)
    return statements


def _revoke_in_another_process(root: Path, tenant: str) -> None:
    code = (
        "from registry import Registry\n"
        f"with Registry({str(root)!r}) as r:\n r.revoke_keys({tenant!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_reads_while_nothing_changes_ask_sqlite_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(read_memo, "BACKSTOP_S", 3600.0)
    with Registry(tmp_path / "reg") as registry:
        key = registry.create_tenant("acme")
        statements = _traced(registry)
        assert [registry.authenticate(key) for _ in range(50)] == ["acme"] * 50
        assert len(statements) == 2 and statements[0] == PRAGMA  # the check, then the key


def test_the_backstop_checks_sqlite_itself_every_so_often(tmp_path: Path) -> None:
    with Registry(tmp_path / "reg") as registry:
        key = registry.create_tenant("acme")
        statements = _traced(registry)
        assert registry.authenticate(key) == "acme"
        assert registry.authenticate(key) == "acme"
        assert statements.count(PRAGMA) == 1
        time.sleep(2 * BACKSTOP_S)
        assert registry.authenticate(key) == "acme"
        assert statements.count(PRAGMA) == 2


def test_a_commit_in_another_process_is_seen_by_the_next_read_even_in_the_same_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The signal alone tells: the backstop is made too slow to."""
    monkeypatch.setattr(read_memo, "BACKSTOP_S", 3600.0)
    root = tmp_path / "reg"
    with Registry(root) as registry:
        key = registry.create_tenant("acme")

        async def main() -> tuple[str | None, ...]:
            before = registry.authenticate(key)
            _revoke_in_another_process(root, "acme")  # the loop blocks for it
            return before, registry.authenticate(key)

        assert asyncio.run(main()) == ("acme", None)


def test_a_commit_in_this_process_is_seen_at_once(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    with Registry(root) as serving, Registry(root) as other:
        key = serving.create_tenant("acme")

        async def authenticate() -> str | None:
            return serving.authenticate(key)

        async def revoke() -> None:
            other.revoke_keys("acme")  # another Registry object: its own connections

        async def main() -> list[str | None]:
            return await asyncio.gather(authenticate(), revoke(), authenticate())

        assert asyncio.run(main()) == ["acme", None, None]


def test_a_commit_that_never_signals_is_seen_within_the_backstop(tmp_path: Path) -> None:
    """A program that writes the catalog without graft (or a writer that died between its
    commit and its signal)."""
    root = tmp_path / "reg"
    with Registry(root) as registry:
        key = registry.create_tenant("acme")
        assert registry.authenticate(key) == "acme"
        with sqlite3.connect(root / "catalog.sqlite3") as conn:
            conn.execute("DELETE FROM api_keys")
        deadline = time.monotonic() + BACKSTOP_S + 0.5  # room for a slow machine
        while registry.authenticate(key) is not None:
            assert time.monotonic() < deadline, "not seen within the backstop"
            time.sleep(BACKSTOP_S / 10)


def test_each_commit_rewrites_the_signal(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    with Registry(root) as registry:
        seen = [(root / "catalog.sqlite3-changes").read_bytes()]
        registry.create_tenant("acme")
        seen.append((root / "catalog.sqlite3-changes").read_bytes())
        registry.issue_key("acme")
        seen.append((root / "catalog.sqlite3-changes").read_bytes())
    assert [len(value) for value in seen] == [8, 8, 8]
    assert len(set(seen)) == 3


def test_without_a_signal_file_every_read_checks(tmp_path: Path) -> None:
    signal = ChangeSignal(tmp_path / "no-such-dir" / "changes", like=tmp_path / "catalog")
    assert signal.read() is None
    signal.signal()  # nothing to write to: not an error
    conn = sqlite3.connect(":memory:")
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    memo = ReadMemo(signal)
    memo.entries(conn)["a"] = 1
    assert memo.entries(conn) == {"a": 1}  # nothing changed: kept
    assert statements.count(PRAGMA) == 2
    signal.close()


def test_a_changed_signal_empties_the_memo(tmp_path: Path) -> None:
    signal = ChangeSignal(tmp_path / "changes", like=tmp_path / "catalog")
    conn = sqlite3.connect(":memory:")
    memo = ReadMemo(signal)
    memo.entries(conn)["a"] = 1
    assert memo.entries(conn) == {"a": 1}
    signal.signal()
    assert memo.entries(conn) == {}
    signal.close()
    assert signal.read() is None  # closed: reads check again


def test_the_signal_takes_the_catalogs_mode_whatever_the_umask(tmp_path: Path) -> None:
    """As SQLite's -wal and -shm: every account that may write the catalog may signal."""
    (tmp_path / "catalog").write_bytes(b"")
    os.chmod(tmp_path / "catalog", 0o664)
    before = os.umask(0o077)
    try:
        signal = ChangeSignal(tmp_path / "changes", like=tmp_path / "catalog")
    finally:
        os.umask(before)
    assert stat.S_IMODE(os.stat(tmp_path / "changes").st_mode) == 0o664
    signal.close()


def test_a_read_only_signal_is_read_and_its_process_warned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "changes"
    ChangeSignal(path, like=tmp_path / "catalog").close()  # made by another account
    real_open = os.open

    def no_writing(name, flags, *args):  # an existing file fails O_EXCL first, as here
        if os.fspath(name) == os.fspath(path) and flags & os.O_RDWR and not flags & os.O_EXCL:
            raise PermissionError(13, "Permission denied", os.fspath(name))
        return real_open(name, flags, *args)

    monkeypatch.setattr(os, "open", no_writing)
    with caplog.at_level(logging.WARNING, logger="registry.read_memo"):
        signal = ChangeSignal(path, like=tmp_path / "catalog")
    assert "read-only here" in caplog.text
    assert signal.read() == path.read_bytes()
    signal.signal()  # cannot: a no-op
    assert signal.read() == path.read_bytes()
    monkeypatch.undo()
    writer = ChangeSignal(path, like=tmp_path / "catalog")
    writer.signal()
    assert signal.read() == writer.read()  # it still sees other processes' signals
    writer.close()
    signal.close()


def test_a_failed_signal_never_fails_the_commit_it_follows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Registry(tmp_path / "reg") as registry:
        changes = registry._catalog.changes
        assert changes is not None and changes._fd is not None
        kept, changes._fd = changes._fd, os.open(os.devnull, os.O_RDONLY)  # pwrite: EBADF
        try:
            with caplog.at_level(logging.WARNING, logger="registry.read_memo"):
                key = registry.create_tenant("acme")
        finally:
            os.close(changes._fd)
            changes._fd = kept
        assert "not written" in caplog.text
        assert registry.authenticate(key) == "acme"


def test_a_write_that_commits_and_then_fails_still_signals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(read_memo, "BACKSTOP_S", 3600.0)
    with Registry(tmp_path / "reg") as registry:
        key = registry.create_tenant("acme")
        assert registry.authenticate(key) == "acme"
        with pytest.raises(RuntimeError), registry._catalog.write() as conn:
            conn.execute("DELETE FROM api_keys")
            conn.commit()
            raise RuntimeError("after the commit")
        assert registry.authenticate(key) is None
