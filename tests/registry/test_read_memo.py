"""On an event loop, one catalog check serves every task of a turn, and nothing that follows a
commit is answered from before it."""

import asyncio
import subprocess
import sys
from pathlib import Path

from registry import Registry


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


def test_the_tasks_of_one_turn_share_one_check(tmp_path: Path) -> None:
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

        asyncio.run(main())
        assert registry.authenticate(key) == "acme"  # no event loop: every read checks
        assert registry.authenticate(key) == "acme"
        assert statements.count("PRAGMA data_version") == 4


def test_what_follows_a_commit_in_another_process_sees_it(tmp_path: Path) -> None:
    """The task that waited for the commit checks again, and a task queued after it runs in a
    later turn."""
    root = tmp_path / "reg"
    with Registry(root) as registry:
        key = registry.create_tenant("acme")

        async def authenticate() -> str | None:
            return registry.authenticate(key)

        async def waits_for_the_commit() -> tuple[str | None, str | None, str | None]:
            before = registry.authenticate(key)
            _revoke_in_another_process(root, "acme")
            return before, registry.authenticate(key), await asyncio.create_task(authenticate())

        async def main() -> None:
            assert await waits_for_the_commit() == ("acme", None, None)

        asyncio.run(main())


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
