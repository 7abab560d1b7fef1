"""A deleted version's weights leave the engine's memory (Engine.forget), not only the disk."""

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator

import pytest

from engine import Engine, EngineConfig
from engine.adapter_store import adapter_key
from registry import Registry


async def _settled(engine: Engine, key: str, residency: str) -> None:
    """Wait for the model thread to act on what the event loop asked of it."""
    store = engine._loaded.store
    for _ in range(200):
        if store.residency(key) == residency:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{key} is {store.residency(key)}, not {residency}")


@contextlib.asynccontextmanager
async def _old_version_resident(registry, publish_random) -> AsyncIterator[tuple]:
    """Two versions of acme/spam, the first served once: on the host and on the device."""
    old = publish_random(registry, "acme", "spam", seed=1)
    publish_random(registry, "acme", "spam", seed=2)
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        await engine.classify("acme", f"spam@{old.version}", ["win cash"])
        await _settled(engine, adapter_key(old), "device")
        yield engine, old


async def test_a_deleted_idle_version_leaves_both_tiers(registry, publish_random) -> None:
    async with _old_version_resident(registry, publish_random) as (engine, old):
        key = adapter_key(old)
        before = engine.stats()
        engine.forget(engine.registry.delete("acme", "spam", old.version))
        await _settled(engine, key, "disk")
        after = engine.stats()
        assert after["adapter_host_entries"] == before["adapter_host_entries"] - 1
        assert after["adapter_device_resident"] == before["adapter_device_resident"] - 1
        assert after["adapter_device_evictions"] == before["adapter_device_evictions"]
        assert len(await engine.classify("acme", "spam", ["win cash"])) == 1  # v2 serves on


async def test_forget_called_from_another_thread_is_done_on_the_event_loop(
    registry, publish_random
) -> None:
    """An embedder deleting from a worker thread: the store's loop-only state is touched on
    the loop, not from that thread."""
    async with _old_version_resident(registry, publish_random) as (engine, old):
        key = adapter_key(old)
        store, threads = engine._loaded.store, []
        forget_where = store.forget_where

        def noting_thread(matches) -> None:
            threads.append(threading.get_ident())
            forget_where(matches)

        store.forget_where = noting_thread  # type: ignore[method-assign]
        deleted = engine.registry.delete("acme", "spam", old.version)
        await asyncio.to_thread(engine.forget, deleted)
        await _settled(engine, key, "disk")
        assert threads == [threading.get_ident()]


async def test_a_load_that_starts_just_after_the_forget_is_not_kept(
    registry, publish_random
) -> None:
    """Another process committed the delete, this engine's watch forgot the version, and a
    request that had resolved it before the commit loads it from files not yet removed: it is
    answered, and the weights leave both tiers after it, not at LRU's leisure."""
    old = publish_random(registry, "acme", "spam", seed=1)
    publish_random(registry, "acme", "spam", seed=2)
    config = EngineConfig(registry_dir=registry.root, settings_poll_s=3600.0)
    async with Engine(config) as engine:
        key = adapter_key(old)
        engine._loaded.store.forget_where(key.__eq__)  # the watch's part, before any load
        (answer,) = await engine.classify("acme", f"spam@{old.version}", ["win cash"])
        assert answer.label in ("neg", "pos")
        await _settled(engine, key, "disk")
        await engine.classify("acme", "spam", ["win cash"])  # the other version stays
        assert engine._loaded.store.residency(adapter_key(old)) == "disk"


async def test_a_version_deleted_under_a_request_goes_when_the_request_ends(
    registry, publish_random
) -> None:
    """Its load had read the files when the delete came: the request still gets its answer
    from the version it resolved, and the weights leave both tiers after it."""
    old = publish_random(registry, "acme", "spam", seed=1)
    publish_random(registry, "acme", "spam", seed=2)
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        store = engine._loaded.store
        read, gate, done_reading = store.read, threading.Event(), threading.Event()

        def gated_read(record):
            weights = read(record)
            done_reading.set()
            assert gate.wait(timeout=30), "gate never opened"
            return weights

        store.read = gated_read  # type: ignore[method-assign]
        request = asyncio.create_task(engine.classify("acme", f"spam@{old.version}", ["win"]))
        assert await asyncio.to_thread(done_reading.wait, 30)
        engine.forget(engine.registry.delete("acme", "spam", old.version))
        gate.set()
        (answer,) = await request
        assert answer.label in ("neg", "pos")
        await _settled(engine, adapter_key(old), "disk")
        assert engine.stats()["adapter_device_resident"] == 0


