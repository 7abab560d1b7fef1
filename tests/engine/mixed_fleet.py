"""A fleet of adapters covering the serving paths (mixed ranks and targets, both poolings, a
head-only model) and how to compare two engines' answers on it: for the mixed-batch tests and
the tests that run one engine against another (CUDA against CPU, bfloat16 against float32).
The registry holding it is the ``fleet_registry`` fixture (tests/engine/conftest.py)."""

import asyncio

import numpy as np
import torch

from engine import Engine

TEXTS = [
    "WIN a brand new car, text CLAIM to 80086 now!",
    "are we still on for lunch tomorrow?",
    "The committee approved the budget after a long debate.",
    "ok",
    "Shares in the company fell sharply after the profit warning was issued this morning.",
    "lol see u there",
]

# (rank, targets, pooling, labels): mixed ranks, targets, poolings and label counts, plus a
# head-only model whose rows carry no LoRA at all
ADAPTERS = [
    (8, ("query", "value"), "mean", ("a", "b")),
    (4, ("query", "key", "value", "dense"), "cls_pooler", ("x", "y", "z")),
    (16, ("intermediate.dense", "output.dense"), "mean", ("p", "q", "r", "s", "t")),
    (0, (), "mean", ("no", "yes")),
    (64, ("value",), "cls_pooler", ("u", "v")),
    (8, ("query", "key", "value", "dense"), "mean", ("k", "l")),
]


def publish_fleet(registry, publish_random) -> list:
    """ADAPTERS as models m0, m1... alternating between tenants t1 and t2; their records."""
    registry.create_tenant("t1")
    registry.create_tenant("t2")
    return [
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
        for i, (rank, targets, pooling, labels) in enumerate(ADAPTERS)
    ]


async def answers(engine: Engine, registry) -> list:
    """Every model on every text, all at once so rows of different adapters share steps."""
    models = [(r.tenant, r.name) for t in ("t1", "t2") for r in registry.list_adapters(t)]
    calls = [engine.classify(t, m, TEXTS) for t, m in models]
    return await asyncio.gather(*calls)


def assert_close(got: list, expected: list, atol: float) -> None:
    assert len(got) == len(expected)
    for preds, refs in zip(got, expected, strict=True):
        for pred, ref in zip(preds, refs, strict=True):
            assert pred.scores.keys() == ref.scores.keys()
            for label, score in pred.scores.items():
                assert abs(score - ref.scores[label]) <= atol, (label, score, ref.scores[label])


def resident_pool(backbone, registry, records, *, num_pages: int = 256, dtype=torch.float32):
    """A CPU adapter pool holding ``records``' adapters, and their keys in order: for tests
    that drive a ModelRunner directly."""
    from engine.adapter_store import AdapterStore
    from engine.host_cache import HostCache
    from engine.memory import AdapterMemory

    memory = AdapterMemory(backbone, num_pages=num_pages, device="cpu", dtype=dtype)
    store = AdapterStore(
        registry, backbone, memory, HostCache(0), max_loads_in_flight=1, pin_host_memory=False
    )
    keys = []
    for record in records:
        key = f"{record.full_name}@{record.version}"
        memory.acquire(key, lambda r=record: store.read(r))
        keys.append(key)
    return memory, keys


def assert_rows_close(got: list, expected: list, atol: float = 1e-5) -> None:
    """Two steps' row outputs: probabilities, or a backbone row's pooled vectors."""
    from engine.runner import Pooled

    assert len(got) == len(expected)
    for have, want in zip(got, expected, strict=True):
        if isinstance(want, Pooled):
            assert isinstance(have, Pooled) and want.vectors.keys() == have.vectors.keys()
            for pooling, vector in want.vectors.items():
                np.testing.assert_allclose(have.vectors[pooling], vector, rtol=0, atol=atol)
        else:
            np.testing.assert_allclose(have, want, rtol=0, atol=atol)
