"""The embedded engine at its edges: start and close racing requests and each other, jobs read
twice, callers' token ids, and configuration of the wrong type."""

import asyncio
import threading

import pytest

from engine import (
    DeadlineExceeded,
    Engine,
    EngineClosed,
    EngineConfig,
    EngineError,
    InputError,
    ModelNotFound,
    Tokenized,
)


def _tasks_alive() -> list[str]:
    return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("graft-"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_tokens": "8192"}, "max_batch_tokens must be an integer, got '8192'"),
        ({"max_batch_tokens": 1.5}, "max_batch_tokens must be an integer"),
        ({"max_batch_rows": None}, "max_batch_rows must be an integer, got None"),
        ({"max_timeout_s": "5"}, "max_timeout_s must be a finite number"),
        ({"max_timeout_s": float("nan")}, "max_timeout_s must be a finite number"),
        ({"is_fair": 1}, "is_fair must be True or False"),
        ({"contended_batch_tokens": 1.5}, "contended_batch_tokens must be an integer or 'auto'"),
        ({"device": "cudafoo"}, r"device must be 'cpu' or 'cuda\[:n\]'"),
        ({"device": "cuda:x"}, r"device must be 'cpu' or 'cuda\[:n\]'"),
        ({"tenant_max_tokens_per_step": 0}, "tenant_max_tokens_per_step must be >= 1"),
        ({"registry_dir": 3}, "registry_dir must be a string or a path"),
    ],
)
def test_a_config_value_of_the_wrong_type_is_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


def test_config_values_of_the_right_types_pass() -> None:
    config = EngineConfig(max_timeout_s=5, contended_batch_tokens="auto", device="cuda:1")
    assert config.max_timeout_s == 5 and config.device == "cuda:1"


async def test_a_request_admitted_as_the_engine_closes_fails_instead_of_hanging(
    registry, publish_random
) -> None:
    publish_random(registry, "acme", "spam")
    engine = Engine(EngineConfig(registry_dir=registry.root))
    await engine.start()
    submit = asyncio.create_task(engine.submit("acme", "spam", ["hello"]))
    await asyncio.sleep(0)  # the submit now waits for its adapter's load
    await engine.close()
    with pytest.raises(EngineClosed):
        await asyncio.wait_for(submit, 10)
    assert engine.stats()["requests_in_flight"] == 0 and engine.stats()["waiting_rows"] == 0


async def test_a_close_during_start_leaves_nothing_running(registry) -> None:
    engine = Engine(EngineConfig(registry_dir=registry.root))
    starting = asyncio.create_task(engine.start())
    await asyncio.sleep(0.05)  # loading the backbone on the model thread
    await engine.close()
    with pytest.raises(EngineClosed, match="closed while it started"):
        await starting
    assert not engine.ready and _tasks_alive() == []
    with pytest.raises(EngineClosed, match="create a new Engine"):
        async with engine:
            pass


async def test_two_concurrent_starts_start_one_engine(registry) -> None:
    engine = Engine(EngineConfig(registry_dir=registry.root))
    await asyncio.gather(engine.start(), engine.start())
    assert _tasks_alive() == ["graft-deletions", "graft-settings", "graft-step-loop"]
    await engine.close()
    assert _tasks_alive() == []


async def test_every_stream_of_a_job_sees_every_prediction(registry, publish_random) -> None:
    publish_random(registry, "acme", "spam")
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:

        async def indices(job) -> list[int]:
            return sorted([p.index async for p in job.stream()])

        job = await engine.submit("acme", "spam", ["a", "b", "c", "d"])
        both = await asyncio.wait_for(asyncio.gather(indices(job), indices(job)), 30)
        again = await asyncio.wait_for(indices(job), 30)  # after it finished
    assert both == [[0, 1, 2, 3]] * 2 and again == [0, 1, 2, 3]


