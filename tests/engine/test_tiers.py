"""Disk → host → device: shared cold loads, no stalls for others, residency, versions."""

import asyncio
import concurrent.futures
import os
import sys
import threading
from pathlib import Path

import pytest

from engine import Engine, EngineConfig, InputError, TenantPolicy
from registry import Registry


@pytest.fixture
def registry(two_tenants: Registry) -> Registry:
    return two_tenants


def _gate_loads(engine: Engine, name: str) -> threading.Event:
    """Hold loads of adapter ``name`` on the loader thread until the returned event is set."""
    store = engine._loaded.store
    original = store.read
    gate = threading.Event()

    def read(record):
        if record.name == name:
            assert gate.wait(timeout=30), "gate never opened"
        return original(record)

    store.read = read  # type: ignore[method-assign]
    return gate


async def test_concurrent_requests_for_one_cold_adapter_load_it_once(registry, publish_random):
    publish_random(registry, "acme", "cold")
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        gate = _gate_loads(engine, "cold")
        tasks = [
            asyncio.create_task(engine.classify("acme", "cold", [f"text {i}"])) for i in range(20)
        ]
        await asyncio.sleep(0.2)
        assert engine.stats()["adapter_loads_in_flight"] == 1
        gate.set()
        results = await asyncio.gather(*tasks)
        stats = engine.stats()
    assert all(len(r) == 1 for r in results)
    assert stats["adapter_disk_loads"] == 1 and stats["adapter_device_loads"] == 1
    assert stats["adapter_host_misses"] == 20  # each request looked once, none found it


async def test_a_warm_adapter_is_pinned_without_a_miss_and_let_go_after(registry, publish_random):
    publish_random(registry, "acme", "warm")
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        await engine.classify("acme", "warm", ["first"])  # cold: one miss, one load
        before = engine.stats()
        await asyncio.gather(*(engine.classify("acme", "warm", [f"t{i}"]) for i in range(5)))
        after = engine.stats()
        key = next(iter(engine._loaded.store._host._entries))  # the one adapter held
        assert engine._loaded.store._host.pins(key) == 0  # every request let its pin go
    assert after["adapter_host_misses"] == before["adapter_host_misses"] == 1
    assert after["adapter_host_hits"] - before["adapter_host_hits"] == 5
    assert after["adapter_disk_loads"] == 1


async def test_a_cold_load_does_not_stall_other_tenants(registry, publish_random):
    publish_random(registry, "acme", "cold", seed=1)
    publish_random(registry, "globex", "warm", seed=2)
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        await engine.classify("globex", "warm", ["warm it up"])
        gate = _gate_loads(engine, "cold")
        cold = asyncio.create_task(engine.classify("acme", "cold", ["cold start"]))
        await asyncio.sleep(0.05)
        steps_before = engine.stats()["steps"]
        for i in range(5):  # each warm request runs in its own step while the load waits
            (pred,) = await engine.classify("globex", "warm", [f"request {i}"])
            assert pred.label in ("neg", "pos")
        assert not cold.done()
        assert engine.stats()["steps"] - steps_before == 5
        gate.set()
        (cold_pred,) = await cold
    assert cold_pred.label in ("neg", "pos")


async def test_residency_moves_between_tiers(registry, publish_random):
    for i in range(3):
        publish_random(registry, "acme", f"m{i}", seed=i, rank=8)
    config = EngineConfig(registry_dir=registry.root, adapter_pages=8)  # one adapter at a time
    async with Engine(config) as engine:
        residency = {a.name: a.residency for a in engine.list_adapters("acme")}
        assert residency == {"m0": "disk", "m1": "disk", "m2": "disk"}
        await engine.classify("acme", "m0", ["x"])
        await engine.classify("acme", "m1", ["x"])
        residency = {a.name: a.residency for a in engine.list_adapters("acme")}
        assert residency == {"m0": "host", "m1": "device", "m2": "disk"}
        stats = engine.stats()
    assert stats["adapter_device_evictions"] == 1 and stats["adapter_host_entries"] == 2


