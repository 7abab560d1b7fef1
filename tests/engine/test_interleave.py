"""Short steps between the layers of a long one: same answers, and the neighbour goes first."""

import asyncio
import dataclasses
import os
import sys
import time
from pathlib import Path

import pytest

from engine import Engine, EngineConfig
from engine.interludes import interlude_budget
from registry import Registry
from scheduler import Batch

LONG_TEXT = " ".join(["the quarterly report shows steady growth in every region"] * 60)
SHORT_TEXT = "free entry to win a prize, text now"


@pytest.fixture
def registry(tmp_path: Path):
    reg = Registry(tmp_path / "reg")
    reg.create_tenant("bulk")
    reg.create_tenant("small")
    yield reg
    reg.close()


async def _until_running(engine: Engine, tenant: str) -> None:
    """Until the tenant's rows have left the queue for a step (which then takes a while)."""
    start = engine.tenant_stats().get(tenant, {}).get("run_rows", 0)
    deadline = time.monotonic() + 30
    while engine.tenant_stats().get(tenant, {}).get("run_rows", 0) == start:
        assert time.monotonic() < deadline, "the long step never started"
        await asyncio.sleep(0.001)


def test_pause_points_sit_before_every_block_of_every_layer_but_the_first(backbone) -> None:
    calls: list[int] = []
    state = backbone.lora_state
    state.between_layers = lambda: calls.append(1)
    try:
        ids = backbone.tokenizer(["hello there"], return_tensors="pt")
        backbone.model(**ids)
    finally:
        state.between_layers = None
    # MiniLM: 6 layers x (attention, intermediate, output), the first block excluded
    assert backbone.num_pauses == 17 and len(calls) == 17


async def test_a_short_request_finishes_inside_a_long_step_with_its_own_answers(
    registry, publish_random
) -> None:
    publish_random(registry, "bulk", "big", seed=1, rank=8)
    publish_random(registry, "small", "fast", seed=2, rank=4)
    config = EngineConfig(registry_dir=registry.root, contended_batch_tokens=None)
    async with Engine(config) as engine:
        alone_long = await engine.classify("bulk", "big", [LONG_TEXT] * 4)
        alone_short = await engine.classify("small", "fast", [SHORT_TEXT])
        steps_before = engine.stats()["steps"]
        finished: list[str] = []

        async def run(tenant: str, model: str, texts: list[str]):
            out = await engine.classify(tenant, model, texts)
            finished.append(tenant)
            return out

        long_task = asyncio.create_task(run("bulk", "big", [LONG_TEXT] * 4))
        await _until_running(engine, "bulk")
        short = await run("small", "fast", [SHORT_TEXT])
        long = await long_task
        stats = engine.stats()
    assert finished == ["small", "bulk"], "the short request waited for the whole long step"
    assert stats["steps"] - steps_before == 2  # the long step, and the one inside it
    assert stats["interludes"] >= 1
    for got, want in zip(long + short, alone_long + alone_short, strict=True):
        assert got.label == want.label
        for label, score in want.scores.items():
            assert got.scores[label] == pytest.approx(score, abs=1e-5)


async def test_interleaving_off_keeps_the_short_request_behind(registry, publish_random) -> None:
    publish_random(registry, "bulk", "big", seed=1)
    publish_random(registry, "small", "fast", seed=2)
    config = EngineConfig(
        registry_dir=registry.root, contended_batch_tokens=None, interlude_tokens=0
    )
    async with Engine(config) as engine:
        finished: list[str] = []

        async def run(tenant: str, model: str, texts: list[str]) -> None:
            await engine.classify(tenant, model, texts)
            finished.append(tenant)

        long_task = asyncio.create_task(run("bulk", "big", [LONG_TEXT] * 4))
        await _until_running(engine, "bulk")
        await run("small", "fast", [SHORT_TEXT])
        await long_task
        assert engine.stats()["interludes"] == 0
    assert finished == ["bulk", "small"]


def test_interludes_default_by_device_and_an_explicit_budget_wins() -> None:
    assert EngineConfig().interlude_budget_tokens == 256  # the CPU: a step costs its tokens
    assert EngineConfig(device="cuda").interlude_budget_tokens == 0  # host-bound small steps
    assert EngineConfig(device="cuda", interlude_tokens=128).interlude_budget_tokens == 128
    assert EngineConfig(interlude_tokens=0).interlude_budget_tokens == 0
    with pytest.raises(ValueError, match="interlude_tokens must be >= 0"):
        EngineConfig(interlude_tokens=-1)


