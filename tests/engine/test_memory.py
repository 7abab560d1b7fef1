"""Device pool and host cache invariants: LRU, refcounts, pages, zero page."""

import collections
import gc
import types
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from engine import Engine, EngineConfig, EngineOverloaded
from engine.adapters import AdapterWeights, Head, LoraModule, PackedModules, ranks_and_scales
from engine.engine import pool_pages
from engine.host_cache import HostCache
from engine.memory import AdapterMemory, FreePages, page_bytes, pages_for_bytes

MODULE = "encoder.layer.0.attention.self.query"
NUM_PAGES = 16


def _weights(backbone, seed: int, rank: int) -> AdapterWeights:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, 384, generator=gen)
    b = torch.randn(384, rank, generator=gen)
    head = Head(pooling="mean", weight=torch.randn(2, 384, generator=gen), bias=torch.zeros(2))
    return AdapterWeights(
        modules={MODULE: LoraModule(a=a, b=b, scale=1.0)}, head=head, labels=("x", "y"), rank=rank
    )


def _check(memory: AdapterMemory, backbone, held: dict[str, int], weights: dict) -> None:
    index = backbone.linears[MODULE].index
    resident = [memory.get(k) for k in weights if memory.is_resident(k)]
    used = [p for r in resident for p in r.pages]
    assert len(used) == len(set(used)), "two adapters share a page"
    assert 0 not in used, "page 0 is reserved"
    assert len(used) + memory.num_free_pages == NUM_PAGES
    assert memory.resident_bytes == sum(r.num_bytes for r in resident)  # a count, kept in step
    for key, count in held.items():
        if count:
            assert memory.is_resident(key), f"{key} evicted while in use"
            assert memory.get(key).refcount == count
    pools = memory.pools[index]
    if pools is not None:
        assert not pools[0][0].any() and not pools[1][0].any(), "zero page was written"
        for r in resident:
            rows = torch.tensor(r.pages, dtype=torch.long)
            torch.testing.assert_close(pools[0][rows], weights[r.key].modules[MODULE].a)
            torch.testing.assert_close(pools[1][rows], weights[r.key].modules[MODULE].b.t())


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["acquire", "release", "forget"]), st.integers(0, 9)),
        max_size=60,
    )
)
def test_pool_invariants_under_random_acquire_release(backbone, ops) -> None:
    memory = AdapterMemory(backbone, NUM_PAGES, "cpu", torch.float32)
    weights = {f"a{i}": _weights(backbone, i, rank=1 + i % 6) for i in range(10)}
    held = {k: 0 for k in weights}
    forgotten: set[str] = set()  # forgotten since last paged in
    for op, i in ops:
        key = f"a{i}"
        if op == "acquire":
            admitted = not memory.is_resident(key)
            try:
                memory.acquire(key, lambda k=key: weights[k])
                held[key] += 1
                if admitted:
                    forgotten.discard(key)
            except EngineOverloaded:
                in_use = sum(len(memory.get(k).pages) for k, c in held.items() if c)
                assert in_use + weights[key].rank > NUM_PAGES  # refused only when truly full
        elif op == "forget":
            memory.forget([key])
            forgotten.add(key)
        elif held[key]:
            memory.release(key)
            held[key] -= 1
        _check(memory, backbone, held, weights)
        for key in forgotten:  # a deleted version stays only while a step holds it
            assert memory.is_resident(key) == bool(held[key]), key


def test_a_forgotten_adapter_leaves_zeroed_pages_now_or_at_its_last_release(backbone) -> None:
    memory = AdapterMemory(backbone, 8, "cpu", torch.float32)
    weights = {k: _weights(backbone, i, rank=4) for i, k in enumerate("ab")}
    for key in "ab":
        memory.acquire(key, lambda k=key: weights[k])
    memory.release("a")
    pages = {k: torch.tensor(memory.get(k).pages) for k in "ab"}
    slab = memory.pools[backbone.linears[MODULE].index][0]
    assert slab[pages["a"]].any() and slab[pages["b"]].any()
    memory.forget(["a", "b", "never-here"])
    assert not memory.is_resident("a") and not slab[pages["a"]].any()  # idle: gone at once
    assert memory.is_resident("b") and slab[pages["b"]].any()  # a step holds it
    memory.release("b")
    assert not memory.is_resident("b") and not slab[pages["b"]].any()
    assert memory.num_free_pages == 8 and memory.resident_bytes == 0
    assert memory.num_evictions == 0  # deletions, not LRU evictions