async def test_many_adapters_in_one_step_respect_the_pool(registry, publish_random):
    for i in range(6):
        publish_random(registry, "acme", f"m{i}", seed=i, rank=8)
    config = EngineConfig(registry_dir=registry.root, adapter_pages=16)  # two at a time
    async with Engine(config) as engine:
        alone = [await engine.classify("acme", f"m{i}", ["same"]) for i in range(6)]
        together = await asyncio.gather(
            *(engine.classify("acme", f"m{i}", ["same"]) for i in range(6))
        )
    for a, b in zip(alone, together, strict=True):
        assert a[0].scores == pytest.approx(b[0].scores, abs=1e-5)


async def test_in_flight_requests_keep_the_version_they_resolved(registry, publish_random):
    publish_random(registry, "acme", "m", seed=1, labels=("a", "b"))
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        gate = _gate_loads(engine, "m")
        first = asyncio.create_task(engine.classify("acme", "m", ["x"]))
        await asyncio.sleep(0.05)
        publish_random(registry, "acme", "m", seed=2, labels=("a", "b", "c"))
        second = asyncio.create_task(engine.classify("acme", "m", ["x"]))
        gate.set()
        (old,), (new,) = await asyncio.gather(first, second)
    assert set(old.scores) == {"a", "b"} and set(new.scores) == {"a", "b", "c"}


def test_the_default_host_budget_covers_the_device_pool() -> None:
    """A request pins its adapter on the host: a host tier smaller than the pool would make
    adapters the device holds be read from disk again."""
    assert EngineConfig().host_budget_bytes(1 << 20) == 2 << 30
    assert EngineConfig().host_budget_bytes(8 << 30) == 10 << 30
    assert EngineConfig(host_cache_bytes=1 << 20).host_budget_bytes(8 << 30) == 1 << 20


async def test_a_tiny_host_budget_still_serves(registry, publish_random, caplog):
    for i in range(3):
        publish_random(registry, "acme", f"m{i}", seed=i)
    config = EngineConfig(registry_dir=registry.root, host_cache_bytes=0)
    with caplog.at_level("WARNING"):
        engine = Engine(config)
        await engine.start()
    assert "host_cache_bytes=0 is below the device pool" in caplog.text  # said, not silent
    async with engine:
        for _ in range(2):
            for i in range(3):
                await engine.classify("acme", f"m{i}", ["x"])
        stats = engine.stats()
    assert stats["adapter_host_entries"] == 0 and stats["adapter_host_evictions"] >= 3
    assert stats["adapter_disk_loads"] >= 6  # nothing stays on the host, so every call reloads


async def test_a_pool_too_small_for_a_registered_adapter_is_refused(registry, publish_random):
    publish_random(registry, "acme", "big", rank=16)
    with pytest.raises(ValueError, match="adapter_pages=8 cannot hold acme/big@1"):
        async with Engine(EngineConfig(registry_dir=registry.root, adapter_pages=8)):
            pass
    # given in bytes, the refusal names that setting, not adapter_pages the user never set
    page = 168_960  # MiniLM's page in float32
    config = EngineConfig(registry_dir=registry.root, adapter_pool_bytes=11 * page)
    with pytest.raises(ValueError, match=rf"adapter_pool_bytes={11 * page} \(11 pages of {page}"):
        async with Engine(config):
            pass
    with pytest.raises(ValueError, match=rf"{16 * page} bytes\); raise adapter_pool_bytes"):
        async with Engine(config):
            pass


async def test_a_cuda_device_this_process_cannot_see_is_refused_by_name(tmp_path: Path):
    import torch

    # one past the last device: none on a CPU-only build, an index too high on a GPU machine
    index = torch.cuda.device_count() if torch.cuda.is_available() else 0
    registry_dir = tmp_path / "registry"
    with pytest.raises(ValueError, match=rf"device='cuda:{index}', but this process sees"):
        async with Engine(EngineConfig(registry_dir=registry_dir, device=f"cuda:{index}")):
            pass
    assert not registry_dir.exists()  # refused before anything was created


async def test_an_adapter_published_too_large_for_the_pool_fails_alone(registry, publish_random):
    publish_random(registry, "acme", "small", rank=4)
    async with Engine(EngineConfig(registry_dir=registry.root, adapter_pages=8)) as engine:
        publish_random(registry, "acme", "big", rank=16)
        from engine import AdapterIncompatible

        with pytest.raises(AdapterIncompatible, match="pool holds 8 pages"):
            await engine.classify("acme", "big", ["x"])
        assert len(await engine.classify("acme", "small", ["x"])) == 1


