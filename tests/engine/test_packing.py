"""Unpadded (packed) steps answer exactly what padded steps answer."""

import dataclasses
from pathlib import Path

import pytest
import torch

from engine import load_backbone, packing
from engine.adapter_store import AdapterStore
from engine.host_cache import HostCache
from engine.lora_kernels import kernel_for
from engine.memory import AdapterMemory
from engine.packing import pack, packing_works, worth_packing
from engine.runner import BACKBONE_KEY, ModelRunner
from scheduler import Batch
from tests.engine.mixed_fleet import assert_rows_close

TEXTS = [
    "ok",
    "are we still on for lunch tomorrow at the usual place?",
    "WIN a brand new car, text CLAIM to 80086 now! Offer ends soon, T&C apply, reply STOP",
    "lol see u there",
    "The committee approved the budget after a long debate about the new hospital wing.",
]
# (rank, targets, pooling): mixed ranks, both poolings, LoRA on the pooler too
ADAPTERS = [
    (8, ("query", "value"), "mean"),
    (4, ("query", "key", "value", "dense"), "cls_pooler"),
    (16, ("intermediate.dense", "output.dense"), "mean"),
]


@pytest.fixture
def runners(backbone, tmp_path: Path, publish_random):
    from registry import Registry

    registry = Registry(tmp_path / "reg")
    registry.create_tenant("t")
    memory = AdapterMemory(backbone, num_pages=128, device="cpu", dtype=torch.float32)
    store = AdapterStore(
        registry, backbone, memory, HostCache(0), max_loads_in_flight=1, pin_host_memory=False
    )
    keys = []
    for i, (rank, targets, pooling) in enumerate(ADAPTERS):
        record = publish_random(
            registry, "t", f"m{i}", seed=i, rank=rank, pooling=pooling, targets=targets
        )
        key = f"{record.full_name}@{record.version}"
        memory.acquire(key, lambda r=record: store.read(r))
        keys.append(key)
    kernel = kernel_for("auto", "cpu")
    padded = ModelRunner(backbone, memory, "cpu", kernel)
    packed = ModelRunner(backbone, memory, "cpu", kernel, pack_max_tokens=4096)
    yield padded, packed, keys + [BACKBONE_KEY]
    registry.close()


def _batch(backbone, keys: list[str]) -> tuple[Batch, list[list[int]]]:
    """Every text under every key, segments in key order."""
    ids = backbone.tokenizer(TEXTS)["input_ids"]
    token_ids = [text_ids for _ in keys for text_ids in ids]
    row_keys = [key for key in keys for _ in ids]
    return Batch.of(row_keys, [len(r) for r in token_ids]), token_ids


def test_a_packed_step_equals_the_padded_step(backbone, runners) -> None:
    padded, packed, keys = runners
    assert packed.pack_max_tokens == 4096  # MiniLM passes the load-time check
    batch, token_ids = _batch(backbone, keys)
    expected = padded.step(batch, token_ids)
    got = packed.step(batch, token_ids)
    assert packed.num_packed_steps == 1 and padded.num_packed_steps == 0
    assert_rows_close(got, expected)


def test_the_models_own_forward_packs_only_what_one_masked_call_can_take(backbone, runners):
    """Its attention scores grow with the square of the packed length; the lean forward's
    rows attend apart, so it packs up to the configured limit."""
    padded, packed, _ = runners
    assert packed.lean and packed.pack_max_tokens == 4096
    memory, kernel = packed._memory, kernel_for("auto", "cpu")
    own = ModelRunner(backbone, memory, "cpu", kernel, pack_max_tokens=4096, lean_forward=False)
    assert own.pack_max_tokens == packing.MASKED_MAX_TOKENS
    small = ModelRunner(backbone, memory, "cpu", kernel, pack_max_tokens=64, lean_forward=False)
    assert small.pack_max_tokens == 64


def test_a_step_without_padding_to_save_is_not_packed(backbone, runners) -> None:
    _, packed, keys = runners
    ids = backbone.tokenizer(["same length here", "same length there"])["input_ids"]
    assert len(ids[0]) == len(ids[1])
    packed.step(Batch.of([keys[0]] * 2, [len(r) for r in ids]), ids)
    assert packed.num_packed_steps == 0


