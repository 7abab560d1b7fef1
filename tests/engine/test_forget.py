"""A deleted version's weights leave the engine's memory (Engine.forget), not only the disk."""

import asyncio
import threading
from pathlib import Path

import pytest

from engine import Engine, EngineConfig
from engine.adapter_store import adapter_key
from registry import Registry


@pytest.fixture
def registry(tmp_path: Path):
    reg = Registry(tmp_path / "reg")
    reg.create_tenant("acme")
    yield reg
    reg.close()


async def _settled(engine: Engine, key: str, residency: str) -> None:
    """Wait for the model thread to act on what the event loop asked of it."""
    store = engine._loaded.store
    for _ in range(200):
        if store.residency(key) == residency:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{key} is {store.residency(key)}, not {residency}")


async def test_a_deleted_idle_version_leaves_both_tiers(registry, publish_random) -> None:
    old = publish_random(registry, "acme", "spam", seed=1)
    publish_random(registry, "acme", "spam", seed=2)
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        await engine.classify("acme", f"spam@{old.version}", ["win cash"])
        key = adapter_key(old)
        await _settled(engine, key, "device")
        before = engine.stats()
        engine.forget(engine.registry.delete("acme", "spam", old.version))
        await _settled(engine, key, "disk")
        after = engine.stats()
        assert after["adapter_host_entries"] == before["adapter_host_entries"] - 1
        assert after["adapter_device_resident"] == before["adapter_device_resident"] - 1
        assert after["adapter_device_evictions"] == before["adapter_device_evictions"]
        assert len(await engine.classify("acme", "spam", ["win cash"])) == 1  # v2 serves on


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
