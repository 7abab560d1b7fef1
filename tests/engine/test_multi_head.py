"""Multi-model requests: every model answers every input, as it would alone, and head-only
models share one backbone row per input."""

import asyncio
from pathlib import Path

import pytest

from engine import (
    AdapterFormatError,
    Engine,
    EngineConfig,
    InputError,
    ModelNotFound,
    MultiPrediction,
)
from registry import Registry

TEXTS = [
    "WIN a brand new car, text CLAIM to 80086 now!",
    "are we still on for lunch tomorrow?",
    "Shares in the company fell sharply after the profit warning was issued this morning.",
    "ok",
]

# name -> (rank, pooling, labels): head-only models of both poolings, LoRA models of both
MODELS = {
    "urgent": (0, "mean", ("no", "yes")),
    "sales": (0, "cls_pooler", ("lead", "not_lead", "spam")),
    "hr": (0, "mean", ("hr", "other")),
    "legal": (0, "cls_pooler", ("contract", "dispute", "other", "privacy")),
    "topic": (0, "mean", ("a", "b", "c")),
    "spam": (4, "mean", ("ham", "spam")),
    "tone": (8, "cls_pooler", ("calm", "angry", "sad")),
}
HEAD_ONLY = ["urgent", "sales", "hr", "legal", "topic"]


@pytest.fixture
def registry(tmp_path: Path, publish_random):
    reg = Registry(tmp_path / "reg")
    reg.create_tenant("acme")
    reg.create_tenant("globex")
    for seed, (name, (rank, pooling, labels)) in enumerate(MODELS.items()):
        publish_random(reg, "acme", name, seed=seed, rank=rank, pooling=pooling, labels=labels)
    publish_random(reg, "globex", "secret", rank=0)
    yield reg
    reg.close()


def config(registry: Registry, **overrides) -> EngineConfig:
    return EngineConfig(registry_dir=registry.root, **overrides)


async def test_multi_model_answers_equal_single_model_answers(registry) -> None:
    names = ["spam", *HEAD_ONLY, "tone"]  # LoRA and head-only mixed, both poolings
    async with Engine(config(registry, embedding_cache_bytes=0)) as engine:
        multi = await engine.classify_many("acme", names, TEXTS)
        alone = {name: await engine.classify("acme", name, TEXTS) for name in names}
    assert [p.index for p in multi] == list(range(len(TEXTS)))
    for prediction in multi:
        assert [r.model for r in prediction.results] == [f"acme/{n}" for n in names]
        assert all(r.version == 1 for r in prediction.results)
        for name, result in zip(names, prediction.results, strict=True):
            single = alone[name][prediction.index]
            assert result.label == single.label
            assert result.scores.keys() == single.scores.keys()
            for label, score in single.scores.items():
                assert result.scores[label] == pytest.approx(score, abs=1e-5)
            assert prediction.truncated == single.truncated
            assert prediction.num_tokens == single.num_tokens


async def test_two_versions_of_one_name_compare_but_one_version_twice_is_refused(
    registry, publish_random
) -> None:
    publish_random(registry, "acme", "spam", seed=40, rank=4, labels=("ham", "spam"))
    async with Engine(config(registry)) as engine:
        both = await engine.classify_many("acme", ["spam@1", "acme/spam"], TEXTS[:2])
        assert [(r.model, r.version) for r in both[0].results] == [
            ("acme/spam", 1),
            ("acme/spam", 2),
        ]
        for i, version in enumerate((1, 2)):
            (alone,) = await engine.classify("acme", f"spam@{version}", TEXTS[:1])
            assert both[0].results[i].scores == pytest.approx(alone.scores, abs=1e-5)
        with pytest.raises(InputError, match="already listed as models") as info:
            await engine.classify_many("acme", ["spam", "acme/spam@2"], TEXTS[:1])
        assert info.value.field == "models[1]"


async def test_five_head_only_models_cost_one_backbone_row_per_input(registry) -> None:
    async with Engine(config(registry, embedding_cache_bytes=0)) as engine:
        before = engine.stats()["rows"]
        await engine.classify_many("acme", HEAD_ONLY, TEXTS)
        assert engine.stats()["rows"] - before == len(TEXTS)

        before = engine.stats()["rows"]
        await engine.classify_many("acme", [*HEAD_ONLY, "spam", "tone"], TEXTS)
        # one shared backbone row, plus one row per LoRA model, per input
        assert engine.stats()["rows"] - before == 3 * len(TEXTS)

        before = engine.stats()["rows"]
        for name in HEAD_ONLY:
            await engine.classify("acme", name, TEXTS)
        assert engine.stats()["rows"] - before == len(HEAD_ONLY) * len(TEXTS)  # the contrast


async def test_stream_yields_each_input_once_every_model_answered(registry) -> None:
    async with Engine(config(registry, max_batch_rows=2)) as engine:
        job = await engine.submit_many("acme", ["urgent", "spam"], TEXTS)
        assert [(m.model, m.version) for m in job.models] == [("acme/urgent", 1), ("acme/spam", 1)]
        seen = [p async for p in job.stream()]
        assert sorted(p.index for p in seen) == list(range(len(TEXTS)))
        assert all(isinstance(p, MultiPrediction) and len(p.results) == 2 for p in seen)
        assert engine.stats()["requests_in_flight"] == 0


