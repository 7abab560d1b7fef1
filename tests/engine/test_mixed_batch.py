"""A row in a mixed batch equals the same text run alone on its adapter."""

import asyncio
from pathlib import Path

import pytest
import torch

from engine import Engine, EngineConfig
from engine.adapter_store import AdapterStore
from engine.host_cache import HostCache
from engine.lora_kernels import kernel_for
from engine.memory import AdapterMemory
from engine.runner import ModelRunner
from scheduler import Batch

TEXTS = [
    "WIN a brand new car, text CLAIM to 80086 now!",
    "are we still on for lunch tomorrow?",
    "The committee approved the budget after a long debate.",
    "ok",
    "Shares in the company fell sharply after the profit warning was issued this morning.",
    "lol see u there",
]

# (rank, targets, pooling, labels): mixed ranks, targets, poolings and label counts,
# plus a head-only model whose rows carry no LoRA at all
ADAPTERS = [
    (8, ("query", "value"), "mean", ("a", "b")),
    (4, ("query", "key", "value", "dense"), "cls_pooler", ("x", "y", "z")),
    (16, ("intermediate.dense", "output.dense"), "mean", ("p", "q", "r", "s", "t")),
    (0, (), "mean", ("no", "yes")),
    (64, ("value",), "cls_pooler", ("u", "v")),
]


@pytest.fixture
def registry_with_adapters(tmp_path: Path, publish_random):
    from registry import Registry

    registry = Registry(tmp_path / "reg")
    registry.create_tenant("t1")
    registry.create_tenant("t2")
    records = []
    for i, (rank, targets, pooling, labels) in enumerate(ADAPTERS):
        tenant = "t1" if i % 2 == 0 else "t2"
        records.append(
            publish_random(
                registry,
                tenant,
                f"m{i}",
                seed=i,
                rank=rank,
                labels=labels,
                pooling=pooling,
                targets=targets,
            )
        )
    yield registry, records
    registry.close()


def _solo(runner: ModelRunner, key: str, ids: list[int]):
    return runner.step(Batch.of([key], [len(ids)]), [ids])[0]


@pytest.mark.parametrize("kernel", ["loop", "gather", "auto"])
def test_runner_mixed_batch_equals_solo_runs(backbone, registry_with_adapters, kernel) -> None:
    registry, records = registry_with_adapters
    memory = AdapterMemory(backbone, num_pages=256, device="cpu", dtype=torch.float32)
    store = AdapterStore(
        registry, backbone, memory, HostCache(0), max_loads_in_flight=1, pin_host_memory=False
    )
    keys = []
    for record in records:
        key = f"{record.full_name}@{record.version}"
        memory.acquire(key, lambda r=record: store.read(r))
        keys.append(key)
    runner = ModelRunner(backbone, memory, "cpu", kernel_for(kernel, "cpu"))
    ids = backbone.tokenizer(TEXTS)["input_ids"]
    # every adapter gets several texts; rows sorted by adapter form the segments
    pairs = sorted(((keys[i % len(keys)], t) for i, t in enumerate(range(len(TEXTS) * 3))))
    token_ids = [ids[t % len(TEXTS)] for _, t in pairs]
    batch = Batch.of([key for key, _ in pairs], [len(r) for r in token_ids])
    mixed = runner.step(batch, token_ids)
    assert len(batch.seg_adapter) == len(ADAPTERS)
    for row, row_ids, probs in zip(batch.rows, token_ids, mixed, strict=True):
        alone = _solo(runner, row.adapter_key, row_ids)
        torch.testing.assert_close(
            torch.from_numpy(probs), torch.from_numpy(alone), rtol=0, atol=1e-5
        )
    # the adapters really differ: the same text gets different scores under two adapters
    first = _solo(runner, keys[0], ids[0])
    fifth = _solo(runner, keys[4], ids[0])
    assert first.shape != fifth.shape or not (first == fifth).all()


async def test_engine_concurrent_tenants_match_solo(registry_with_adapters) -> None:
    registry, records = registry_with_adapters
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        requests = [
            (r.tenant, r.name, TEXTS[i % len(TEXTS) :] + TEXTS[: i % len(TEXTS)])
            for i, r in enumerate(records)
        ]
        together = await asyncio.gather(*(engine.classify(t, m, x) for t, m, x in requests))
        assert engine.stats()["steps"] < len(requests) * len(TEXTS)  # rows really shared steps
        for (tenant, model, texts), preds in zip(requests, together, strict=True):
            for text, pred in zip(texts, preds, strict=True):
                (alone,) = await engine.classify(tenant, model, [text])
                assert pred.label == alone.label
                for label, score in pred.scores.items():
                    assert abs(score - alone.scores[label]) < 1e-5