def test_host_cache_forgets_now_or_at_the_last_unpin(backbone) -> None:
    cache = HostCache(max_bytes=1 << 30)
    for key in "ab":
        cache.put_pinned(key, _weights(backbone, 0, rank=4))
    cache.unpin("a")
    cache.pin("b")  # two requests hold b
    cache.forget("a")
    cache.forget("b")
    cache.forget("never-here")
    assert "a" not in cache and "b" in cache and cache.is_forgotten("b")
    cache.unpin("b")
    assert "b" in cache
    cache.unpin("b")
    assert "b" not in cache and not cache.is_forgotten("b") and cache.num_bytes == 0
    assert cache.num_evictions == 0


def test_lru_evicts_the_least_recently_used_idle_adapter(backbone) -> None:
    memory = AdapterMemory(backbone, 8, "cpu", torch.float32)
    weights = {k: _weights(backbone, i, rank=4) for i, k in enumerate("abc")}
    for key in "ab":
        memory.acquire(key, lambda k=key: weights[k])
        memory.release(key)
    memory.acquire("a", lambda: weights["a"])  # a is now the most recent, and held
    memory.acquire("c", lambda: weights["c"])  # needs 4 pages: b (idle, oldest) goes
    assert memory.is_resident("a") and memory.is_resident("c") and not memory.is_resident("b")
    with pytest.raises(EngineOverloaded, match="in use"):
        memory.acquire("b", lambda: weights["b"])
    with pytest.raises(RuntimeError, match="without a matching acquire"):
        memory.release("b")


def test_head_only_models_are_evicted_past_the_heads_budget(backbone) -> None:
    """They take no pages, so nothing ever evicted them: 60 head-only models served once
    each stayed on the device, three times the pool's bytes."""
    memory = AdapterMemory(backbone, 8, "cpu", torch.float32)
    assert memory.max_head_bytes == 64 << 20 > memory.pool_bytes  # a small pool's floor
    head_bytes = (2 * 384 + 2) * 4
    memory.max_head_bytes = 3 * head_bytes
    heads = {k: _weights(backbone, i, rank=4) for i, k in enumerate("abcde")}
    head_only = {k: AdapterWeights({}, w.head, w.labels, rank=0) for k, w in heads.items()}
    for key in "abcd":
        memory.acquire(key, lambda k=key: head_only[k])
        memory.release(key)
    assert memory.num_resident == 3 and not memory.is_resident("a")
    assert memory.num_evictions == 1 and memory.resident_bytes == 3 * head_bytes
    for key in "bcd":
        memory.acquire(key, lambda k=key: head_only[k])  # each held by a step
    # the budget is soft: a step the planner formed (it counts pages) is never failed by it
    memory.acquire("e", lambda: head_only["e"])
    assert memory.num_resident == 4 and memory.resident_bytes == 4 * head_bytes
    for key in "bcde":
        memory.release(key)
    memory.acquire("a", lambda: head_only["a"])  # idle ones make room again
    assert memory.num_resident == 3 and memory.is_resident("a")


def test_an_adapter_larger_than_the_pool_is_refused(backbone) -> None:
    memory = AdapterMemory(backbone, 4, "cpu", torch.float32)
    with pytest.raises(EngineOverloaded, match="holds 4"):
        memory.acquire("big", lambda: _weights(backbone, 0, rank=8))


def test_host_cache_lru_budget_and_pins(backbone) -> None:
    one = _weights(backbone, 0, rank=4)
    size = one.num_bytes
    cache = HostCache(max_bytes=2 * size)
    for key in "abc":
        cache.put_pinned(key, _weights(backbone, 0, rank=4))
    assert len(cache) == 3  # pinned entries may overshoot the budget
    cache.unpin("a")
    assert "a" not in cache and cache.num_evictions == 1
    cache.unpin("b")
    cache.unpin("c")
    assert cache.num_bytes <= 2 * size
    assert cache.lookup("c") and not cache.lookup("a")
    assert (cache.num_hits, cache.num_misses) == (1, 1)
    with pytest.raises(RuntimeError):
        cache.unpin("c")
    # the warm path of a pin: a hit and a pin at once; a key not here counts no miss
    assert cache.pin_if_present("c") and cache.pins("c") == 1
    assert not cache.pin_if_present("a") and cache.pins("a") == 0
    assert (cache.num_hits, cache.num_misses) == (2, 1)
    cache.unpin("c")