async def test_a_model_named_twice_or_too_many_models_are_refused(registry) -> None:
    async with Engine(config(registry, max_models_per_request=3)) as engine:
        for models, field in (
            (["spam", "urgent", "spam"], "models[2]"),
            (["spam", "acme/spam@1"], "models[1]"),  # two spellings, one model version
            (["spam", "urgent", "hr", "legal"], "models"),
            ([], "models"),
            ("spam", "models"),
            (["spam", ""], "models[1]"),
        ):
            with pytest.raises(InputError) as info:
                await engine.classify_many("acme", models, TEXTS)
            assert info.value.field == field, models
        with pytest.raises(InputError) as info:
            await engine.classify_many("acme", ["spam", "urgent"], ["ok", " "])
        assert info.value.field == "input[1]"
        assert engine.stats()["requests_in_flight"] == 0


async def test_unknown_model_fails_before_anything_is_computed(registry) -> None:
    async with Engine(config(registry)) as engine:
        for unknown in ("nope", "secret", "globex/secret"):
            with pytest.raises(ModelNotFound) as info:
                await engine.classify_many("acme", ["spam", "urgent", unknown, "hr"], TEXTS)
            assert str(info.value) == f"model {unknown!r} not found (models[2])"
        stats = engine.stats()
        assert stats["rows"] == 0 and stats["adapter_disk_loads"] == 0
        assert stats["waiting_rows"] == 0 and stats["requests_in_flight"] == 0
        assert engine.tenant_stats().get("acme", {}).get("admitted_rows", 0) == 0


async def test_a_model_that_cannot_be_served_is_named_by_its_place(
    registry, publish_random
) -> None:
    """Of up to 16 models, a load's refusal said what was wrong but not with which one."""
    publish_random(registry, "acme", "broken", rank=0, pooling="first")  # MiniLM has no use
    async with Engine(config(registry)) as engine:
        with pytest.raises(AdapterFormatError, match=r"^acme/broken@1 \(models\[2\]\): "):
            await engine.classify_many("acme", ["spam", "urgent", "broken", "hr"], TEXTS)
        assert len(await engine.classify_many("acme", ["spam", "urgent"], TEXTS)) == len(TEXTS)


async def test_cancel_drops_waiting_rows_and_releases_every_pin(registry) -> None:
    texts = [f"message number {i} about the quarterly numbers" for i in range(40)]
    async with Engine(config(registry, max_batch_rows=2)) as engine:
        job = await engine.submit_many("acme", ["spam", "urgent", "tone"], texts)
        await asyncio.sleep(0)
        job.cancel()
        await asyncio.sleep(0.05)
        stats = engine.stats()
        assert stats["waiting_rows"] == 0 and stats["requests_in_flight"] == 0
        store = engine._loaded.host
        keys = [f"acme/{name}@1" for name in ("spam", "urgent", "tone")]
        for _ in range(500):  # a step already planned holds its adapters until delivered
            if not any(store.pins(key) for key in keys):
                break
            await asyncio.sleep(0.01)
        assert [store.pins(key) for key in keys] == [0, 0, 0]
        # the engine still serves afterwards
        (after,) = await engine.classify_many("acme", ["spam", "urgent"], ["hello"])
        assert len(after.results) == 2


async def test_request_that_could_never_fit_the_tenant_queue_is_an_input_error(registry) -> None:
    async with Engine(config(registry, tenant_max_queued_rows=10)) as engine:
        # 4 texts x (2 LoRA rows + 1 shared head-only row) = 12 rows > 10, however long it waits
        with pytest.raises(InputError, match="12 rows") as info:
            await engine.classify_many("acme", ["spam", "tone", "urgent", "hr"], TEXTS)
        assert info.value.field == "input"
        out = await engine.classify_many("acme", ["spam", "urgent", "hr"], TEXTS[:3])  # 9 rows
        assert len(out) == 3
        assert engine.stats()["waiting_rows"] == 0
        assert engine.tenant_stats()["acme"]["admitted_rows"] == 6  # the reservation, no more


async def test_submit_many_nowait_queues_when_every_adapter_is_warm(registry) -> None:
    """As ``submit_nowait``: None with nothing pinned or reserved while one adapter is on
    disk; once all are warm, the same answers as ``submit_many``; refusals keep nothing."""
    from engine import Tokenized
    from engine.adapter_store import adapter_key
    from scheduler import TenantPolicy

    names = ["spam", "urgent", "tone"]
    async with Engine(config(registry, embedding_cache_bytes=0)) as engine:
        ids = tuple(tuple(row) for row in engine.backbone.encoder.inline(TEXTS))
        tokens = Tokenized(ids=ids, truncated=(False,) * len(TEXTS))
        await engine.classify("acme", "spam", TEXTS)  # one of three warm
        assert engine.submit_many_nowait("acme", names, TEXTS, tokens=tokens) is None
        records = [engine.registry.resolve("acme", name) for name in names]
        host = engine._loaded.host
        assert [host.pins(adapter_key(r)) for r in records] == [0, 0, 0]
        expected = await engine.classify_many("acme", names, TEXTS)  # loads the rest
        job = engine.submit_many_nowait("acme", names, TEXTS, tokens=tokens)
        assert job is not None and await job.results() == expected
        with pytest.raises(InputError, match="models\\[1\\]"):
            engine.submit_many_nowait("acme", ["spam", "spam"], TEXTS, tokens=tokens)
        engine.set_tenant_policy("acme", TenantPolicy(max_queued_rows=12))  # one request's
        for _ in range(3):  # each refusal gave its reservation back
            with pytest.raises(InputError, match="rows for"):
                engine.submit_many_nowait("acme", names, TEXTS, tokens=Tokenized(ids[:1], (0,)))
        job = engine.submit_many_nowait("acme", names, TEXTS, tokens=tokens)
        assert job is not None and await job.results() == expected
        assert engine.stats()["requests_in_flight"] == 0
        assert engine.stats()["waiting_rows"] == 0
        assert [host.pins(adapter_key(r)) for r in records] == [0, 0, 0]
