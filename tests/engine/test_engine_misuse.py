"""The embedded engine used wrongly or shut down at awkward moments: every caller hears a clear
error, and nothing is left running or counted that did not happen."""

import asyncio
import os
import sys
import threading
from pathlib import Path

import pytest

from engine import (
    Engine,
    EngineClosed,
    EngineConfig,
    InputError,
    TenantNotFound,
    Tokenized,
)
from scheduler import TenantPolicy


def _model_threads() -> int:
    return sum(t.name.startswith("graft-model") for t in threading.enumerate())


def _open_catalog_files(root: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith(str(root / "catalog.sqlite3"))
    return count


async def test_callers_waiting_for_queued_loads_hear_that_the_engine_closed(
    registry, publish_random
) -> None:
    for i in range(4):
        publish_random(registry, "acme", f"m{i}", seed=i)
    engine = Engine(EngineConfig(registry_dir=registry.root, max_loads_in_flight=1))
    await engine.start()
    calls = [asyncio.create_task(engine.classify("acme", f"m{i}", ["hi"])) for i in range(4)]
    await asyncio.sleep(0)  # one load runs, three wait in the loaders' queue
    await engine.close()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert [type(o).__name__ for o in outcomes] == ["EngineClosed"] * 4
    assert not any(call.cancelled() for call in calls)  # nobody cancelled the callers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
async def test_a_start_that_fails_releases_its_threads_and_files(registry, publish_random) -> None:
    publish_random(registry, "acme", "big", rank=16)

    async def fail_to_start() -> None:
        engine = Engine(EngineConfig(registry_dir=registry.root, adapter_pages=4))
        with pytest.raises(ValueError, match="adapter_pages=4 cannot hold acme/big@1"):
            async with engine:
                pass
        with pytest.raises(EngineClosed):
            await engine.start()

    # SQLite keeps a closed connection's descriptors for its next one (closing them would drop
    # the process's locks on the file): count after one start, then see that none pile up
    await fail_to_start()
    threads, files = _model_threads(), _open_catalog_files(registry.root)
    for _ in range(3):
        await fail_to_start()
    assert _model_threads() == threads
    assert _open_catalog_files(registry.root) == files


async def test_triton_on_a_cpu_without_its_interpreter_is_refused_at_start(
    registry, monkeypatch
) -> None:
    import kernels.triton_sgmv  # imported as this session's interpreter says

    monkeypatch.setattr(kernels.triton_sgmv, "IS_INTERPRETED", False)  # as without it
    engine = Engine(EngineConfig(registry_dir=registry.root, lora_kernel="triton"))
    with pytest.raises(ValueError, match="lora_kernel='triton' needs a CUDA device"):
        await engine.start()
    assert not engine.ready


async def test_close_waits_for_the_model_thread_without_blocking_the_loop(
    registry, monkeypatch
) -> None:
    engine = Engine(EngineConfig(registry_dir=registry.root))
    await engine.start()
    step_ends = threading.Event()
    release = engine._release_threads_and_files

    def slow_release() -> None:  # as if a long step were still running on the model thread
        step_ends.wait(10)
        release()

    monkeypatch.setattr(engine, "_release_threads_and_files", slow_release)
    closing = asyncio.create_task(engine.close())
    ticks = 0
    for _ in range(5):
        await asyncio.sleep(0.01)  # would not return while close blocked the loop
        ticks += 1
    assert ticks == 5 and not closing.done()
    step_ends.set()
    await asyncio.wait_for(closing, 10)


async def test_overlapping_engines_leave_the_switch_interval_as_they_found_it(registry) -> None:
    before = sys.getswitchinterval()
    first = Engine(EngineConfig(registry_dir=registry.root, switch_interval_ms=1))
    second = Engine(EngineConfig(registry_dir=registry.root, switch_interval_ms=2))
    await first.start()
    await second.start()
    assert sys.getswitchinterval() == pytest.approx(0.002)
    await first.close()
    assert sys.getswitchinterval() == pytest.approx(0.002)  # the running engine's
    await second.close()
    assert sys.getswitchinterval() == pytest.approx(before)


async def test_admitted_rows_count_only_rows_that_were_queued(registry, publish_random) -> None:
    publish_random(registry, "acme", "spam")
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        with pytest.raises(InputError):
            await engine.classify("acme", "spam", ["x"] * 300)  # past max_inputs_per_request
        with pytest.raises(InputError):
            await engine.classify("acme", "spam", ["fine", ""])  # an empty text
        await engine.classify("acme", "spam", ["one", "two"])
        assert engine.tenant_stats()["acme"]["admitted_rows"] == 2


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"texts": b"hi"}, "input", "texts must be a list of strings, got bytes"),
        ({"truncate": "no"}, "truncate", "truncate must be True or False, got 'no'"),
        ({"truncate": None}, "truncate", "truncate must be True or False"),
        (
            {"tokens": Tokenized(ids=((101.0, 2000.7, 102),), truncated=(False,))},
            "input[0]",
            "token ids must be a list of ints",
        ),
        (
            {"tokens": Tokenized(ids=(("101", "102"),), truncated=(False,))},
            "input[0]",
            "token ids must be a list of ints",
        ),
        ({"tokens": [[101, 102]]}, "tokens", "tokens must be a Tokenized, got list"),
    ],
)
async def test_arguments_of_the_wrong_type_are_input_errors(
    registry, publish_random, kwargs: dict, field: str, message: str
) -> None:
    publish_random(registry, "acme", "spam")
    call = {"texts": ["hello"], **kwargs}
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        with pytest.raises(InputError, match=message) as info:
            await engine.submit("acme", "spam", call.pop("texts"), **call)
        assert info.value.field == field
        assert engine.stats()["requests_in_flight"] == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_queued_rows": 2.5}, "max_queued_rows must be an integer, got 2.5"),
        ({"max_tokens_per_step": "64"}, "max_tokens_per_step must be an integer"),
        ({"weight": "2"}, "tenant weight must be a number, got '2'"),
        ({"weight": True}, "tenant weight must be a number"),
    ],
)
def test_a_tenant_policy_of_the_wrong_type_is_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TenantPolicy(**kwargs)