@settings(max_examples=80, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 12)), max_size=80))
def test_free_pages_hand_out_each_page_once_and_prefer_runs(ops) -> None:
    free = FreePages(1, 40)
    taken: list[tuple[int, ...]] = []
    for is_take, n in ops:
        if is_take and n <= free.count:
            longest = max((len(r) for r in _runs_of(free)), default=0)
            pages = free.take(n)
            assert len(pages) == n
            if n <= longest:  # a run that fits existed: the pages must be one run
                assert pages == tuple(range(pages[0], pages[0] + n)) if n else pages == ()
            taken.append(pages)
        elif taken:
            free.give(taken.pop(n % len(taken)))
        held = [p for pages in taken for p in pages]
        assert len(held) == len(set(held)), "a page was handed out twice"
        assert free.count + len(held) == 40
        free_pages = {p for r in _runs_of(free) for p in r}
        assert free_pages.isdisjoint(held) and len(free_pages) == free.count
        assert free_pages | set(held) == set(range(1, 41))


def _runs_of(free: FreePages) -> list[range]:
    """The free runs, checked to be maximal (no two touch)."""
    runs = [range(s, s + free._runs[s]) for s in sorted(free._runs)]
    for left, right in zip(runs, runs[1:], strict=False):
        assert left.stop < right.start, "two free runs touch: they should have merged"
    return runs


def _dense(backbone, seed: int, rank: int) -> AdapterWeights:
    """LoRA on every wrapped Linear, as ``graft train`` makes adapters."""
    gen = torch.Generator().manual_seed(seed)
    modules = {
        name: LoraModule(
            a=torch.randn(rank, w.in_features, generator=gen),
            b=torch.randn(w.out_features, rank, generator=gen),
            scale=0.5,
        )
        for name, w in backbone.linears.items()
    }
    head = Head(pooling="mean", weight=torch.randn(2, 384, generator=gen), bias=torch.zeros(2))
    return AdapterWeights(modules=modules, head=head, labels=("x", "y"), rank=rank)


def _same_views(got: AdapterWeights, weights: AdapterWeights) -> None:
    for name, module in weights.modules.items():
        assert torch.equal(got.modules[name].a, module.a.to(got.modules[name].a.dtype))
        assert torch.equal(got.modules[name].b, module.b.to(got.modules[name].b.dtype))
        assert got.modules[name].b.t().is_contiguous() or got.rows is not None
    torch.testing.assert_close(got.head.weight, weights.head.weight, rtol=0, atol=0)
    storage = got.head.weight.untyped_storage().data_ptr()
    for module in got.modules.values():  # views of one buffer: one page-locked allocation
        assert module.a.untyped_storage().data_ptr() == storage


def test_a_dense_adapter_packs_as_pool_rows_and_pages_in_whole(backbone) -> None:
    memory = AdapterMemory(backbone, NUM_PAGES, "cpu", torch.float32)
    weights = _dense(backbone, seed=3, rank=8)
    got = memory.pack(weights)  # pin=True is the same layout, page-locked (CUDA only)
    assert got.rows is not None and got.rows.shape == (8, memory.width)
    _same_views(got, weights)
    resident = memory.acquire("d", lambda: got)
    pages = torch.tensor(resident.pages, dtype=torch.long)
    for name, module in weights.modules.items():
        a_pool, b_pool = memory.pools[backbone.linears[name].index]
        assert a_pool.stride(0) == memory.width  # per-module column views of one slab
        torch.testing.assert_close(a_pool[pages], module.a, rtol=0, atol=0)
        torch.testing.assert_close(b_pool[pages], module.b.t(), rtol=0, atol=0)


@pytest.mark.parametrize("dense", [True, False], ids=["rows", "compact"])
def test_a_packed_adapter_is_a_few_objects_for_the_cycle_collector(backbone, dense) -> None:
    """The host tier holds thousands of packed adapters, and a full collection walks every
    tracked object with all threads stopped: packing keeps no Python object per module."""
    memory = AdapterMemory(backbone, NUM_PAGES, "cpu", torch.float32)
    make = _dense if dense else _weights
    weights = [make(backbone, seed=i, rank=8) for i in range(10)]
    gc.collect()
    before = len(gc.get_objects())
    packed = [memory.pack(w) for w in weights]
    gc.collect()
    assert (len(gc.get_objects()) - before) / len(packed) < 12  # 3 per module before: 108+
    for got, original in zip(packed, weights, strict=True):
        assert (got.rows is not None) == dense
        _same_views(got, original)
        assert list(ranks_and_scales(got.modules)) == list(ranks_and_scales(original.modules))
        assert [m.scale for m in got.modules.values()] == [
            m.scale for m in original.modules.values()
        ]


