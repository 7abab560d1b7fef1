"""Steps planned while the one before them runs (EngineConfig.plan_ahead): the same answers,
only when the queue holds a step's worth, and nothing held once the engine closes."""

import asyncio
import threading

import numpy as np
import pytest
import torch

from engine import Engine, EngineClosed, EngineConfig

TEXTS = [f"message number {i} about {'cash prizes' if i % 3 else 'the weather'}" for i in range(40)]


async def _answers(registry, plan_ahead: bool, device: str = "cpu") -> tuple[list, dict]:
    config = EngineConfig(
        registry_dir=registry.root, max_batch_rows=4, plan_ahead=plan_ahead, device=device
    )
    async with Engine(config) as engine:
        # every tenant's texts queued at once: far more rows wait than one step runs
        jobs = [
            engine.classify(tenant, "m", TEXTS[k::4])
            for k, tenant in enumerate(("acme", "bob", "acme", "bob"))
        ]
        answers = await asyncio.gather(*jobs)
        return answers, engine.stats()


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
            ],
        ),
    ],
)
async def test_a_deep_queue_is_planned_ahead_with_the_same_answers(
    registry, publish_random, device
) -> None:
    """The same answers as steps planned one by one; on CUDA, behind replayed graphs too."""
    registry.create_tenant("bob")
    publish_random(registry, "acme", "m", seed=1)
    publish_random(registry, "bob", "m", seed=2, labels=("a", "b", "c"))
    ahead, stats = await _answers(registry, plan_ahead=True, device=device)
    serial, serial_stats = await _answers(registry, plan_ahead=False, device=device)
    assert stats["planned_ahead"] > 0 and serial_stats["planned_ahead"] == 0
    assert stats["rows"] == serial_stats["rows"] == len(TEXTS)
    for got, want in zip(ahead, serial, strict=True):
        assert [a.label for a in got] == [a.label for a in want]
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(list(a.scores.values()), list(b.scores.values()), atol=1e-5)
    assert stats["requests_in_flight"] == 0 and stats["waiting_rows"] == 0


def test_plan_ahead_is_on_by_default_on_cuda_only() -> None:
    """The H200 gained from it; the CPU, where the step's own work fills the cycle, did not."""
    assert EngineConfig(device="cuda").uses_plan_ahead
    assert not EngineConfig().uses_plan_ahead
    assert not EngineConfig(device="cuda", plan_ahead=False).uses_plan_ahead
    assert EngineConfig(plan_ahead=True).uses_plan_ahead
    with pytest.raises(ValueError, match="plan_ahead must be"):
        EngineConfig(plan_ahead="yes")  # type: ignore[arg-type]


async def test_plan_ahead_default_on_the_cpu_plans_nothing_ahead(registry, publish_random) -> None:
    """A deep queue on the CPU with the default config is planned one step at a time."""
    publish_random(registry, "acme", "m")
    config = EngineConfig(registry_dir=registry.root, max_batch_rows=4)
    async with Engine(config) as engine:
        await asyncio.gather(*(engine.classify("acme", "m", [text]) for text in TEXTS))
        assert engine.stats()["planned_ahead"] == 0


async def test_one_request_at_a_time_is_never_planned_ahead(registry, publish_random) -> None:
    """Nothing waits while its step runs: each step is planned when the last one ends."""
    publish_random(registry, "acme", "m")
    config = EngineConfig(registry_dir=registry.root, plan_ahead=True)
    async with Engine(config) as engine:
        for text in TEXTS[:5]:
            await engine.classify("acme", "m", [text])
        assert engine.stats()["planned_ahead"] == 0


async def test_closing_with_a_step_planned_ahead_leaves_nothing_held(
    registry, publish_random
) -> None:
    """Neither the running step nor the one queued behind it keeps its adapters pinned."""
    publish_random(registry, "acme", "m")
    config = EngineConfig(registry_dir=registry.root, max_batch_rows=2, plan_ahead=True)
    engine = Engine(config)
    await engine.start()
    store = engine._loaded.store
    request = asyncio.ensure_future(engine.classify("acme", "m", TEXTS))
    while engine.stats()["planned_ahead"] == 0:
        await asyncio.sleep(0.001)
    await engine.close()
    with pytest.raises(EngineClosed):
        await request
    cached = store._host.keys()
    assert cached and all(store._host.pins(key) == 0 for key in cached)