async def test_callers_token_ids_obey_the_limits_of_texts(registry, publish_random) -> None:
    publish_random(registry, "acme", "spam")
    config = EngineConfig(registry_dir=registry.root, max_inputs_per_request=4)
    async with Engine(config) as engine:
        await engine.classify("acme", "spam", ["warm"])  # resident: submit_nowait answers now
        with pytest.raises(InputError, match="input is empty"):
            await engine.submit("acme", "spam", [], tokens=Tokenized(ids=(), truncated=()))
        with pytest.raises(InputError, match="input is empty"):
            engine.submit_nowait("acme", "spam", [], tokens=Tokenized(ids=(), truncated=()))
        five = Tokenized(ids=((101, 1037, 102),) * 5, truncated=(False,) * 5)
        with pytest.raises(InputError, match="at most 4 per request"):
            await engine.submit("acme", "spam", ["a"] * 5, tokens=five)
        assert engine.stats()["requests_in_flight"] == 0
        assert engine._loaded.host.pins("acme/spam@1") == 0  # nothing refused kept a pin


async def test_a_malformed_tenant_name_is_model_not_found(registry, publish_random) -> None:
    publish_random(registry, "acme", "spam")
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        for tenant in ("Acme", "", None):
            with pytest.raises(ModelNotFound):
                await engine.classify(tenant, "spam", ["hi"])  # type: ignore[arg-type]
            with pytest.raises(ModelNotFound):
                await engine.classify_many(tenant, ["spam"], ["hi"])  # type: ignore[arg-type]


async def test_a_multi_model_request_that_must_wait_for_a_load_counts_each_hit_once(
    registry, publish_random
) -> None:
    publish_random(registry, "acme", "warm", seed=1)
    publish_random(registry, "acme", "cold", seed=2)
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        await engine.classify("acme", "warm", ["x"])
        before = engine.stats()
        tokens = Tokenized(ids=((101, 1060, 102),), truncated=(False,))
        # what a front end's handed-over request does: now if it can, else the awaited way
        assert engine.submit_many_nowait("acme", ["warm", "cold"], ["x"], tokens=tokens) is None
        await engine.classify_many("acme", ["warm", "cold"], ["x"])
        after = engine.stats()
    hits = after["adapter_host_hits"] - before["adapter_host_hits"]
    misses = after["adapter_host_misses"] - before["adapter_host_misses"]
    assert (hits, misses) == (1, 1)


async def test_an_answer_that_cannot_be_made_fails_that_request_alone(
    registry, publish_random, monkeypatch
) -> None:
    """Its neighbours in the step are answered and the step loop lives on."""
    from engine.pending import SinglePending

    publish_random(registry, "acme", "good", seed=1)
    publish_random(registry, "acme", "bad", seed=2)
    deliver = SinglePending.deliver

    def breaking(self, rows, outputs) -> None:
        if self.job.model.endswith("/bad"):
            raise TypeError("no head came back")
        deliver(self, rows, outputs)

    monkeypatch.setattr(SinglePending, "deliver", breaking)
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        await engine.classify("acme", "good", ["warm"])  # loaded: the next two queue at once
        with pytest.raises(EngineError):  # before the fix, it hung: the step loop had died
            await asyncio.wait_for(engine.classify("acme", "bad", ["warm"]), timeout=30)
        before = engine.stats()["steps"]
        blocker = asyncio.ensure_future(engine.classify("acme", "good", ["busy"] * 64))
        await asyncio.sleep(0)  # its step is running: the next two wait and share one
        good, bad = await asyncio.wait_for(
            asyncio.gather(
                engine.classify("acme", "good", ["hello"]),
                engine.classify("acme", "bad", ["hello"]),
                return_exceptions=True,
            ),
            timeout=30,
        )
        assert len(await blocker) == 64
        assert engine.stats()["steps"] == before + 2  # the blocker's, then theirs together
        assert len(good) == 1 and isinstance(bad, EngineError)
        assert "no head came back" in str(bad)
        again = await asyncio.wait_for(engine.classify("acme", "good", ["again"]), timeout=30)
        assert len(again) == 1 and engine.stats()["requests_in_flight"] == 0