def test_packed_module_views_count_from_the_buffer_not_its_storage() -> None:
    storage = torch.arange(40.0)
    buffer = storage[10:30]  # a view that starts 10 elements into its storage
    # A: 2 x 3 at offset 0 (row stride 3); B^T: 2 x 4 at offset 6 (row stride 4)
    modules = PackedModules(buffer, {"m": (2, 0.5, 0, 3, 3, 6, 4, 4)})
    module = modules["m"]
    assert torch.equal(module.a, buffer[0:6].view(2, 3))
    assert torch.equal(module.b, buffer[6:14].view(2, 4).t())
    assert module.scale == 0.5 and list(modules) == ["m"] and len(modules) == 1
    assert list(modules.ranks_and_scales()) == [("m", 2, 0.5)]
    assert modules.get("other") is None


def test_a_sparse_adapter_stays_compact_on_the_host(backbone) -> None:
    memory = AdapterMemory(backbone, NUM_PAGES, "cpu", torch.float32)
    weights = _weights(backbone, seed=3, rank=8)  # one module: whole rows would be 55x its bytes
    got = memory.pack(weights)
    assert got.rows is None and got.num_bytes == weights.num_bytes
    _same_views(got, weights)
    memory.acquire("p", lambda: got)
    _check(memory, backbone, {"p": 1}, {"p": weights})


def test_a_page_in_clears_what_an_evicted_adapter_left(backbone) -> None:
    other = "encoder.layer.1.attention.self.value"
    memory = AdapterMemory(backbone, 8, "cpu", torch.float32)
    wide = _weights(backbone, seed=1, rank=8)
    gen = torch.Generator().manual_seed(9)
    wide = AdapterWeights(
        modules={
            **wide.modules,
            other: LoraModule(
                a=torch.randn(8, 384, generator=gen), b=torch.randn(384, 8, generator=gen), scale=1
            ),
        },
        head=wide.head,
        labels=wide.labels,
        rank=8,
    )
    memory.acquire("wide", lambda: wide)
    memory.release("wide")
    narrow = _weights(backbone, seed=2, rank=4)  # evicts "wide", reuses its pages (compact)
    memory.acquire("narrow", lambda: narrow)
    assert not memory.is_resident("wide")
    pages = torch.tensor(memory.get("narrow").pages, dtype=torch.long)
    a_other, b_other = memory.pools[backbone.linears[other].index]
    assert not a_other[pages].any() and not b_other[pages].any()
    a_pool, b_pool = memory.pools[backbone.linears[MODULE].index]
    torch.testing.assert_close(a_pool[pages], narrow.modules[MODULE].a, rtol=0, atol=0)
    torch.testing.assert_close(b_pool[pages], narrow.modules[MODULE].b.t(), rtol=0, atol=0)


@pytest.mark.parametrize("packed", [True, False])
def test_scattered_pages_hold_exactly_the_adapter(backbone, packed: bool) -> None:
    memory = AdapterMemory(backbone, NUM_PAGES, "cpu", torch.float32)
    for i, key in enumerate("abcd"):  # fill the pool: four rank-4 adapters, pages 1..16
        memory.acquire(key, lambda i=i: memory.pack(_dense(backbone, seed=i, rank=4)))
    memory.release("a")
    memory.release("c")
    weights = _dense(backbone, seed=7, rank=8)
    resident = memory.acquire("e", lambda: memory.pack(weights) if packed else weights)
    assert resident.pages == (1, 2, 3, 4, 9, 10, 11, 12)  # a's and c's pages: two runs
    pages = torch.tensor(resident.pages, dtype=torch.long)
    for name, module in weights.modules.items():
        a_pool, b_pool = memory.pools[backbone.linears[name].index]
        torch.testing.assert_close(a_pool[pages], module.a, rtol=0, atol=0)
        torch.testing.assert_close(b_pool[pages], module.b.t(), rtol=0, atol=0)
    assert not memory.pools[0][0][0].any()  # the zero page stays zero


