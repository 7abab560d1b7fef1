"""The embedding cache: repeated texts cost head-only models no backbone row, per tenant and
per backbone, within a byte budget; LoRA models never read it."""

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import Engine, EngineConfig
from engine.adapters import Head
from engine.embedding_cache import (
    ENTRY_OVERHEAD_BYTES,
    EmbeddingCache,
    EmbeddingKey,
    tokens_sha256,
)
from engine.inputs import Tokenized
from engine.job import ModelVersion, MultiJob
from engine.multi import ModelSlot, MultiPending
from engine.runner import BACKBONE_KEY, Pooled
from registry import Registry

TEXTS = ["WIN a brand new car, text CLAIM now!", "lunch tomorrow?", "the budget was approved"]
HIDDEN = 384  # MiniLM
ENTRY_BYTES = HIDDEN * 4 + ENTRY_OVERHEAD_BYTES


def key(tenant: str = "acme", sha: str = "a" * 64, pooling: str = "mean", ids=(1, 2, 3)):
    return EmbeddingKey(tenant, sha, pooling, tokens_sha256(ids))


def vector(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(HIDDEN).astype(np.float32)


# the cache alone ----------------------------------------------------------------------------


def test_hit_miss_and_every_key_part_counts() -> None:
    cache = EmbeddingCache(1 << 20)
    assert cache.get_all([key()]) is None
    cache.put(key(), vector(0))
    (found,) = cache.get_all([key()])
    np.testing.assert_array_equal(found, vector(0))
    assert not found.flags.writeable  # hits share the stored copy: nobody may change it
    for other in (
        key(tenant="globex"),
        key(sha="b" * 64),
        key(pooling="cls_pooler"),
        key(ids=(1, 2, 4)),
    ):
        assert cache.get_all([other]) is None
    assert cache.get_all([key(), key(pooling="cls_pooler")]) is None  # all or nothing
    assert (cache.num_hits, cache.num_misses) == (1, 6)


def test_byte_bound_evicts_least_recently_used() -> None:
    cache = EmbeddingCache(2 * ENTRY_BYTES + 10)
    cache.put(key(ids=(0,)), vector(0))
    cache.put(key(ids=(1,)), vector(1))
    assert cache.get_all([key(ids=(0,))]) is not None  # 0 is now the most recently used
    cache.put(key(ids=(2,)), vector(2))
    assert cache.num_bytes == 2 * ENTRY_BYTES <= cache.max_bytes
    assert (len(cache), cache.num_evictions) == (2, 1)
    assert cache.get_all([key(ids=(1,))]) is None
    assert cache.get_all([key(ids=(0,))]) is not None
    assert cache.get_all([key(ids=(2,))]) is not None
    cache.put(key(ids=(2,)), vector(3))  # replacing an entry does not count it twice
    assert cache.num_bytes == 2 * ENTRY_BYTES
    cache.clear()
    assert (len(cache), cache.num_bytes) == (0, 0)


def test_zero_budget_disables_the_cache() -> None:
    cache = EmbeddingCache(0)
    cache.put(key(), vector(0))
    assert cache.get_all([key()]) is None
    assert (len(cache), cache.num_hits, cache.num_misses) == (0, 0, 0)
    with pytest.raises(ValueError, match="embedding cache"):
        EmbeddingCache(-1)
    with pytest.raises(ValueError, match="embedding_cache_bytes"):
        EngineConfig(embedding_cache_bytes=-1)


def test_token_hash_depends_only_on_the_ids() -> None:
    assert tokens_sha256([101, 7, 102]) == tokens_sha256((101, 7, 102))
    assert tokens_sha256([101, 7, 102]) != tokens_sha256([101, 7, 7, 102])


# how a request keys it --------------------------------------------------------------------


async def test_another_backbone_or_tenant_never_hits() -> None:
    """The request's keys carry the tenant and the backbone's SHA-256: a backbone change (and
    another tenant) misses even for the very same token ids."""
    cache = EmbeddingCache(1 << 20)
    gen = torch.Generator().manual_seed(0)
    head = Head("mean", torch.randn(2, HIDDEN, generator=gen), torch.zeros(2))
    slot = ModelSlot(ModelVersion("acme/m", 1), ("a", "b"), "acme/m@1", num_pages=0, head=head)
    tokens = Tokenized(ids=((101, 2023, 102),), truncated=(False,))

    def request(tenant: str, sha: str) -> tuple[MultiJob, MultiPending]:
        job = MultiJob(1, [slot.version], [False], [3], on_finish=lambda _job: None)
        pending = MultiPending(job, tokens, [slot], cache, tenant=tenant, backbone_sha256=sha)
        pending.serve_cached()
        return job, pending

    job, first = request("acme", "a" * 64)
    rows = first.rows(0.0, None)
    assert [r.adapter_key for r in rows] == [BACKBONE_KEY] and not job.done
    first.deliver(rows, [Pooled({"mean": vector(0), "cls_pooler": vector(1)})])
    (computed,) = await job.results()
    assert len(cache) == 1  # only the pooling its heads read

    job, again = request("acme", "a" * 64)
    assert again.rows(0.0, None) == [] and job.done
    (cached,) = await job.results()
    assert cached == computed

    for tenant, sha in (("acme", "b" * 64), ("globex", "a" * 64)):
        job, other = request(tenant, sha)
        assert len(other.rows(0.0, None)) == 1 and not job.done
    assert (cache.num_hits, cache.num_misses) == (1, 3)


async def test_a_clear_while_a_request_runs_is_not_undone_by_its_delivery() -> None:
    """The engine empties the cache when a tenant is deleted; that tenant's request already
    in a step used to put its texts back as its rows came in."""
    cache = EmbeddingCache(1 << 20)
    gen = torch.Generator().manual_seed(0)
    head = Head("mean", torch.randn(2, HIDDEN, generator=gen), torch.zeros(2))
    slot = ModelSlot(ModelVersion("acme/m", 1), ("a", "b"), "acme/m@1", num_pages=0, head=head)
    tokens = Tokenized(ids=((101, 2023, 102),), truncated=(False,))
    for is_cleared in (True, False):
        job = MultiJob(1, [slot.version], [False], [3], on_finish=lambda _job: None)
        pending = MultiPending(job, tokens, [slot], cache, tenant="acme", backbone_sha256="a" * 64)
        pending.serve_cached()
        rows = pending.rows(0.0, None)
        if is_cleared:
            cache.clear()  # the tenant's deletion, while its rows run
        pending.deliver(rows, [Pooled({"mean": vector(0)})])
        await job.results()  # answered either way
        assert len(cache) == (0 if is_cleared else 1)
    # resolved before a clear, it reads nothing put there since (a tenant made again)
    before = cache.generation
    cache.clear()
    cache.put(pending._cache_key(0, "mean"), vector(1))
    job = MultiJob(1, [slot.version], [False], [3], on_finish=lambda _job: None)
    late = MultiPending(
        job, tokens, [slot], cache, tenant="acme", backbone_sha256="a" * 64, cache_generation=before
    )
    late.serve_cached()
    assert len(late.rows(0.0, None)) == 1 and not job.done


# through the engine ------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path: Path, publish_random):
    reg = Registry(tmp_path / "reg")
    reg.create_tenant("acme")
    reg.create_tenant("globex")
    publish_random(reg, "acme", "urgent", seed=1, rank=0, pooling="mean")
    publish_random(reg, "acme", "sales", seed=2, rank=0, pooling="cls_pooler")
    publish_random(reg, "acme", "spam", seed=3, rank=4, pooling="mean")
    publish_random(reg, "globex", "urgent", seed=1, rank=0, pooling="mean")  # same weights
    yield reg
    reg.close()


def config(registry: Registry, **overrides) -> EngineConfig:
    return EngineConfig(registry_dir=registry.root, **overrides)


async def test_repeated_texts_skip_the_backbone_for_head_only_models(registry) -> None:
    async with Engine(config(registry)) as engine:
        first = await engine.classify_many("acme", ["urgent", "sales"], TEXTS)
        stats = engine.stats()
        assert stats["rows"] == len(TEXTS)
        assert (stats["embedding_cache_hits"], stats["embedding_cache_misses"]) == (0, 3)
        assert stats["embedding_cache_entries"] == 2 * len(TEXTS)  # mean and cls per text

        again = await engine.classify_many("acme", ["sales", "urgent"], [TEXTS[1], "new text"])
        stats = engine.stats()
        assert stats["rows"] == len(TEXTS) + 1  # only the new text ran
        assert (stats["embedding_cache_hits"], stats["embedding_cache_misses"]) == (1, 4)
        (alone,) = await engine.classify("acme", "sales", [TEXTS[1]])
        cached, computed = again[0].results[0], first[1].results[1]  # "sales", both times
        assert cached.label == computed.label == alone.label
        assert cached.scores == pytest.approx(computed.scores, abs=1e-5)
        assert cached.scores == pytest.approx(alone.scores, abs=1e-5)
        assert again[0].results[1].scores == pytest.approx(first[1].results[0].scores, abs=1e-5)


async def test_lora_models_never_use_the_cache(registry) -> None:
    async with Engine(config(registry)) as engine:
        for _ in range(2):
            await engine.classify_many("acme", ["spam"], TEXTS)
        stats = engine.stats()
        assert stats["rows"] == 2 * len(TEXTS)
        assert stats["embedding_cache_hits"] == stats["embedding_cache_misses"] == 0
        assert stats["embedding_cache_entries"] == 0

        for _ in range(2):
            await engine.classify_many("acme", ["spam", "urgent"], TEXTS)
        stats = engine.stats()
        # first: a LoRA row and a backbone row per text; second: the LoRA rows again only
        assert stats["rows"] == 2 * len(TEXTS) + 2 * len(TEXTS) + len(TEXTS)
        assert stats["embedding_cache_hits"] == len(TEXTS)


async def test_another_tenant_with_the_same_text_misses(registry) -> None:
    async with Engine(config(registry)) as engine:
        mine = await engine.classify_many("acme", ["urgent"], TEXTS)
        theirs = await engine.classify_many("globex", ["urgent"], TEXTS)
        stats = engine.stats()
        assert stats["rows"] == 2 * len(TEXTS)
        assert (stats["embedding_cache_hits"], stats["embedding_cache_misses"]) == (0, 6)
        assert [p.results[0].scores for p in mine] == [p.results[0].scores for p in theirs]


async def test_a_tenant_created_again_never_hits_the_deleted_ones_texts(
    registry, publish_random
) -> None:
    """Keyed by the tenant's name, the cache kept a deleted tenant's texts, and whoever made
    a tenant of that name next could time which texts it had sent."""
    config_ = config(registry, settings_poll_s=0.05)
    async with Engine(config_) as engine:
        await engine.classify_many("globex", ["urgent"], TEXTS)
        assert engine.stats()["embedding_cache_entries"] == len(TEXTS)
        registry.delete_tenant("globex")  # as the CLI does: the engine learns by polling
        await asyncio.sleep(0.5)
        assert engine.stats()["embedding_cache_entries"] == 0
        registry.create_tenant("globex")
        publish_random(registry, "globex", "probe", seed=4, rank=0, pooling="mean")
        hits = engine.stats()["embedding_cache_hits"]
        await engine.classify_many("globex", ["probe"], TEXTS)
        assert engine.stats()["embedding_cache_hits"] == hits


async def test_a_request_tokenizing_while_its_tenant_is_deleted_caches_nothing(
    registry, monkeypatch
) -> None:
    """The deletion empties the cache while the request awaits its tokens; the request must
    not count from the emptied cache, or its delivery puts the deleted tenant's texts back."""
    async with Engine(config(registry)) as engine:
        await engine.classify_many("globex", ["urgent"], ["warm up"])
        record = registry.resolve("globex", "urgent")
        held = engine._loaded.store.pin_if_resident(record)  # another request's hold
        assert held is not None
        tokenize, gate = engine._tokenize, asyncio.Event()

        async def slow_tokenize(*args, **kwargs):
            await gate.wait()
            return await tokenize(*args, **kwargs)

        monkeypatch.setattr(engine, "_tokenize", slow_tokenize)
        running = asyncio.create_task(engine.classify_many("globex", ["urgent"], TEXTS))
        await asyncio.sleep(0.05)  # resolved, now tokenizing
        engine.forget(registry.delete_tenant("globex"))
        assert engine.stats()["embedding_cache_entries"] == 0
        gate.set()
        await running  # answered: its adapter was still held
        engine._loaded.store.unpin(held)
        assert engine.stats()["embedding_cache_entries"] == 0


async def test_engine_cache_respects_its_byte_budget(registry) -> None:
    async with Engine(config(registry, embedding_cache_bytes=2 * ENTRY_BYTES)) as engine:
        for text in TEXTS:
            await engine.classify_many("acme", ["urgent"], [text])
        stats = engine.stats()
        assert stats["embedding_cache_entries"] == 2 and stats["embedding_cache_evictions"] == 1
        assert stats["embedding_cache_bytes"] <= 2 * ENTRY_BYTES
        await engine.classify_many("acme", ["urgent"], [TEXTS[0]])  # evicted: runs again
        await engine.classify_many("acme", ["urgent"], [TEXTS[2]])  # kept: no row
        assert engine.stats()["rows"] == len(TEXTS) + 1


async def test_zero_budget_runs_every_text(registry) -> None:
    async with Engine(config(registry, embedding_cache_bytes=0)) as engine:
        for _ in range(2):
            await engine.classify_many("acme", ["urgent"], TEXTS)
        stats = engine.stats()
        assert stats["rows"] == 2 * len(TEXTS)
        assert stats["embedding_cache_entries"] == stats["embedding_cache_misses"] == 0