async def test_tenant_and_listing_mistakes_are_engine_errors(registry, publish_random) -> None:
    publish_random(registry, "acme", "spam")
    engine = Engine(EngineConfig(registry_dir=registry.root))
    async with engine:
        with pytest.raises(TenantNotFound, match="nobody"):
            engine.set_tenant_policy("nobody", TenantPolicy(weight=2))
        with pytest.raises(TypeError, match="TenantPolicy or None, got dict"):
            engine.set_tenant_policy("acme", {"weight": 2})  # type: ignore[arg-type]
        assert registry.tenant_settings() == {}  # nothing stored by either
        with pytest.raises(InputError, match="version must be a positive integer") as info:
            engine.list_adapters("acme", version="1")  # type: ignore[arg-type]
        assert info.value.field == "version"
        with pytest.raises(InputError) as info:
            engine.list_adapters("Bad Name")
        assert info.value.field == "tenant"
        assert [a.name for a in engine.list_adapters("acme", version=1)] == ["spam"]
    with pytest.raises(EngineClosed):
        engine.list_adapters("acme")
    with pytest.raises(EngineClosed):
        engine.set_tenant_policy("acme", None)


async def test_a_close_cancelled_midway_still_restores_the_process_settings(
    registry, monkeypatch
) -> None:
    before = sys.getswitchinterval()
    engine = Engine(EngineConfig(registry_dir=registry.root, switch_interval_ms=1))
    await engine.start()
    step_ends = threading.Event()
    release = engine._release_threads_and_files

    def slow_release() -> None:
        step_ends.wait(10)
        release()

    monkeypatch.setattr(engine, "_release_threads_and_files", slow_release)
    with pytest.raises(TimeoutError):  # a server's shutdown that stops waiting
        await asyncio.wait_for(engine.close(), 0.05)
    assert sys.getswitchinterval() == pytest.approx(before)
    assert not engine._froze_gc
    step_ends.set()


async def test_a_start_cancelled_while_loading_closes_what_the_load_opened(
    registry, monkeypatch
) -> None:
    import engine.engine as engine_module

    loaded, may_finish = [], threading.Event()
    real_load = engine_module.load_stack

    def slow_load(*args):
        may_finish.wait(10)
        loaded.append(real_load(*args))
        return loaded[-1]

    monkeypatch.setattr(engine_module, "load_stack", slow_load)
    engine = Engine(EngineConfig(registry_dir=registry.root))
    starting = asyncio.create_task(engine.start())
    await asyncio.sleep(0.05)
    starting.cancel()
    may_finish.set()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert loaded and loaded[0].registry._is_closed
    with pytest.raises(EngineClosed):
        await engine.start()


def test_an_engine_whose_loop_ended_is_not_ready_and_says_so(registry, publish_random) -> None:
    """``asyncio.run(engine.start())`` then a second ``asyncio.run``: nothing runs steps any
    more, and a request queued there would wait forever."""
    publish_random(registry, "acme", "spam")
    engine = Engine(EngineConfig(registry_dir=registry.root))
    asyncio.run(engine.start())
    assert not engine.ready

    async def ask() -> None:
        await asyncio.wait_for(engine.classify("acme", "spam", ["hello"]), 30)

    with pytest.raises(EngineClosed, match="not running"):
        asyncio.run(ask())
    asyncio.run(engine.close())  # from another loop: its threads and files go all the same
    assert _model_threads() == 0


async def test_a_request_from_another_threads_loop_is_refused_not_left_waiting(
    registry, publish_random
) -> None:
    """Its job's future would belong to that loop, woken by nobody: each request waited for
    an unrelated timer. Handing the call to the engine's loop works."""
    publish_random(registry, "acme", "spam")
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        here = asyncio.get_running_loop()

        def from_a_thread() -> str:
            async def ask() -> object:
                return await asyncio.wait_for(engine.classify("acme", "spam", ["hello"]), 30)

            try:
                asyncio.run(ask())
            except RuntimeError as exc:
                refused = str(exc)
            handed = asyncio.run_coroutine_threadsafe(engine.classify("acme", "spam", ["hi"]), here)
            assert len(handed.result(30)) == 1
            return refused

        refused = await asyncio.to_thread(from_a_thread)
        assert "serves on the event loop that started it" in refused


async def test_two_blocks_entering_at_once_are_refused_for_the_second(registry) -> None:
    engine = Engine(EngineConfig(registry_dir=registry.root))
    first = asyncio.create_task(engine.__aenter__())
    await asyncio.sleep(0)  # the first is starting
    with pytest.raises(RuntimeError, match="already entered"):
        await engine.__aenter__()
    await first
    await engine.__aexit__(None, None, None)


async def test_a_request_larger_than_the_servers_queue_is_a_422_not_a_retry(
    registry, publish_random
) -> None:
    publish_random(registry, "acme", "spam")
    async with Engine(EngineConfig(registry_dir=registry.root, max_queued_rows=10)) as engine:
        with pytest.raises(InputError, match="more than the 10 the server may queue"):
            await engine.classify("acme", "spam", ["hi"] * 11)
        assert len(await engine.classify("acme", "spam", ["hi"] * 10)) == 10
