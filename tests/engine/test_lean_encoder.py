"""The lean forward (engine/lean_encoder.py) serves what the model's own forward serves, pauses
where the model's block hooks pause, and is refused for layouts or results it does not match."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, MPNetConfig

from engine import lean_encoder as lean_module
from engine import load_backbone, packaged_backbone_dir, packing
from engine import runner as runner_module
from engine.lean_encoder import lean_encoder
from engine.lora_kernels import kernel_for
from engine.memory import AdapterMemory
from engine.runner import BACKBONE_KEY, ModelRunner
from scheduler import Batch
from tests.engine.mixed_fleet import assert_rows_close, resident_pool
from tests.engine.test_architectures import CONFIGS, _random_encoder

TEXTS = [
    "ok",
    "are we still on for lunch tomorrow at the usual place?",
    "WIN a brand new car, text CLAIM to 80086 now! Offer ends soon, T&C apply, reply STOP",
    "lol see u there",
]
# (rank, targets, pooling) per layout: LoRA on every kind of Linear, the pooler included
ADAPTERS = {
    "minilm": [
        (8, ("query", "value"), "mean"),
        (4, ("query", "key", "value", "dense"), "cls_pooler"),
        (16, ("intermediate.dense", "output.dense"), "mean"),
    ],
    "distilbert": [
        (8, ("q_lin", "v_lin"), "mean"),
        (4, ("q_lin", "k_lin", "v_lin", "out_lin"), "mean"),
        (16, ("lin1", "lin2"), "mean"),
    ],
}
# how far a packed step whose rows attend apart may be from the padded step, in probability:
# float32 sums in another order; bf16 and int8 round each row's activations their own way
ROWS_APART_ATOL = {"float32": 1e-5, "int8": 1e-3, "bfloat16": 5e-2}


def _fleet(backbone, adapters, tmp_path: Path, write_random_adapter, dtype=torch.float32):
    from registry import Registry

    registry = Registry(tmp_path / "reg")
    registry.create_tenant("t")
    records = []
    for i, (rank, targets, pooling) in enumerate(adapters):
        out = tmp_path / f"adapter-{i}"
        write_random_adapter(backbone, out, seed=i, rank=rank, num_labels=2, targets=targets)
        manifest = {"labels": ["neg", "pos"], "base_sha256": backbone.sha256, "rank": rank}
        records.append(registry.publish("t", f"m{i}", out, {**manifest, "pooling": pooling}))
    memory, keys = resident_pool(backbone, registry, records, dtype=dtype)
    return registry, memory, keys + [BACKBONE_KEY]


def _batch(backbone, keys: list[str]) -> tuple[Batch, list[list[int]]]:
    ids = backbone.tokenizer(TEXTS)["input_ids"]
    token_ids = [row for _ in keys for row in ids]
    return Batch.of([k for k in keys for _ in ids], [len(r) for r in token_ids]), token_ids


def _assert_same_rows(got: list, expected: list) -> None:
    """Bit for bit: the lean forward runs the same ops on the same weights."""
    assert len(got) == len(expected)
    for have, want in zip(got, expected, strict=True):
        if isinstance(want, np.ndarray):
            np.testing.assert_array_equal(have, want)
        else:
            for pooling, vector in want.vectors.items():
                np.testing.assert_array_equal(have.vectors[pooling], vector)


@pytest.fixture(scope="module")
def distilbert_dir(tmp_path_factory) -> Path:
    return _random_encoder("distilbert", tmp_path_factory.mktemp("distilbert"))


@pytest.mark.parametrize("layout", sorted(ADAPTERS))
@pytest.mark.parametrize("precision", ["float32", "int8", "bfloat16"])
def test_steps_through_the_lean_forward_equal_the_models_own(
    layout, precision, distilbert_dir, tmp_path, write_random_adapter, monkeypatch
) -> None:
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    served = load_backbone(
        distilbert_dir if layout == "distilbert" else None,
        dtype=dtype,
        quantize="int8" if precision == "int8" else "none",
    )
    registry, memory, keys = _fleet(served, ADAPTERS[layout], tmp_path, write_random_adapter, dtype)
    kernel = kernel_for("auto", "cpu")
    batch, token_ids = _batch(served, keys)
    try:
        padded_own = ModelRunner(served, memory, "cpu", kernel, lean_forward=False)
        padded_rows = padded_own.step(batch, token_ids)
        # padded, then packed with the block-diagonal 4-D mask: bit for bit
        monkeypatch.setattr(packing, "_ROWS_APART_MIN_TOKENS", 10**9)
        for pack_max_tokens in (0, 4096):
            lean = ModelRunner(served, memory, "cpu", kernel, pack_max_tokens=pack_max_tokens)
            own = ModelRunner(
                served, memory, "cpu", kernel, pack_max_tokens=pack_max_tokens, lean_forward=False
            )
            assert lean.lean and not own.lean
            _assert_same_rows(lean.step(batch, token_ids), own.step(batch, token_ids))
            assert lean.num_packed_steps == own.num_packed_steps == (1 if pack_max_tokens else 0)
        # packed, rows attending apart: the same sums in another order, so to rounding
        monkeypatch.setattr(packing, "_ROWS_APART_MIN_TOKENS", 0)
        lean = ModelRunner(served, memory, "cpu", kernel, pack_max_tokens=4096)
        masks = _packed_masks(monkeypatch)
        assert_rows_close(lean.step(batch, token_ids), padded_rows, atol=ROWS_APART_ATOL[precision])
        assert masks == [None] and lean.num_packed_steps == 1
    finally:
        registry.close()


def _packed_masks(monkeypatch) -> list:
    """The attention masks of the steps the runner packs from now on."""
    masks = []

    def recording_pack(*args, **kwargs):
        inputs = packing.pack(*args, **kwargs)
        masks.append(inputs.attention_mask)
        return inputs

    monkeypatch.setattr(runner_module, "pack", recording_pack)
    return masks


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_other_encoders_of_either_layout_take_the_lean_forward(kind, tmp_path) -> None:
    served = load_backbone(_random_encoder(kind, tmp_path / kind))
    encoder = lean_encoder(served, torch.float32)
    # RoBERTa and ELECTRA (embeddings projected) are BERT's layout; DistilBERT its own
    assert encoder is not None
    ids = served.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        got = encoder(ids["input_ids"], ids["attention_mask"])
        want = served.model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    real = ids["attention_mask"].bool()
    torch.testing.assert_close(
        got.last_hidden_state[real], want.last_hidden_state[real], rtol=0, atol=1e-5
    )


def test_a_layout_it_does_not_know_keeps_the_models_forward(tmp_path) -> None:
    """MPNet: encoder.layer[i].attention.attn.q, with a relative position bias."""
    torch.manual_seed(0)
    config = MPNetConfig(
        vocab_size=30527,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
    )
    AutoModel.from_config(config).save_pretrained(tmp_path / "mpnet")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        if (packaged_backbone_dir() / name).is_file():
            shutil.copy(packaged_backbone_dir() / name, tmp_path / "mpnet" / name)
    served = load_backbone(tmp_path / "mpnet")
    assert served.num_pauses > 0  # the block hooks still pause it
    assert lean_encoder(served, torch.float32) is None
    memory = AdapterMemory(served, num_pages=16, device="cpu", dtype=torch.float32)
    assert not ModelRunner(served, memory, "cpu", kernel_for("auto", "cpu")).lean


def test_a_lean_forward_that_computes_otherwise_is_refused(backbone, monkeypatch) -> None:
    assert lean_encoder(backbone, torch.float32) is not None
    layer = lean_module.LeanEncoder._layer

    def off_by_a_little(self, *args):
        return layer(self, *args) + 1e-3  # past the 1e-4 a float32 check accepts

    monkeypatch.setattr(lean_module.LeanEncoder, "_layer", off_by_a_little)
    assert lean_encoder(backbone, torch.float32) is None


def test_a_lean_forward_whose_packed_rows_see_each_other_is_refused(backbone, monkeypatch) -> None:
    attend = lean_module._Attention.__call__

    def across_rows(self, h, mask, batch, length):
        leaky = mask is not None and not isinstance(mask, torch.Tensor)  # rows apart: none
        return attend(self, h, None if leaky else mask, batch, length)

    monkeypatch.setattr(lean_module._Attention, "__call__", across_rows)
    assert lean_encoder(backbone, torch.float32) is None


@pytest.mark.parametrize("layout", ["minilm", "distilbert"])
def test_it_pauses_where_the_block_hooks_do_and_a_nested_forward_may_run_there(
    layout, backbone, distilbert_dir
) -> None:
    served = load_backbone(distilbert_dir) if layout == "distilbert" else backbone
    encoder = lean_encoder(served, torch.float32)
    state = served.lora_state
    outer = served.tokenizer(TEXTS[1:3], padding=True, return_tensors="pt")
    inner = served.tokenizer(TEXTS[:1], return_tensors="pt")
    with torch.inference_mode():
        alone = encoder(outer["input_ids"], outer["attention_mask"]).last_hidden_state
        inner_alone = encoder(inner["input_ids"], inner["attention_mask"]).last_hidden_state
        pauses, nested = [], []

        def between_layers() -> None:
            pauses.append(len(pauses))
            if len(pauses) == 4:  # mid-forward, as an interlude runs a short step
                state.between_layers = None
                nested.append(encoder(inner["input_ids"], inner["attention_mask"]))
                state.between_layers = between_layers

        state.between_layers = between_layers
        try:
            paused = encoder(outer["input_ids"], outer["attention_mask"]).last_hidden_state
            hooked = []
            state.between_layers = lambda: hooked.append(len(hooked))
            served.model(input_ids=outer["input_ids"], attention_mask=outer["attention_mask"])
        finally:
            state.between_layers = None
    blocks_per_layer = 4 if layout == "distilbert" else 3  # DistilBERT's norms are blocks
    num_layers = len(
        served.model.transformer.layer if layout == "distilbert" else served.model.encoder.layer
    )
    assert len(pauses) == len(hooked) == served.num_pauses == blocks_per_layer * num_layers - 1
    torch.testing.assert_close(paused, alone, rtol=0, atol=0)
    torch.testing.assert_close(nested[0].last_hidden_state, inner_alone, rtol=0, atol=0)
