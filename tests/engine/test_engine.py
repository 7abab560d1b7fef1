"""The embedded engine: the Python API application developers call without HTTP."""

import asyncio
import json
from pathlib import Path

import pytest

from engine import (
    AdapterFormatError,
    AdapterIncompatible,
    Engine,
    EngineClosed,
    EngineConfig,
    InputError,
    InputTooLong,
    JobCancelled,
    ModelNotFound,
)
from registry import InvalidAdapter, Registry, formats


@pytest.fixture
def registry(tmp_path: Path):
    reg = Registry(tmp_path / "reg")
    reg.create_tenant("acme")
    reg.create_tenant("globex")
    yield reg
    reg.close()


async def test_classify_returns_one_prediction_per_text(registry, publish_random) -> None:
    publish_random(registry, "acme", "spam", labels=("ham", "spam"))
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        out = await engine.classify(tenant="acme", model="spam", texts=["WIN a prize now", "hi"])
    assert [p.index for p in out] == [0, 1]
    for p in out:
        assert set(p.scores) == {"ham", "spam"}
        assert p.label == max(p.scores, key=p.scores.get)
        assert abs(sum(p.scores.values()) - 1.0) < 1e-5
        assert not p.truncated and p.num_tokens > 2


async def test_unknown_and_foreign_models_are_the_same_not_found(registry, publish_random) -> None:
    publish_random(registry, "globex", "secret")
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        errors = []
        for model in ("secret", "globex/secret", "nope", "spam@7", "../etc"):
            with pytest.raises(ModelNotFound) as info:
                await engine.classify("acme", model, ["x"])
            errors.append(info.value)
        assert "secret" in str(errors[0]) and "globex" not in str(errors[0])
        assert engine.stats()["requests_in_flight"] == 0


async def test_pinned_versions_and_latest(registry, publish_random) -> None:
    publish_random(registry, "acme", "m", seed=1, labels=("a", "b"))
    publish_random(registry, "acme", "m", seed=2, labels=("a", "b", "c"))
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        (v1,) = await engine.classify("acme", "m@1", ["text"])
        (latest,) = await engine.classify("acme", "m", ["text"])
        job = await engine.submit("acme", "acme/m@1", ["text"])
        assert (job.model, job.version) == ("acme/m", 1)
        await job.results()
    assert set(v1.scores) == {"a", "b"} and set(latest.scores) == {"a", "b", "c"}


async def test_input_errors_name_the_field(registry, publish_random) -> None:
    publish_random(registry, "acme", "m")
    async with Engine(EngineConfig(registry_dir=registry.root, max_input_tokens=16)) as engine:
        with pytest.raises(InputError, match="empty") as info:
            await engine.classify("acme", "m", [])
        assert info.value.field == "input"
        with pytest.raises(InputError) as info:
            await engine.classify("acme", "m", ["ok", "  "])
        assert info.value.field == "input[1]"
        with pytest.raises(InputError) as info:
            await engine.classify("acme", "m", ["ok", 3])  # type: ignore[list-item]
        assert info.value.field == "input[1]"
        long_text = "word " * 100
        with pytest.raises(InputTooLong) as info:
            await engine.classify("acme", "m", ["short", long_text], truncate=False)
        assert info.value.field == "input[1]"
        short, cut = await engine.classify("acme", "m", ["short", long_text])
        assert not short.truncated and cut.truncated and cut.num_tokens == 16
        for timeout in (0, -1, "5", True):
            with pytest.raises(InputError) as info:
                await engine.classify("acme", "m", ["ok"], timeout_s=timeout)
            assert info.value.field == "timeout"
        # past float's range: capped at max_timeout_s like any long timeout
        assert len(await engine.classify("acme", "m", ["ok"], timeout_s=10**400)) == 1
        assert engine.stats()["requests_in_flight"] == 0


async def test_stream_and_cancel(registry, publish_random) -> None:
    publish_random(registry, "acme", "m")
    async with Engine(EngineConfig(registry_dir=registry.root, max_batch_rows=2)) as engine:
        job = await engine.submit("acme", "m", [f"text number {i}" for i in range(6)])
        seen = [p.index async for p in job.stream()]
        assert sorted(seen) == list(range(6))
        job = await engine.submit("acme", "m", [f"text number {i}" for i in range(50)])
        job.cancel()
        with pytest.raises(JobCancelled):
            await job.results()
        await asyncio.sleep(0.3)
        stats = engine.stats()
        assert stats["waiting_rows"] == 0 and stats["requests_in_flight"] == 0
        assert stats["rows"] < 6 + 50  # the cancelled request's rows never all ran