async def test_a_stored_weight_now_out_of_range_is_bounded_not_dropped_with_the_rest(
    registry, caplog
) -> None:
    """Weights are 0.001 to 1000 now; an older graft stored 5000. Refusing the tenant's
    settings whole lifted its queue bound to the default and refused every later change."""
    registry.set_tenant_settings("acme", {"weight": 5000.0, "max_queued_rows": 8})
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        assert engine._scheduler.policy("acme") == TenantPolicy(weight=1000.0, max_queued_rows=8)
        assert "stored weight 5000.0 is outside" in caplog.text
        engine.set_tenant_policy("acme", max_queued_rows=16)  # another field: taken
        assert engine._scheduler.policy("acme").max_queued_rows == 16
        with pytest.raises(ValueError, match="weight must be from 0.001 to 1000"):
            engine.set_tenant_policy("acme", weight=5000.0)  # a new value out of range is not


async def test_an_override_the_engine_set_goes_with_a_reset_or_delete_right_after(
    registry, publish_random
):
    """The engine kept the settings stamp of before its own write: a reset (graft tenants set
    --reset) or a tenant deletion within one poll brought the stamp back to it, so the
    override stayed for good, and a tenant made again under the name inherited it."""
    publish_random(registry, "acme", "m")
    config = EngineConfig(registry_dir=registry.root, settings_poll_s=0.05)
    async with Engine(config) as engine:
        await asyncio.sleep(0.2)  # a poll has read the stamp
        engine.set_tenant_policy("acme", max_queued_rows=1)
        registry.set_tenant_settings("acme", None)  # another process resets it at once
        engine.set_tenant_policy("globex", max_queued_rows=1)
        registry.delete_tenant("globex")
        registry.create_tenant("globex")
        await asyncio.sleep(0.3)
        assert engine._scheduler.policy("acme").max_queued_rows == config.tenant_max_queued_rows
        assert engine._scheduler.policy("globex") == engine._scheduler.default_policy
        assert len(await engine.classify("acme", "m", ["x"] * 3)) == 3


async def test_a_deleted_tenants_counters_go_and_its_namesake_starts_afresh(
    registry, publish_random
):
    """Kept for the process's life, /metrics listed a deleted tenant's traffic for good (its
    name a label value that never went), and a tenant made again under the name carried on
    from its counts and its fair-share place."""
    publish_random(registry, "globex", "m")
    config = EngineConfig(registry_dir=registry.root, settings_poll_s=0.05)
    async with Engine(config) as engine:
        await engine.classify("globex", "m", ["x"] * 3)
        assert engine._scheduler.counters()["globex"].admitted_rows == 3
        registry.delete_tenant("globex")
        await asyncio.sleep(0.3)
        assert "globex" not in engine._scheduler.counters()
        registry.create_tenant("globex")
        publish_random(registry, "globex", "m")
        await engine.classify("globex", "m", ["x"])
        await asyncio.sleep(0.3)  # a poll after the new tenant's first request keeps it
        assert engine._scheduler.counters()["globex"].admitted_rows == 1
        registry.delete_tenant("globex")
        registry.create_tenant("globex")  # within one poll: the stamp differs all the same
        await asyncio.sleep(0.3)
        assert "globex" not in engine._scheduler.counters()