@pytest.mark.parametrize("stored", [torch.float32, torch.float16])
@pytest.mark.parametrize("lower_rank", [False, True])
def test_whole_rows_hold_each_module_and_zeros_elsewhere(
    backbone, lower_rank: bool, stored: torch.dtype, monkeypatch
) -> None:
    """Whole rows are cut in one concatenation when every module has the adapter's rank (a
    skipped module gets zeros), and copied module by module when one has a lower rank; either
    way weights stored in float16 (training's default) land in the pool's float32 exactly.
    The buffer starts as NaN here: fresh memory is often zero, and would hide a gap."""
    real_empty = torch.empty

    def dirty_empty(*size, **kwargs) -> torch.Tensor:
        return real_empty(*size, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", dirty_empty)
    memory = AdapterMemory(backbone, NUM_PAGES, "cpu", torch.float32)
    weights = _dense(backbone, seed=5, rank=8)
    low, skipped = "encoder.layer.2.output.dense", "encoder.layer.3.attention.self.key"
    modules = {
        n: LoraModule(a=m.a.to(stored), b=m.b.to(stored), scale=m.scale)
        for n, m in weights.modules.items()
        if n != skipped
    }
    if lower_rank:
        modules[low] = LoraModule(a=modules[low].a[:4], b=modules[low].b[:, :4], scale=0.5)
    weights = AdapterWeights(modules=modules, head=weights.head, labels=weights.labels, rank=8)
    got = memory.pack(weights, whole_rows=True)
    assert got.rows is not None
    _same_views(got, weights)
    for name, (a0, n_in, b0, n_out) in zip(backbone.linear_names, memory._columns, strict=True):
        module = weights.modules.get(name)
        r = 0 if module is None else module.a.shape[0]
        if module is not None:
            assert torch.equal(got.rows[:r, a0 : a0 + n_in], module.a.float())
            assert torch.equal(got.rows[:r, b0 : b0 + n_out], module.b.t().float())
        assert not got.rows[r:, a0 : a0 + n_in + n_out].any()


class _TorchCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen[getattr(func, "__name__", str(func))] += 1
        return func(*args, **(kwargs or {}))


def test_packing_a_compact_adapter_copies_its_factors_without_torch(backbone) -> None:
    """Each torch copy or view gives up the interpreter lock, and a loader thread beside a
    busy event loop then waits up to a switch interval to take it back: a query/value
    adapter's pack made 50 such calls. Its factors are copied in numpy now; the head's two
    tensors still go through torch."""
    memory = AdapterMemory(backbone, NUM_PAGES, "cpu", torch.float32)
    weights = _weights(backbone, seed=3, rank=8)
    half = AdapterWeights(
        modules={
            n: LoraModule(m.a.half(), m.b.half(), m.scale) for n, m in weights.modules.items()
        },
        head=weights.head,
        labels=weights.labels,
        rank=8,
    )
    with _TorchCalls() as calls:
        got = memory.pack(half)
    assert got.rows is None  # compact
    assert calls.seen["copy_"] == 2 and calls.seen["as_strided"] == 0, calls.seen
    _same_views(got, half)


def test_a_bfloat16_pool_packs_through_torch(backbone) -> None:
    """numpy has no bfloat16: such a pool's factors are copied by torch, to the same place."""
    memory = AdapterMemory(backbone, NUM_PAGES, "cpu", torch.bfloat16)
    weights = _weights(backbone, seed=4, rank=8)
    got = memory.pack(weights)
    module = got.modules[MODULE]
    assert module.a.dtype == torch.bfloat16
    assert torch.equal(module.a, weights.modules[MODULE].a.bfloat16())
    assert torch.equal(module.b, weights.modules[MODULE].b.bfloat16())


def test_a_factor_past_float16s_range_packs_as_inf_without_a_warning(backbone) -> None:
    """numpy's cast warned (or raised, under np.seterr) where torch's copy gives inf."""
    memory = AdapterMemory(backbone, NUM_PAGES, "cpu", torch.float16)
    weights = _weights(backbone, seed=5, rank=8)
    module = weights.modules[MODULE]
    huge = LoraModule(a=torch.full_like(module.a, 1e5), b=module.b, scale=module.scale)
    weights = AdapterWeights({MODULE: huge}, weights.head, weights.labels, rank=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = memory.pack(weights)
    assert torch.isinf(got.modules[MODULE].a).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_page_bytes_from_the_structure_alone_match_the_pool_row(backbone, dtype) -> None:
    pool = AdapterMemory(backbone, 2, "cpu", dtype)
    assert pool.pool_bytes == 3 * page_bytes(backbone.path, dtype)  # 2 pages and the zero page


async def test_a_pool_sized_in_bytes_becomes_whole_pages_everywhere(backbone, registry) -> None:
    per_page = page_bytes(backbone.path, torch.float32)
    assert pages_for_bytes(10 * per_page + per_page - 1, backbone.path, torch.float32) == 10
    config = EngineConfig(registry_dir=registry.root, adapter_pool_bytes=10 * per_page)
    async with Engine(config) as engine:
        assert engine.config.adapter_pages == 10
        assert engine.stats()["adapter_pages_free"] == 10
    with pytest.raises(ValueError, match="holds no page: one page of this backbone is"):
        Engine(EngineConfig(registry_dir=registry.root, adapter_pool_bytes=per_page - 1))
    with pytest.raises(ValueError, match="adapter_pool_bytes must be >= 1"):
        EngineConfig(adapter_pool_bytes=0)
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        Engine(EngineConfig(backbone_dir=registry.root, adapter_pool_bytes=1 << 30))


def test_the_default_pool_is_1024_pages_on_the_cpu_and_a_tenth_of_a_cuda_device(
    backbone, monkeypatch
) -> None:
    """1,024 pages held 128 rank-8 adapters: on a GPU of 141 GB a fleet of 1,000 paged in on
    every pass. What is given explicitly still wins, bytes before pages."""
    per_page = page_bytes(backbone.path, torch.float32)
    asked = []

    def properties(device):
        asked.append(device)
        return types.SimpleNamespace(total_memory=1000 * per_page)

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = {"backbone_dir": backbone.path, "device": "cuda:1"}
    assert pool_pages(EngineConfig()) == 1024 and asked == []
    assert pool_pages(EngineConfig(**cuda)) == 100 and asked == [torch.device("cuda:1")]
    assert pool_pages(EngineConfig(**cuda, adapter_memory_fraction=0.25)) == 250
    assert pool_pages(EngineConfig(**cuda, adapter_pages=7)) == 7
    both = EngineConfig(**cuda, adapter_pages=7, adapter_pool_bytes=3 * per_page)
    assert pool_pages(both) == 3 and len(asked) == 2
    for fraction in (0.0, 0.95, float("nan")):
        with pytest.raises(ValueError, match="adapter_memory_fraction must be"):
            EngineConfig(adapter_memory_fraction=fraction)
    with pytest.raises(ValueError, match="adapter_pages must be >= 1 or None"):
        EngineConfig(adapter_pages=0)


def test_float16_weights_admitted_unpacked_count_the_pools_bytes(backbone) -> None:
    """The pool holds them as float32 in whole pages: its byte count must take neither the
    file's two bytes nor the adapter's compact size (a rank-8 adapter holds 8 pages)."""
    memory = AdapterMemory(backbone, NUM_PAGES, "cpu", torch.float32)
    weights = _weights(backbone, seed=4, rank=8)
    module = weights.modules[MODULE]
    half = AdapterWeights(
        modules={MODULE: LoraModule(a=module.a.half(), b=module.b.half(), scale=1.0)},
        head=weights.head,
        labels=weights.labels,
        rank=8,
    )
    resident = memory.acquire("half", lambda: half)
    head_bytes = sum(t.numel() for t in weights.head.tensors()) * 4
    assert resident.num_bytes == 8 * memory.width * 4 + head_bytes == memory.resident_bytes
    assert half.num_bytes < weights.num_bytes < resident.num_bytes


def test_a_steps_hold_pins_what_is_here_and_lets_go_of_a_forgotten_entry(backbone) -> None:
    cache = HostCache(max_bytes=1 << 30)
    cache.put_pinned("a", _weights(backbone, 0, rank=4))  # a request's pin
    assert cache.pin_present(["a", "gone"]) == ("a",)  # the step's
    cache.forget("a")
    cache.unpin("a")  # the request was cancelled: the step still holds it
    assert "a" in cache and cache.pins("a") == 1
    cache.unpin_all(["a"])
    assert "a" not in cache and cache.num_bytes == 0