async def test_adapter_for_another_base_is_refused(registry, publish_random, backbone) -> None:
    record = publish_random(registry, "acme", "m")
    src = record.path
    manifest = json.loads((src / "graft_manifest.json").read_text())
    staged = src.parent.parent / "staged"
    staged.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (staged / f).write_bytes((src / f).read_bytes())
    registry.publish(
        "acme",
        "other-base",
        staged,
        {"labels": manifest["labels"], "base_sha256": "0" * 64, "rank": 8, "pooling": "mean"},
    )
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        with pytest.raises(AdapterIncompatible, match="trained on base model"):
            await engine.classify("acme", "other-base", ["x"])
        assert engine.stats()["requests_in_flight"] == 0


async def test_tampered_adapter_is_refused(registry, publish_random) -> None:
    record = publish_random(registry, "acme", "m")
    weights = record.path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.chmod(0o644)
    weights.write_bytes(bytes(data))
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        with pytest.raises(AdapterFormatError, match="SHA-256"):
            await engine.classify("acme", "m", ["x"])


async def test_an_adapter_whose_manifest_understates_its_rank_fails_alone(
    registry, publish_random, write_random_adapter, backbone, tmp_path, monkeypatch
) -> None:
    """Pages are budgeted from the manifest's rank: one that says 4 for rank-16 weights made
    steps that overflowed the pool, failing the other tenants' rows in them too. Publishing
    refuses such a manifest now; a registry an older graft wrote may still hold one."""
    write_random_adapter(backbone, tmp_path / "liar", seed=1, rank=16, num_labels=2)
    manifest = {"labels": ["neg", "pos"], "base_sha256": backbone.sha256, "rank": 4}
    with pytest.raises(InvalidAdapter, match="manifest\\['rank'\\] is 4, but .* rank-16"):
        registry.publish("acme", "liar", tmp_path / "liar", manifest)
    monkeypatch.setattr(formats, "check_lora_rank", lambda found, rank: None)  # an older graft
    registry.publish("acme", "liar", tmp_path / "liar", manifest)
    publish_random(registry, "globex", "good", rank=8)
    async with Engine(EngineConfig(registry_dir=registry.root, adapter_pages=16)) as engine:
        liar, good = await asyncio.gather(
            engine.classify("acme", "liar", ["hello"]),
            engine.classify("globex", "good", ["hello"]),
            return_exceptions=True,
        )
        assert isinstance(liar, AdapterFormatError) and "rank 16, its manifest says 4" in str(liar)
        assert len(good) == 1  # the neighbour is served


async def test_small_pool_evicts_idle_adapters_and_stays_correct(registry, publish_random) -> None:
    for i in range(6):
        publish_random(registry, "acme", f"m{i}", seed=i, rank=8)
    async with Engine(EngineConfig(registry_dir=registry.root, adapter_pages=16)) as engine:
        first = [await engine.classify("acme", f"m{i}", ["same text"]) for i in range(6)]
        again = [await engine.classify("acme", f"m{i}", ["same text"]) for i in range(6)]
        stats = engine.stats()
    assert stats["adapter_device_evictions"] >= 4
    for a, b in zip(first, again, strict=True):
        assert a[0].scores == pytest.approx(b[0].scores, abs=1e-6)


async def test_job_timings_split_queue_and_compute(registry, publish_random) -> None:
    publish_random(registry, "acme", "m")
    async with Engine(EngineConfig(registry_dir=registry.root, max_batch_rows=1)) as engine:
        job = await engine.submit("acme", "m", ["one", "two", "three"])
        await job.results()
        timings = job.timings()
    assert timings.queue_s >= 0 and timings.compute_s > 0
    assert timings.total_s >= timings.queue_s + timings.compute_s - 1e-6


async def test_listing_shows_the_promoted_version_after_a_rollback(
    registry, publish_random
) -> None:
    publish_random(registry, "acme", "m", seed=1)
    publish_random(registry, "acme", "m", seed=2)
    registry.rollback("acme", "m")
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        (info,) = engine.list_adapters("acme")
        job = await engine.submit("acme", "m", ["text"])
        await job.results()
    assert info.version == 1 and info.versions == (1, 2)
    assert job.version == 1  # what an unpinned request is served


async def test_a_name_with_no_promoted_version_is_listed_so_and_says_so_when_asked(
    registry, write_random_adapter, backbone, tmp_path
) -> None:
    """Registered with promote=False (a candidate to check before promoting): not what an
    unpinned request gets, and the 404 says how to reach it."""
    write_random_adapter(backbone, tmp_path / "fresh", seed=3, rank=4, num_labels=2)
    manifest = {"labels": ["a", "b"], "base_sha256": backbone.sha256, "rank": 4}
    registry.publish("acme", "fresh", tmp_path / "fresh", manifest, promote=False)
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        (info,) = engine.list_adapters("acme")
        with pytest.raises(ModelNotFound, match=r"no promoted version: pin one \(fresh@1\)"):
            await engine.classify("acme", "fresh", ["text"])
        with pytest.raises(ModelNotFound, match="has no version 2"):
            await engine.classify("acme", "fresh@2", ["text"])
        (pinned,) = await engine.classify("acme", "fresh@1", ["text"])
    assert (info.version, info.is_latest, info.to_dict()["latest"]) == (1, False, False)
    assert set(pinned.scores) == {"a", "b"}