async def test_tenant_settings_apply_at_run_time_without_restart(registry, publish_random):
    publish_random(registry, "acme", "m")
    config = EngineConfig(
        registry_dir=registry.root, tenant_max_queued_rows=100, settings_poll_s=0.05
    )
    async with Engine(config) as engine:
        assert len(await engine.classify("acme", "m", ["x"] * 5)) == 5
        registry.set_tenant_settings("acme", {"max_queued_rows": 2})  # e.g. graft tenants set
        await asyncio.sleep(0.3)
        with pytest.raises(InputError, match="more than the 2 this tenant may queue"):
            await engine.classify("acme", "m", ["x"] * 5)
        registry.set_tenant_settings("acme", None)
        await asyncio.sleep(0.3)
        assert len(await engine.classify("acme", "m", ["x"] * 5)) == 5
        engine.set_tenant_policy("acme", TenantPolicy(weight=3.0))
        # fields left at TenantPolicy's defaults keep the server's: this one's queue bound of
        # 100 once became TenantPolicy's 1024, in every engine on the registry
        assert registry.tenant_settings() == {"acme": {"weight": 3.0}}
        assert engine._scheduler.policy("acme").max_queued_rows == 100
        engine.set_tenant_policy("acme", TenantPolicy(weight=3.0, max_queued_rows=7))
        assert registry.tenant_settings() == {"acme": {"weight": 3.0, "max_queued_rows": 7}}
        assert engine._scheduler.policy("acme").max_queued_rows == 7
        # fields given by name are set as given, even to TenantPolicy's own defaults
        engine.set_tenant_policy("acme", max_queued_rows=1024)
        assert registry.tenant_settings() == {"acme": {"weight": 3.0, "max_queued_rows": 1024}}
        assert engine._scheduler.policy("acme") == TenantPolicy(weight=3.0, max_queued_rows=1024)
        with pytest.raises(ValueError, match="unknown settings"):
            engine.set_tenant_policy("acme", weight=2.0, speed=11)
        with pytest.raises(TypeError, match="one of the two; got both"):
            engine.set_tenant_policy("acme", TenantPolicy(), weight=2.0)
        with pytest.raises(TypeError, match="one of the two; got neither"):
            engine.set_tenant_policy("acme")
        assert registry.tenant_settings()["acme"]["weight"] == 3.0  # refused: nothing stored


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
async def test_loader_threads_run_at_a_lower_priority_than_the_model(registry, publish_random):
    publish_random(registry, "acme", "spam", seed=1)
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        await engine.classify("acme", "spam", ["hello"])  # the loader thread exists now

        def niceness() -> int:
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        loader = await asyncio.wrap_future(engine._loaded.store._loaders.submit("acme", niceness))
        model = await asyncio.get_running_loop().run_in_executor(engine._executor, niceness)
    assert loader >= min(19, model + 10) and loader > model


async def test_loader_threads_run_torch_on_one_thread(registry, publish_random):
    """A loader that ran torch in parallel would keep an OpenMP team beside the model
    thread's, and the model thread's workers would then stop spinning between ops."""
    import torch

    publish_random(registry, "acme", "m", seed=0)
    async with Engine(EngineConfig(registry_dir=registry.root, num_threads=2)) as engine:
        await engine.classify("acme", "m", ["x"])  # a load ran on a loader thread
        store = engine._loaded.store
        assert store._loaders.submit("acme", torch.get_num_threads).result() == 1
        model_threads = engine._executor.submit(torch.get_num_threads).result()
    assert model_threads == 2


async def test_a_failed_load_is_never_shared_with_a_later_request(registry, publish_random):
    """A request arriving just after a load failed, before the failure was cleared from the
    loads in flight (a callback later), starts a load of its own rather than inheriting the
    old error."""
    from engine import AdapterFormatError
    from engine.adapter_store import _Load, adapter_key

    record = publish_random(registry, "acme", "flaky")
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        store, key = engine._loaded.store, adapter_key(record)
        failed = asyncio.get_running_loop().create_future()
        failed.set_exception(AdapterFormatError("a passing disk error"))
        read = concurrent.futures.Future()
        read.set_exception(failed.exception())
        store._loading[key] = _Load(failed, read)  # between the failure and its cleanup
        assert await store.pin(record) == key and store.residency(key) == "host"
        store.unpin(key)
        assert key not in store._loading and failed.exception() is not None


def test_a_tenant_made_again_while_its_old_rows_wait_is_forgotten_once_they_go(tmp_path):
    """Forgetting waits for the old incarnation's rows; the new stamp was kept meanwhile, so
    the next polls saw nothing gone and the new tenant kept the deleted one's counters."""
    from engine.tenant_settings import TenantSettings, scheduler_config
    from registry import Registry
    from scheduler import Scheduler

    with Registry(tmp_path / "reg") as registry:
        registry.create_tenant("globex")
        scheduler = Scheduler(scheduler_config(EngineConfig(adapter_pages=1024)))
        settings = TenantSettings(registry, scheduler, scheduler.default_policy)
        settings.apply()
        assert scheduler.admit("globex", 3).is_admitted  # still tokenizing
        scheduler.counters()["globex"].rejected_requests = 42
        registry.delete_tenant("globex")
        registry.create_tenant("globex")
        settings.apply()
        assert "globex" in scheduler.tenants()  # its rows are still reserved
        scheduler.release("globex", 3)
        settings.apply()
        assert "globex" not in scheduler.tenants()
