"""Cold loads under pressure: taken tenant by tenant, dropped when nobody waits, and held to
the request's timeout."""

import asyncio
import threading
import time

import pytest

from engine import DeadlineExceeded, Engine, EngineConfig
from engine.adapter_store import adapter_key
from engine.loaders import TenantLoaders
from registry import Registry


@pytest.fixture
def registry(two_tenants: Registry) -> Registry:
    return two_tenants


def _record_reads(engine: Engine, delay_s: float) -> list[str]:
    """Make every disk read take ``delay_s``; returns the list of reads started, in order."""
    store, started = engine._loaded.store, []
    original = store.read

    def read(record):
        started.append(f"{record.tenant}/{record.name}")
        time.sleep(delay_s)
        return original(record)

    store.read = read  # type: ignore[method-assign]
    return started


def test_loader_threads_take_tenants_in_turn() -> None:
    loaders, order, gate = TenantLoaders(1, lambda: None), [], threading.Event()
    first = loaders.submit("acme", lambda: gate.wait(30))  # holds the one thread
    futures = [loaders.submit("acme", lambda i=i: order.append(f"acme{i}")) for i in range(3)]
    futures += [loaders.submit("globex", lambda: order.append("globex"))]
    gate.set()
    for future in [first, *futures]:
        future.result(timeout=30)
    loaders.shutdown()
    assert order == ["globex", "acme0", "acme1", "acme2"]  # FIFO put globex last


def test_a_cancelled_load_never_runs_and_shutdown_cancels_the_queue() -> None:
    loaders, ran, gate = TenantLoaders(1, lambda: None), [], threading.Event()
    loaders.submit("acme", lambda: gate.wait(30))
    dropped = loaders.submit("acme", lambda: ran.append("dropped"))
    kept = loaders.submit("acme", lambda: ran.append("kept"))
    assert dropped.cancel()
    gate.set()
    kept.result(timeout=30)
    assert ran == ["kept"] and loaders.num_running == 0
    # a tenant's dropped loads take no turns: they put globex's live one behind all of acme
    gate.clear()
    loaders.submit("acme", lambda: gate.wait(30))
    acme = [loaders.submit("acme", lambda i=i: ran.append(f"acme{i}")) for i in range(4)]
    dropped = [loaders.submit("globex", lambda: ran.append("dropped")) for _ in range(4)]
    live = loaders.submit("globex", lambda: ran.append("globex"))
    assert all(future.cancel() for future in dropped)
    gate.set()
    for future in (*acme, live):
        future.result(timeout=30)
    assert ran[1:] == ["globex", "acme0", "acme1", "acme2", "acme3"], ran
    del ran[1:]
    loaders.submit("acme", lambda: gate.wait(30))
    queued = loaders.submit("acme", lambda: ran.append("never"))
    loaders.shutdown(cancel_futures=True)
    assert queued.cancelled() and ran == ["kept"]
    with pytest.raises(RuntimeError, match="after shutdown"):
        loaders.submit("acme", lambda: None)


async def test_one_tenants_backlog_of_cold_loads_does_not_hold_anothers(
    registry: Registry, publish_random
) -> None:
    """Loads ran first in, first out: globex's cold start waited for all of acme's."""
    for i in range(5):
        publish_random(registry, "acme", f"a{i}", seed=i)
    publish_random(registry, "globex", "g")
    config = EngineConfig(registry_dir=registry.root, max_loads_in_flight=1)
    async with Engine(config) as engine:
        started = _record_reads(engine, 0.2)
        backlog = [asyncio.ensure_future(engine.classify("acme", f"a{i}", ["x"])) for i in range(5)]
        await asyncio.sleep(0.05)
        await engine.classify("globex", "g", ["y"])
        assert started[:2] == ["acme/a0", "globex/g"], started
        await asyncio.gather(*backlog)


async def test_loads_nobody_waits_for_any_more_are_dropped_unread(
    registry: Registry, publish_random
) -> None:
    """A tenant that asked for many cold adapters and went away kept every load queued."""
    for i in range(4):
        publish_random(registry, "acme", f"a{i}", seed=i)
    config = EngineConfig(registry_dir=registry.root, max_loads_in_flight=1)
    async with Engine(config) as engine:
        started = _record_reads(engine, 0.3)
        left = [asyncio.ensure_future(engine.classify("acme", f"a{i}", ["x"])) for i in range(4)]
        await asyncio.sleep(0.1)
        for request in left:
            request.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        assert engine.stats()["adapter_loads_in_flight"] == 1  # a0's read had begun
        await asyncio.sleep(0.5)
        assert started == ["acme/a0"] and engine.stats()["adapter_loads_in_flight"] == 0
        assert len(await engine.classify("acme", "a3", ["x"])) == 1  # loads again when asked


async def test_a_requests_timeout_covers_the_wait_for_its_adapters_load(
    registry: Registry, publish_random
) -> None:
    """It was checked only once the load ended: a 0.2 s timeout failed after the 2 s read."""
    publish_random(registry, "acme", "slow")
    publish_random(registry, "acme", "other", seed=1)
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        _record_reads(engine, 2.0)
        began = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="while model acme/slow loaded"):
            await engine.classify("acme", "slow", ["x"], timeout_s=0.2)
        with pytest.raises(DeadlineExceeded, match="timed out while model acme/.* loaded"):
            await engine.classify_many("acme", ["slow", "other"], ["x"], timeout_s=0.2)
        assert time.monotonic() - began < 1.5
        assert len(await engine.classify("acme", "slow", ["x"])) == 1  # the load went on
        stats = engine.stats()
        assert stats["requests_in_flight"] == 0 and stats["waiting_rows"] == 0


async def test_a_read_that_outlives_its_requests_is_kept_for_the_next(
    registry: Registry, publish_random
) -> None:
    """Its requests timed out while it ran; dropped on landing, every retry with the same
    timeout read the disk again and timed out again, for ever."""
    record = publish_random(registry, "acme", "slow")
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        _record_reads(engine, 1.0)
        with pytest.raises(DeadlineExceeded):
            await engine.classify("acme", "slow", ["x"], timeout_s=0.5)
        await asyncio.sleep(1.0)  # the read lands with nobody waiting for it
        store = engine._loaded.store
        assert store.residency(adapter_key(record)) == "host"
        assert not store._host._entries[adapter_key(record)].pins  # evictable
        assert len(await engine.classify("acme", "slow", ["x"], timeout_s=0.5)) == 1
        assert engine.stats()["adapter_disk_loads"] == 1
