"""The engine on a GPU answers what the CPU engine answers: its LoRA kernels (the default's
matmul loop for steps of a few adapters and Triton SGMV beyond, and Triton alone), pinned
page-ins, pool eviction and half precision, end to end through ``Engine.classify``.

Skipped without CUDA (the ``gpu`` marker); the CPU engine is the reference, run in the same
test on the same registry. fp32 tolerance: summation order only (TF32 stays off, PyTorch's
default for matmuls); bf16: the rounding of every weight and activation to 8 bits.
"""

import pytest
import torch

from engine import Engine, EngineConfig
from tests.engine.mixed_fleet import ADAPTERS, TEXTS, answers, assert_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("kernel", ["auto", "triton", "triton-fused"])
async def test_cuda_engine_equals_cpu_engine(fleet_registry, kernel: str) -> None:
    async with Engine(EngineConfig(registry_dir=fleet_registry.root)) as cpu:
        expected = await answers(cpu, fleet_registry)
    config = EngineConfig(  # eager steps: with graphs every step runs the gather kernel
        registry_dir=fleet_registry.root, device="cuda", lora_kernel=kernel, cuda_graphs=False
    )
    async with Engine(config) as gpu:
        got = await answers(gpu, fleet_registry)
        stats = gpu.stats()
        lean = gpu._loaded.runner.lean
    assert_close(got, expected, atol=1e-4)
    assert lean  # eager steps ran the lean forward (engine/lean_encoder.py): it passed on CUDA
    assert stats["adapter_device_loads"] == len(ADAPTERS)  # head-only models too: their heads
    assert stats["steps"] < len(ADAPTERS) * len(TEXTS)  # adapters really shared steps


async def test_cuda_graphs_replay_what_the_cpu_engine_answers(fleet_registry) -> None:
    """Each step shape is captured once and replayed; pages change under the captured
    graphs (a second round after evictions), so replays must read the pool, not a copy."""
    async with Engine(EngineConfig(registry_dir=fleet_registry.root)) as cpu:
        expected = await answers(cpu, fleet_registry)
    config = EngineConfig(
        registry_dir=fleet_registry.root, device="cuda", adapter_pages=96
    )  # graphs are the default on CUDA
    async with Engine(config) as gpu:
        captured = gpu.stats()["static_captures"]  # at start-up, for the registry's ranks
        first = await answers(gpu, fleet_registry)
        again = await answers(gpu, fleet_registry)
        runner = gpu._loaded.runner
        stats = gpu.stats()
    assert_close(first, expected, atol=1e-4)
    assert_close(again, expected, atol=1e-4)
    assert runner.num_static_steps == runner.num_steps == stats["static_steps"]  # all fit
    assert stats["static_captures"] == captured == len(runner._static)  # none while serving
    assert stats["static_capture_us"] > 0
    assert stats["adapter_device_evictions"] > 0
    graphs = [step._graph for step in runner._static.values()]
    assert graphs and all(g is not None for g in graphs)


async def test_cuda_pool_smaller_than_the_fleet_evicts_and_stays_correct(fleet_registry) -> None:
    async with Engine(EngineConfig(registry_dir=fleet_registry.root)) as cpu:
        expected = await answers(cpu, fleet_registry)
    # 64 pages hold the rank-64 adapter alone: every other adapter evicts it or is evicted
    config = EngineConfig(registry_dir=fleet_registry.root, device="cuda", adapter_pages=64)
    async with Engine(config) as gpu:
        got = []
        for _ in range(2):  # a second round pages everything in again, at other pages
            for tenant in ("t1", "t2"):
                for record in fleet_registry.list_adapters(tenant):
                    got.append(await gpu.classify(tenant, record.name, TEXTS))
        stats = gpu.stats()
    assert_close(got, expected + expected, atol=1e-4)  # same model order as _answers
    assert stats["adapter_device_evictions"] > 0


async def test_cuda_bfloat16_engine_is_close_to_fp32(fleet_registry) -> None:
    async with Engine(EngineConfig(registry_dir=fleet_registry.root)) as cpu:
        expected = await answers(cpu, fleet_registry)
    config = EngineConfig(registry_dir=fleet_registry.root, device="cuda", dtype="bfloat16")
    async with Engine(config) as gpu:
        got = await answers(gpu, fleet_registry)
    assert_close(got, expected, atol=5e-2)


async def test_the_default_pool_takes_a_tenth_of_the_device(fleet_registry) -> None:
    total = torch.cuda.get_device_properties(torch.device("cuda")).total_memory
    config = EngineConfig(registry_dir=fleet_registry.root, device="cuda", cuda_graphs=False)
    async with Engine(config) as gpu:
        pool_bytes = gpu._loaded.memory.pool_bytes
        assert gpu.stats()["adapter_pages_free"] == gpu.config.adapter_pages > 1024
    assert 0.09 * total < pool_bytes <= 0.1 * total + pool_bytes / gpu.config.adapter_pages
