"""5,000 registered adapters served through a device pool that holds 64 at a time."""

import asyncio
import json
from pathlib import Path

import pytest
import torch

from engine import Engine, EngineConfig
from engine.peft_io import write_peft_adapter
from registry import PublishItem, Registry

NUM_ADAPTERS = 5000
NUM_LABELS = 4
MODULE = "encoder.layer.0.attention.self.query"


@pytest.fixture(scope="module")
def crowded_registry(backbone, tmp_path_factory) -> Path:
    """Rank-1 adapters whose head bias makes label ``c{i % 4}`` win by a wide margin.

    Every adapter has real LoRA factors (so each one is paged in), and its expected label is
    known, so a request answered with another adapter's weights is caught.
    """
    root = tmp_path_factory.mktemp("crowded")
    registry = Registry(root / "reg", durable=False)
    registry.create_tenant("acme")
    labels = [f"c{k}" for k in range(NUM_LABELS)]
    gen = torch.Generator().manual_seed(0)
    items = []
    for i in range(NUM_ADAPTERS):
        src = root / "src" / f"m{i}"
        bias = torch.full((NUM_LABELS,), -20.0)
        bias[i % NUM_LABELS] = 20.0
        write_peft_adapter(
            src,
            backbone,
            {
                MODULE: (
                    torch.randn(1, 384, generator=gen) * 0.01,
                    torch.randn(384, 1, generator=gen) * 0.01,
                )
            },
            rank=1,
            alpha=1.0,
            head_weight=torch.zeros(NUM_LABELS, 384),
            head_bias=bias,
        )
        manifest = {
            "labels": labels,
            "base_sha256": backbone.sha256,
            "rank": 1,
            "pooling": "mean",
            "expected": i % NUM_LABELS,
        }
        items.append(PublishItem("acme", f"m{i}", src, manifest))
    for start in range(0, NUM_ADAPTERS, 1000):
        registry.publish_many(items[start : start + 1000])
    registry.close()
    return root / "reg"


async def test_five_thousand_adapters_through_a_pool_of_sixty_four(crowded_registry) -> None:
    config = EngineConfig(
        registry_dir=crowded_registry,
        adapter_pages=64,
        max_batch_rows=64,
        host_cache_bytes=32 << 20,
        max_loads_in_flight=4,
    )
    async with Engine(config) as engine:
        semaphore = asyncio.Semaphore(256)

        async def ask(i: int) -> str:
            async with semaphore:
                (pred,) = await engine.classify("acme", f"m{i}", [f"message {i % 7}"])
                return pred.label

        labels = await asyncio.gather(*(ask(i) for i in range(NUM_ADAPTERS)))
        stats = engine.stats()
    wrong = [i for i, label in enumerate(labels) if label != f"c{i % NUM_LABELS}"]
    assert not wrong, f"{len(wrong)} adapters answered with another's weights: {wrong[:10]}"
    assert stats["adapter_device_loads"] >= NUM_ADAPTERS
    assert stats["adapter_device_evictions"] >= NUM_ADAPTERS - 64
    assert stats["steps"] < NUM_ADAPTERS  # many adapters shared each step
    assert stats["requests_in_flight"] == 0 and stats["waiting_rows"] == 0
    manifest = json.loads(
        (crowded_registry / "adapters" / "acme" / "m7" / "1" / "graft_manifest.json").read_text()
    )
    assert manifest["expected"] == 3