async def test_deletions_made_elsewhere_reach_the_engines_memory(registry, publish_random) -> None:
    """The CLI, or another server on the same registry, deleted them: this engine forgets
    them within ``settings_poll_s``, and keeps the versions nobody deleted."""
    registry.create_tenant("globex")
    old = publish_random(registry, "acme", "spam", seed=1)
    publish_random(registry, "acme", "spam", seed=2)
    other = publish_random(registry, "globex", "news", seed=3)
    config = EngineConfig(registry_dir=registry.root, settings_poll_s=0.05)
    async with Engine(config) as engine:
        for model in ("spam@1", "spam@2"):
            await engine.classify("acme", model, ["win cash"])
        await engine.classify("globex", "news", ["markets rally"])
        kept = adapter_key(engine.registry.resolve("acme", "spam", 2))
        for key in (adapter_key(old), kept, adapter_key(other)):
            await _settled(engine, key, "device")
        cli = Registry(registry.root)  # another process's view of the same registry
        cli.delete("acme", "spam", old.version)
        await _settled(engine, adapter_key(old), "disk")
        cli.delete_tenant("globex")
        await _settled(engine, adapter_key(other), "disk")
        cli.close()
        assert engine._loaded.store.residency(kept) == "device"


async def test_a_delete_between_a_loads_end_and_its_put_on_the_host_is_kept(
    registry, publish_random
) -> None:
    """The load has finished, its waiters have not resumed yet: the key must still be found."""
    old = publish_random(registry, "acme", "spam", seed=1)
    publish_random(registry, "acme", "spam", seed=2)
    quiet = EngineConfig(registry_dir=registry.root, settings_poll_s=3600)  # no watch to help
    async with Engine(quiet) as engine:
        store, key = engine._loaded.store, adapter_key(old)
        request = asyncio.create_task(engine.classify("acme", f"spam@{old.version}", ["win"]))
        while key not in store._loading:
            await asyncio.sleep(0)
        store._loading[key].landed.add_done_callback(  # runs before the waiting request resumes
            lambda _: engine.forget(engine.registry.delete("acme", "spam", old.version))
        )
        (answer,) = await request
        assert answer.label in ("neg", "pos")
        await _settled(engine, key, "disk")


async def test_a_cancelled_request_of_a_deleted_version_fails_no_neighbour(
    registry, publish_random
) -> None:
    """Its rows are in a step already planned: the step still holds their adapter on the host,
    so the step runs, and the other tenant's rows in it get their answers."""
    registry.create_tenant("globex")
    old = publish_random(registry, "acme", "spam", seed=1)
    publish_random(registry, "acme", "spam", seed=2)
    publish_random(registry, "globex", "news", seed=3)
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        store, key = engine._loaded.store, adapter_key(old)
        await engine.classify("acme", f"spam@{old.version}", ["warm"])
        await engine.classify("globex", "news", ["warm"])
        await asyncio.wrap_future(engine._executor.submit(store._memory._drop, key))  # LRU's
        gate = threading.Event()
        engine._executor.submit(gate.wait, 30)  # the model thread is busy meanwhile
        doomed = asyncio.create_task(engine.classify("acme", f"spam@{old.version}", ["win"]))
        neighbour = asyncio.create_task(engine.classify("globex", "news", ["markets"]))
        await asyncio.sleep(0.3)
        engine.forget(engine.registry.delete("acme", "spam", old.version))
        doomed.cancel()
        await asyncio.sleep(0.1)
        gate.set()
        (answer,) = await neighbour
        assert answer.label in ("neg", "pos")
        await _settled(engine, key, "disk")


@pytest.mark.parametrize("where", ["host", "device"])
async def test_a_failed_forget_is_tried_again_at_the_next_check(
    registry, publish_random, where: str
) -> None:
    """Whether the host tier's part raised or the model thread's failed: tried again."""
    from concurrent.futures import Future

    from engine.deletions import DeletionWatch

    record = publish_random(registry, "acme", "spam", seed=1)
    publish_random(registry, "acme", "spam", seed=2)
    asked: list[bool] = []

    def forget_where(matches) -> Future:
        asked.append(matches(adapter_key(record)))
        device: Future = Future()
        if len(asked) == 1 and where == "host":
            raise RuntimeError("the host tier's part failed")
        if len(asked) == 1:
            device.set_exception(RuntimeError("the model thread's part failed"))
        else:
            device.set_result(None)
        return device

    watch = DeletionWatch(registry, forget_where)
    await watch.check()
    assert asked == []  # nothing deleted since the watch began
    registry.delete("acme", "spam", record.version)
    with pytest.raises(RuntimeError, match="part failed"):
        await watch.check()
    await watch.check()
    await watch.check()
    assert asked == [True, True]  # once more after the failure, then no more