def test_worth_packing_wants_a_small_step_with_padding_to_save() -> None:
    short, long = [1] * 4, [1] * 40
    assert worth_packing([short, long], max_tokens=512)
    assert not worth_packing([long, long], max_tokens=512)  # nothing to save
    assert not worth_packing([short, long], max_tokens=40)  # too many tokens to pack
    assert not worth_packing([long], max_tokens=512)  # one row has no padding
    assert not worth_packing([short, long], max_tokens=0)  # off
    near = [[1] * 30, [1] * 32]  # 3% padding: not worth it, unless budgets count real tokens
    assert not worth_packing(near, max_tokens=512)
    assert worth_packing(near, max_tokens=512, any_padding=True)
    assert not worth_packing([long, long], max_tokens=512, any_padding=True)


def test_a_step_budgeted_in_real_tokens_runs_packed_whatever_its_padding() -> None:
    """Budgeted by real tokens, 512 + 18 x 426 tokens is one step of 8,180; padded it would
    compute 9,728, over the 8,192 the budget promises, so the runner must pack it."""
    from scheduler import Row, Scheduler, SchedulerConfig

    scheduler = Scheduler(SchedulerConfig(contended_batch_tokens=None))
    scheduler.set_packing(True, 8192)
    for i, tokens in enumerate([512] + [426] * 18):
        scheduler.add(Row(i, 0, "a", "a/m@1", tokens, 0.0))
    batch = scheduler.plan(0.0).batch
    token_ids = [[7] * row.num_tokens for row in batch.rows]
    assert len(batch.rows) == 19 and batch.padded_tokens > 8192
    assert not worth_packing(token_ids, 8192) and worth_packing(token_ids, 8192, any_padding=True)


def test_packed_inputs_restart_positions_and_mask_across_rows(backbone) -> None:
    inputs = pack([[5, 6, 7], [8, 9]], "cpu", torch.float32)
    assert inputs.token_starts == (0, 3, 5)
    assert inputs.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    mask = inputs.attention_mask[0, 0]
    assert mask[0, 2] == 0 and mask[3, 4] == 0  # within a row
    assert mask[0, 3] < -1e30 and mask[4, 1] < -1e30  # across rows
    assert packing_works(backbone, "cpu", torch.float32)


def test_only_a_long_packed_sequence_drops_its_mask_for_rows_attending_apart() -> None:
    short = [[5] * 10, [6] * 20]
    assert pack(short, "cpu", torch.float32, rows_apart=True).attention_mask is not None
    long = [[5] * 100, [6] * (packing._ROWS_APART_MIN_TOKENS - 100)]
    assert pack(long, "cpu", torch.float32).attention_mask is not None  # the model's forward
    inputs = pack(long, "cpu", torch.float32, rows_apart=True)
    assert inputs.attention_mask is None and inputs.token_starts[1] == 100


@pytest.mark.parametrize(("dtype", "quantize"), [(torch.bfloat16, "none"), (torch.float32, "int8")])
def test_packing_check_accepts_low_precision_rounding_but_not_a_leak(
    dtype: torch.dtype, quantize: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 and int8 rows differ padded against packed by rounding (~0.02), which must not
    switch packing off; attention leaking across rows (~1) still must."""
    low = load_backbone(dtype=dtype, quantize=quantize)
    assert packing_works(low, "cpu", dtype)
    real_pack = packing.pack

    def leaky_pack(*args, **kwargs):
        inputs = real_pack(*args, **kwargs)
        return dataclasses.replace(inputs, attention_mask=torch.zeros_like(inputs.attention_mask))

    monkeypatch.setattr(packing, "pack", leaky_pack)
    assert not packing_works(low, "cpu", dtype)


@pytest.mark.parametrize(
    ("settings", "packed"),
    [({}, True), ({"lean_forward": False}, False), ({"pack_max_tokens": 4096}, False)],
)
async def test_steps_are_budgeted_in_real_tokens_only_where_every_step_can_run_packed(
    tmp_path: Path, settings: dict, packed: bool
) -> None:
    """A model's own forward packs at most 512 tokens, and a smaller pack limit than the step
    budget leaves big steps padded: their rows must keep the length ratio and padded budget."""
    from engine import Engine, EngineConfig

    config = EngineConfig(registry_dir=tmp_path / "reg", lookahead_rows=64, **settings)
    async with Engine(config) as engine:
        scheduling = engine._scheduler._config
        assert scheduling.packed_steps is packed
        assert engine._loaded.runner.budgets_real_tokens is packed  # it packs what has padding
        # a looked-ahead row keeps the step within what the runner packs
        assert scheduling.lookahead_max_tokens == engine._loaded.runner.pack_max_tokens