def test_lookahead_defaults_by_device_and_an_explicit_count_wins() -> None:
    assert EngineConfig().lookahead_budget_rows == 0  # the CPU: small packed steps win
    assert EngineConfig(device="cuda").lookahead_budget_rows == 64  # host-bound steps
    assert EngineConfig(lookahead_rows=8).lookahead_budget_rows == 8
    # on the CPU a looked-ahead row keeps the step packable (unpadded); no cap on CUDA
    assert EngineConfig().lookahead_max_tokens == EngineConfig().pack_max_tokens == 8192
    assert EngineConfig(device="cuda").lookahead_max_tokens is None
    assert EngineConfig(pack_max_tokens=0).lookahead_max_tokens is None
    with pytest.raises(ValueError, match="lookahead_rows must be >= 0"):
        EngineConfig(lookahead_rows=-1)


def test_contended_budget_defaults_by_device_and_an_explicit_budget_wins() -> None:
    assert EngineConfig().contended_budget_tokens == 512  # the CPU: a step costs its tokens
    assert EngineConfig(device="cuda").contended_budget_tokens is None  # host-bound steps
    assert EngineConfig(device="cuda", contended_batch_tokens=256).contended_budget_tokens == 256
    assert EngineConfig(contended_batch_tokens=None).contended_budget_tokens is None
    with pytest.raises(ValueError, match="contended_batch_tokens must be >= 1"):
        EngineConfig(contended_batch_tokens=0)
    with pytest.raises(ValueError, match="contended_batch_tokens must be an integer or 'auto'"):
        EngineConfig(contended_batch_tokens="small")


async def test_switch_interval_is_set_while_the_engine_runs_and_restored_after(registry) -> None:
    before = sys.getswitchinterval()
    config = EngineConfig(registry_dir=registry.root)  # 0.5 ms by default
    async with Engine(config):
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    assert sys.getswitchinterval() == before
    async with Engine(dataclasses.replace(config, switch_interval_ms=None)):  # left alone
        assert sys.getswitchinterval() == before
    with pytest.raises(ValueError, match="switch_interval_ms must be > 0"):
        EngineConfig(switch_interval_ms=0)


def test_intra_op_threads_take_every_core_on_the_cpu_and_an_explicit_count_wins() -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert EngineConfig().intra_op_threads == (cores or 1)
    assert EngineConfig(num_threads=3).intra_op_threads == 3
    assert EngineConfig(device="cuda").intra_op_threads is None  # torch's own default there
    for bad in (0, -2):  # torch would refuse -2 only once the model thread starts
        with pytest.raises(ValueError, match="num_threads must be >= 1"):
            EngineConfig(num_threads=bad)


def test_a_packed_step_is_paused_for_interludes_only_when_its_own_tokens_are_many() -> None:
    """Padded, a short SMS beside a 124-token one looks like 372 tokens; packed it costs 163,
    less than one interlude, so pausing it would only make its own rows wait."""
    mixed = Batch.of(["a", "b", "c"], [20, 124, 19])
    assert interlude_budget(mixed, 256, None) == 256
    assert interlude_budget(mixed, 256, None, packed=True) is None
    long = Batch.of(["a"], [300])
    assert interlude_budget(long, 256, None, packed=True) == interlude_budget(long, 256, 512)
    assert interlude_budget(long, 256, 512) == 256


def test_a_contended_step_of_short_rows_is_not_paused_a_long_row_or_a_big_step_is() -> None:
    """A step of 16 SMS (480 tokens, within the contended 512) paused for other tenants' SMS
    split a closed loop's steps into 6.7-row ones: every paused row waited a nested step, and
    the rate fell 7-24%. Its neighbours now wait for its end. A long document, or a big step
    of short rows formed while nobody else waited, is still paused: waiting for it is long."""
    sixteen = Batch.of([f"t{i}" for i in range(16)], [30] * 16)
    assert interlude_budget(sixteen, 256, 512, packed=True) is None
    assert interlude_budget(sixteen, 256, None, packed=True) == 256  # no contended bound
    big = Batch.of([f"t{i}" for i in range(100)], [30] * 100)  # 3,000 tokens, uncontended
    assert interlude_budget(big, 256, 512, packed=True) == 256
    one_long = Batch.of([f"t{i}" for i in range(8)], [30] * 7 + [257])
    assert interlude_budget(one_long, 256, 512, packed=True) == 256
    assert interlude_budget(Batch.of(["a"], [512]), 256, 512) == 256  # one long document
    assert interlude_budget(Batch.of(["a"], [512]), 0, 512) is None  # interludes off
