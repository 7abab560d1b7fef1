"""Kept read connections (one per thread): never a stale answer, never a leak."""

import threading
from pathlib import Path

from registry import Registry


def _opened(registry: Registry) -> int:
    return len(registry._catalog._readers)


def test_a_thread_reuses_its_read_connection(tmp_path: Path) -> None:
    with Registry(tmp_path / "reg") as registry:
        key = registry.create_tenant("acme")
        for _ in range(5):
            assert registry.authenticate(key) == "acme"
            assert registry.tenants() == ["acme"]
        assert _opened(registry) == 1


def test_writes_from_another_process_are_seen_at_once(tmp_path: Path) -> None:
    """The serving process keeps its connection; the CLI (another Registry on the same
    catalog) revokes a key or adds a tenant: the very next read answers from the new state."""
    with Registry(tmp_path / "reg") as serving, Registry(tmp_path / "reg") as cli:
        key = serving.create_tenant("acme")
        assert serving.authenticate(key) == "acme"
        cli.revoke_keys("acme")
        assert serving.authenticate(key) is None
        cli.create_tenant("beta")
        assert serving.tenants() == ["acme", "beta"]


def test_a_known_key_is_answered_without_a_query_until_the_catalog_changes(
    tmp_path: Path,
) -> None:
    """Every request authenticates: a key seen before costs the memo's version check, not a
    query; an unknown key is never kept, and a revocation is seen by the next call."""
    with Registry(tmp_path / "reg") as registry:
        key = registry.create_tenant("acme")
        assert registry.authenticate(key) == "acme"
        queries: list[str] = []
        with registry._read() as conn:  # this thread's kept read connection
            conn.set_trace_callback(queries.append)
        assert registry.authenticate(key) == "acme"
        assert not any("api_keys" in q for q in queries)
        wrong = registry.issue_key("acme")[:-4] + "abcd"
        assert registry.authenticate(wrong) is None and registry.authenticate(wrong) is None
        assert sum("api_keys" in q for q in queries) == 2  # asked each time, never kept
        registry.revoke_keys("acme")
        assert registry.authenticate(key) is None


def test_connections_of_ended_threads_are_closed(tmp_path: Path) -> None:
    with Registry(tmp_path / "reg") as registry:
        key = registry.create_tenant("acme")
        answers = []
        for _ in range(3):
            worker = threading.Thread(target=lambda: answers.append(registry.authenticate(key)))
            worker.start()
            worker.join()
        assert answers == ["acme"] * 3
        # each new thread's first read closed the connections ended threads left behind
        assert _opened(registry) == 1
        registry.authenticate(key)  # the main thread's own
        assert _opened(registry) == 1  # the last worker's ended, closed on this first read
    assert _opened(registry) == 0  # close() closed the rest
