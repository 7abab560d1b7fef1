"""A fleet of adapters covering the serving paths (mixed ranks and targets, both poolings, a
head-only model) and how to compare two engines' answers on it, for the tests that run one
engine against another (CUDA against CPU, bfloat16 against float32). The registry holding it is
the ``fleet_registry`` fixture (tests/engine/conftest.py)."""

import asyncio

from engine import Engine

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