async def test_token_ids_given_by_the_caller_are_checked_then_served(
    registry, publish_random
) -> None:
    """``tokens=``: what a front-end process sends; the answer equals tokenizing here."""
    from engine import Tokenized

    publish_random(registry, "acme", "spam", labels=("ham", "spam"))
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        texts = ["WIN a prize now", "see you at lunch"]
        ids = tuple(tuple(row) for row in engine.backbone.encoder.inline(texts))
        given = Tokenized(ids=ids, truncated=(False, False))
        here = await engine.classify("acme", "spam", texts)
        job = await engine.submit("acme", "spam", texts, tokens=given)
        assert await job.results() == here
        vocab = engine.backbone.vocab_size
        # lists the caller changes once submitted: the checked copy runs, not the change
        rows = [list(row) for row in ids]
        job = await engine.submit("acme", "spam", texts, tokens=Tokenized(rows, [False] * 2))
        rows[0][1] = vocab * 1000  # past the embedding table: it would fail the whole step
        assert await job.results() == here
        bad = {
            "rows for": Tokenized(ids=ids[:1], truncated=(False,)),
            "outside the vocabulary": Tokenized(ids=(ids[0], (101, vocab)), truncated=(0, 0)),
            "token ids; 1 to": Tokenized(ids=(ids[0], ()), truncated=(False, False)),
        }
        for message, tokens in bad.items():
            with pytest.raises(InputError, match=message):
                await engine.submit("acme", "spam", texts, tokens=tokens)
            with pytest.raises(InputError, match=message):
                await engine.submit_many("acme", ["spam"], texts, tokens=tokens)
        assert engine.stats()["requests_in_flight"] == 0
        assert engine.stats()["waiting_rows"] == 0


async def test_submit_nowait_queues_a_warm_request_now_and_leaves_a_cold_one_alone(
    registry, publish_random
) -> None:
    """What a front end's handed-over request uses: no task, no await. A cold adapter gives
    None with nothing reserved or pinned; a refusal leaves nothing behind either."""
    from engine import Tokenized
    from engine.adapter_store import adapter_key
    from scheduler import TenantPolicy

    record = publish_random(registry, "acme", "spam", labels=("ham", "spam"))
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        texts = ["WIN a prize now", "see you at lunch"]
        ids = tuple(tuple(row) for row in engine.backbone.encoder.inline(texts))
        tokens = Tokenized(ids=ids, truncated=(False, False))
        host = engine._loaded.host
        assert engine.submit_nowait("acme", "spam", texts, tokens=tokens) is None  # cold
        assert engine.stats()["adapter_host_entries"] == 0
        assert engine.stats()["requests_in_flight"] == 0
        here = await engine.classify("acme", "spam", texts)  # loads it
        job = engine.submit_nowait("acme", "spam", texts, tokens=tokens)
        assert job is not None and await job.results() == here
        bad = Tokenized(ids=(ids[0], (101, engine.backbone.vocab_size)), truncated=(0, 0))
        with pytest.raises(InputError, match="outside the vocabulary"):
            engine.submit_nowait("acme", "spam", texts, tokens=bad)
        with pytest.raises(ModelNotFound):
            engine.submit_nowait("acme", "nope", texts, tokens=tokens)
        engine.set_tenant_policy("acme", TenantPolicy(max_queued_rows=2))
        for _ in range(3):  # each refusal released its reservation: room for 2 rows stays
            with pytest.raises(InputError):
                engine.submit_nowait("acme", "spam", texts, tokens=bad)
        # admission first, as submit: before the ids' check (two ids for four texts); four
        # rows can never fit a queue of two, so that is a 422 on input, not a 429 to retry
        with pytest.raises(InputError, match="4 inputs, more than the 2") as refused:
            engine.submit_nowait("acme", "spam", texts * 2, tokens=tokens)
        assert refused.value.field == "input"
        job = engine.submit_nowait("acme", "spam", texts, tokens=tokens)
        assert job is not None and await job.results() == here
        assert engine.stats()["requests_in_flight"] == 0
        assert host.pins(adapter_key(record)) == 0  # nothing refused kept its pin


async def test_an_engine_is_entered_once_and_never_restarted(registry, publish_random) -> None:
    """A second `async with` on a running engine would close it under its owner at exit;
    a closed engine's threads are gone, so starting it again is refused by name."""
    publish_random(registry, "acme", "spam", labels=("ham", "spam"))
    engine = Engine(EngineConfig(registry_dir=registry.root))
    with pytest.raises(EngineClosed, match="not running"):
        await engine.classify("acme", "spam", ["hi"])
    async with engine:
        with pytest.raises(RuntimeError, match="already entered"):
            async with engine:
                pass
        assert (await engine.classify("acme", "spam", ["hi"]))[0].label in ("ham", "spam")
    with pytest.raises(EngineClosed, match="create a new Engine"):
        await engine.start()