async def test_closing_never_starts_the_step_planned_ahead(registry, publish_random) -> None:
    """It is cancelled while queued: closing waits for the running step alone."""
    publish_random(registry, "acme", "m")
    config = EngineConfig(registry_dir=registry.root, max_batch_rows=2, plan_ahead=True)
    engine = Engine(config)
    await engine.start()
    steps, started = engine._steps, []
    timed_step = steps._timed_step
    running = threading.Event()  # the first step runs until the close has begun

    def noting(item, interleave):
        started.append(item)
        if len(started) == 1:
            running.wait(30)
        return timed_step(item, interleave)

    steps._timed_step = noting  # type: ignore[method-assign]
    requests = [asyncio.ensure_future(engine.classify("acme", "m", TEXTS[:10])) for _ in range(4)]
    while steps._ahead is None:
        await asyncio.sleep(0.0005)
    ahead = steps._ahead[0]
    closing = asyncio.ensure_future(engine.close())
    await asyncio.sleep(0.2)  # the close cancels what is queued, then waits for the step
    running.set()
    await closing
    for request in requests:
        with pytest.raises(EngineClosed):
            await request
    assert ahead not in started and ahead.ran is not None and ahead.ran.cancelled()


async def test_a_failure_queueing_the_step_ahead_fails_its_rows_alone(
    registry, publish_random
) -> None:
    """The running step's request is answered, the one planned ahead fails, none hangs."""
    publish_random(registry, "acme", "m")
    config = EngineConfig(registry_dir=registry.root, max_batch_rows=2, plan_ahead=True)
    async with Engine(config) as engine:
        steps = engine._steps
        submit, plan_ahead, ahead, failed = steps._submit, steps._plan_ahead, [False], []

        def planning_ahead() -> None:
            ahead[0] = True
            try:
                plan_ahead()
            finally:
                ahead[0] = False

        def failing_ahead(item):
            if ahead[0] and not failed:
                failed.append(item)
                raise RuntimeError("queueing the step ahead failed")
            return submit(item)

        steps._plan_ahead = planning_ahead  # type: ignore[method-assign]
        steps._submit = failing_ahead  # type: ignore[method-assign]
        requests = [engine.classify("acme", "m", TEXTS[k : k + 2]) for k in range(0, 12, 2)]
        outcomes = await asyncio.wait_for(
            asyncio.gather(*requests, return_exceptions=True), timeout=60
        )
        assert len(failed) == 1 and isinstance(outcomes[0], list)  # the first step's request
        errors = [o for o in outcomes if isinstance(o, Exception)]
        assert len(errors) == 1 and "queueing the step ahead failed" in str(errors[0])
        store = engine._loaded.store
        cached = store._host.keys()
        assert cached and all(store._host.pins(key) == 0 for key in cached)
        assert engine.stats()["requests_in_flight"] == 0


async def test_a_step_ahead_whose_requests_all_ended_never_runs(registry, publish_random) -> None:
    """Cancelled while it waited behind the running step, its rows still took a step."""
    publish_random(registry, "acme", "m")
    config = EngineConfig(registry_dir=registry.root, max_batch_rows=4, plan_ahead=True)
    async with Engine(config) as engine:
        await engine.classify("acme", "m", ["warm"])
        steps, gate = engine._steps, threading.Event()
        timed_step = steps._timed_step

        def gated(item, interleave):
            gate.wait(30)
            return timed_step(item, interleave)

        steps._timed_step = gated  # type: ignore[method-assign]
        rows_before = engine.stats()["rows"]
        first = await engine.submit("acme", "m", TEXTS[:4])
        victim = await engine.submit("acme", "m", TEXTS[4:8])
        while steps._ahead is None:
            await asyncio.sleep(0.0005)
        victim.cancel()
        gate.set()
        assert len(await first.results()) == 4
        while steps._ahead is not None:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.05)  # the skipped step is delivered
        assert engine.stats()["rows"] - rows_before == 4
        assert len(await engine.classify("acme", "m", TEXTS[:2])) == 2