def _fail_once(monkeypatch, owner, method: str, message: str) -> list:
    """Make ``owner.method`` raise RuntimeError(message) on its next call only; returns the
    list of the failed calls' arguments."""
    real, failures = getattr(owner, method), []

    def failing_once(*args):
        if not failures:
            failures.append(args)
            raise RuntimeError(message)
        return real(*args)

    monkeypatch.setattr(owner, method, failing_once)
    return failures


async def test_a_planning_failure_does_not_end_the_step_loop(
    registry, publish_random, monkeypatch
) -> None:
    """Before, one exception from the scheduler ended the loop's task: every request after it
    waited forever."""
    publish_random(registry, "acme", "m")
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        failures = _fail_once(monkeypatch, engine._scheduler, "plan", "a planning slip")
        answer = await asyncio.wait_for(engine.classify("acme", "m", ["hello"]), timeout=30)
        assert len(answer) == 1 and failures


async def test_a_step_that_cannot_be_made_fails_its_requests_not_the_loop(
    registry, publish_random, monkeypatch
) -> None:
    """Its rows had left the queues: failed, they are answered; lost, they waited forever."""
    publish_random(registry, "acme", "m")
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        store = engine._loaded.store
        _fail_once(monkeypatch, store, "hold_for_step", "holding the step's adapters failed")
        with pytest.raises(EngineError, match="holding the step's adapters failed"):
            await asyncio.wait_for(engine.classify("acme", "m", ["first"]), timeout=30)
        answer = await asyncio.wait_for(engine.classify("acme", "m", ["second"]), timeout=30)
        assert len(answer) == 1 and engine.stats()["requests_in_flight"] == 0


async def test_a_request_naming_no_timeout_still_gets_the_servers_cap(
    registry, publish_random
) -> None:
    """Before, no timeout meant no limit: under overload its rows could wait for ever, while
    one naming a longer timeout than the cap was held to the cap."""
    publish_random(registry, "acme", "m")
    config = EngineConfig(registry_dir=registry.root, max_timeout_s=0.05, max_batch_rows=1)
    async with Engine(config) as engine:
        await engine.classify("acme", "m", ["warm"])  # the adapter is resident: no load waits
        gate = threading.Event()
        engine._executor.submit(gate.wait, 30)  # the model thread is busy past the cap
        try:  # a step of one row is planned behind the stall; the others wait in the queue
            first = asyncio.ensure_future(engine.classify("acme", "m", ["first", "queued"]))
            waiting = asyncio.ensure_future(engine.classify("acme", "m", ["late"]))
            await asyncio.sleep(0.3)
        finally:
            gate.set()
        for job in (first, waiting):
            with pytest.raises(DeadlineExceeded):
                await asyncio.wait_for(job, timeout=30)


async def test_a_request_is_told_of_its_timeout_while_a_step_still_runs(
    registry, publish_random
) -> None:
    """Late rows were expired only when the next step was planned: a 0.1 s timeout behind a
    long step was heard of when that step ended."""
    publish_random(registry, "acme", "m")
    config = EngineConfig(registry_dir=registry.root, max_batch_rows=1)
    async with Engine(config) as engine:
        await engine.classify("acme", "m", ["warm"])
        gate = threading.Event()
        engine._executor.submit(gate.wait, 30)  # the model thread is busy for now
        try:
            running = asyncio.ensure_future(engine.classify("acme", "m", ["in a step"]))
            await asyncio.sleep(0.05)  # its row is planned, and waits behind the stall
            began = asyncio.get_running_loop().time()
            with pytest.raises(DeadlineExceeded, match="before input"):
                await asyncio.wait_for(engine.classify("acme", "m", ["late"], timeout_s=0.1), 5)
            assert asyncio.get_running_loop().time() - began < 1.0
        finally:
            gate.set()
        assert len(await running) == 1
        assert engine._steps._deadline_timer is None  # nothing waits: no timer left armed
