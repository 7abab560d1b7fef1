"""The engine on a GPU answers what the CPU engine answers: Triton SGMV, pinned page-ins, pool
eviction and half precision, end to end through ``Engine.classify``.

Skipped without CUDA (the ``gpu`` marker); the CPU engine is the reference, run in the same
test on the same registry. fp32 tolerance: summation order only (TF32 stays off, PyTorch's
default for matmuls); bf16: the rounding of every weight and activation to 8 bits.
"""

import asyncio
from pathlib import Path

import pytest
import torch

from engine import Engine, EngineConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TEXTS = [
    "WIN a brand new car, text CLAIM to 80086 now!",
    "are we still on for lunch tomorrow?",
    "The committee approved the budget after a long debate.",
    "ok",
    "Shares in the company fell sharply after the profit warning was issued this morning.",
]
# (rank, targets, pooling, labels): mixed ranks, a head-only model, every encoder Linear
ADAPTERS = [
    (8, ("query", "value"), "mean", ("a", "b")),
    (4, ("query", "key", "value", "dense"), "cls_pooler", ("x", "y", "z")),
    (16, ("intermediate.dense", "output.dense"), "mean", ("p", "q", "r")),
    (0, (), "mean", ("no", "yes")),
    (64, ("value",), "mean", ("u", "v")),
    (8, ("query", "key", "value", "dense"), "mean", ("k", "l")),
]


@pytest.fixture
def registry(tmp_path: Path, publish_random):
    from registry import Registry

    registry = Registry(tmp_path / "reg")
    registry.create_tenant("t1")
    registry.create_tenant("t2")
    for i, (rank, targets, pooling, labels) in enumerate(ADAPTERS):
        publish_random(
            registry,
            "t1" if i % 2 == 0 else "t2",
            f"m{i}",
            seed=i,
            rank=rank,
            labels=labels,
            pooling=pooling,
            targets=targets,
        )
    yield registry
    registry.close()


async def _answers(engine: Engine, registry) -> list:
    """Every model on every text, all at once so rows of different adapters share steps."""
    models = [(r.tenant, r.name) for t in ("t1", "t2") for r in registry.list_adapters(t)]
    calls = [engine.classify(t, m, TEXTS) for t, m in models]
    return await asyncio.gather(*calls)


def _assert_close(got: list, expected: list, atol: float) -> None:
    assert len(got) == len(expected)
    for preds, refs in zip(got, expected, strict=True):
        for pred, ref in zip(preds, refs, strict=True):
            assert pred.scores.keys() == ref.scores.keys()
            for label, score in pred.scores.items():
                assert abs(score - ref.scores[label]) <= atol, (label, score, ref.scores[label])


async def test_cuda_engine_equals_cpu_engine(registry) -> None:
    async with Engine(EngineConfig(registry_dir=registry.root)) as cpu:
        expected = await _answers(cpu, registry)
    async with Engine(EngineConfig(registry_dir=registry.root, device="cuda")) as gpu:
        got = await _answers(gpu, registry)
        stats = gpu.stats()
    _assert_close(got, expected, atol=1e-4)
    assert stats["adapter_device_loads"] == len(ADAPTERS)  # head-only models too: their heads
    assert stats["steps"] < len(ADAPTERS) * len(TEXTS)  # adapters really shared steps


async def test_cuda_pool_smaller_than_the_fleet_evicts_and_stays_correct(registry) -> None:
    async with Engine(EngineConfig(registry_dir=registry.root)) as cpu:
        expected = await _answers(cpu, registry)
    # 64 pages hold the rank-64 adapter alone: every other adapter evicts it or is evicted
    config = EngineConfig(registry_dir=registry.root, device="cuda", adapter_pages=64)
    async with Engine(config) as gpu:
        got = []
        for _ in range(2):  # a second round pages everything in again, at other pages
            for tenant in ("t1", "t2"):
                for record in registry.list_adapters(tenant):
                    got.append(await gpu.classify(tenant, record.name, TEXTS))
        stats = gpu.stats()
    _assert_close(got, expected + expected, atol=1e-4)  # same model order as _answers
    assert stats["adapter_device_evictions"] > 0


async def test_cuda_bfloat16_engine_is_close_to_fp32(registry) -> None:
    async with Engine(EngineConfig(registry_dir=registry.root)) as cpu:
        expected = await _answers(cpu, registry)
    config = EngineConfig(registry_dir=registry.root, device="cuda", dtype="bfloat16")
    async with Engine(config) as gpu:
        got = await _answers(gpu, registry)
    _assert_close(got, expected, atol=5e-2)
