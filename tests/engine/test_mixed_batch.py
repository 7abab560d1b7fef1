"""A row in a mixed batch equals the same text run alone on its adapter."""

import asyncio
from pathlib import Path

import pytest
import torch

from engine import Engine, EngineConfig
from engine.lora_kernels import kernel_for
from engine.runner import ModelRunner
from scheduler import Batch
from tests.engine.mixed_fleet import ADAPTERS, TEXTS, publish_fleet, resident_pool


@pytest.fixture
def registry_with_adapters(tmp_path: Path, publish_random):
    from registry import Registry

    registry = Registry(tmp_path / "reg")
    yield registry, publish_fleet(registry, publish_random)
    registry.close()


def _solo(runner: ModelRunner, key: str, ids: list[int]):
    return runner.step(Batch.of([key], [len(ids)]), [ids])[0]


@pytest.mark.parametrize("kernel", ["loop", "gather", "auto"])
def test_runner_mixed_batch_equals_solo_runs(backbone, registry_with_adapters, kernel) -> None:
    registry, records = registry_with_adapters
    memory, keys = resident_pool(backbone, registry, records)
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
