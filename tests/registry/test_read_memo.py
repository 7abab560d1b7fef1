"""On an event loop, one catalog check serves the reads of a turn (1 ms at most), and nothing
queued after a commit is answered from before it."""

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from registry import Registry, read_memo
from registry.read_memo import SHARED_CHECK_S


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


def test_the_reads_of_one_turn_share_one_check(tmp_path: Path) -> None:
    with Registry(tmp_path / "reg") as registry:
        key = registry.create_tenant("acme")
        statements = _traced(registry)

        async def authenticate() -> str | None:
            return registry.authenticate(key)

        async def main() -> None:
            answers = await asyncio.gather(*(authenticate() for _ in range(8)))  # one turn
            assert answers == ["acme"] * 8
            assert statements.count("PRAGMA data_version") == 1
            assert await asyncio.create_task(authenticate()) == "acme"  # a later turn
            assert statements.count("PRAGMA data_version") == 2
            await asyncio.sleep(0)
            for _ in range(8):  # one task's reads in a row, as the front ends' link reader
                assert registry.authenticate(key) == "acme"
            assert statements.count("PRAGMA data_version") == 3
            time.sleep(2 * SHARED_CHECK_S)  # the same turn, but the check is too old
            assert registry.authenticate(key) == "acme"
            assert statements.count("PRAGMA data_version") == 4

        asyncio.run(main())
        assert registry.authenticate(key) == "acme"  # no event loop: every read checks
        assert registry.authenticate(key) == "acme"
        assert statements.count("PRAGMA data_version") == 6


def _reads_around_a_commit(root: Path) -> tuple[str | None, ...]:
    """In one task: a read, another process's commit the loop blocks for, a read in the same
    turn, and a read from a task queued after the commit."""
    with Registry(root) as registry:
        key = registry.create_tenant("acme")

        async def authenticate() -> str | None:
            return registry.authenticate(key)

        async def main() -> tuple[str | None, ...]:
            before = registry.authenticate(key)
            _revoke_in_another_process(root, "acme")
            same_turn = registry.authenticate(key)
            return before, same_turn, await asyncio.create_task(authenticate())

        return asyncio.run(main())


def test_what_follows_a_commit_in_another_process_sees_it(tmp_path: Path) -> None:
    """The loop blocked for more than 1 ms: even the same turn checks again."""
    assert _reads_around_a_commit(tmp_path / "reg") == ("acme", None, None)


def test_without_the_time_bound_only_the_same_turn_reads_from_before_a_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the 1 ms bound is for; a task queued after the commit checks in any case."""
    monkeypatch.setattr(read_memo, "SHARED_CHECK_S", 3600.0)
    assert _reads_around_a_commit(tmp_path / "reg") == ("acme", "acme", None)


def test_a_commit_in_this_process_ends_the_sharing_at_once(tmp_path: Path) -> None:
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
