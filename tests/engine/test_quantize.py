"""The int8 rootstock (engine/quantize.py): close to float32, and each row's answer its own."""

import pytest
import torch
from torch import nn

from engine import load_backbone
from engine.lora import LoraLinear
from engine.quantize import Int8Linear, quantize_linears_int8


@pytest.mark.parametrize(
    ("in_features", "out_features", "rows", "bias"),
    [(384, 384, 1, True), (384, 1536, 16, True), (1536, 384, 7, True), (100, 7, 3, False)],
)
def test_int8_linear_is_within_two_percent_of_float32(
    in_features: int, out_features: int, rows: int, bias: bool
) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    x = torch.randn(2, rows, in_features)
    with torch.inference_mode():
        expected, got = linear(x), Int8Linear(linear)(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    error = (got - expected).norm() / expected.norm()
    assert error < 0.02, error


def test_a_rows_answer_does_not_depend_on_its_neighbours() -> None:
    """Scales are per row: a tenant's row batched with another tenant's outlier row gets the
    same bits as alone (per-tensor activation scales would coarsen it)."""
    torch.manual_seed(1)
    layer = Int8Linear(nn.Linear(384, 384))
    row = torch.randn(1, 384)
    outlier = torch.randn(1, 384) * 1000
    with torch.inference_mode():
        alone = layer(row)
        batched = layer(torch.cat([outlier, row, outlier]))[1:2]
    assert torch.equal(alone, batched)


def test_int8_backbone_keeps_the_wrappers_and_stays_close_to_float32() -> None:
    reference = load_backbone()
    quantized = load_backbone(quantize="int8")
    assert all(isinstance(w, LoraLinear) for w in quantized.linears.values())
    assert all(isinstance(w.base, Int8Linear) for w in quantized.linears.values())
    assert not any(type(m) is nn.Linear for m in quantized.model.modules())
    texts = ["ok lor", "WIN a brand new car, text CLAIM to 80086 now!", "see you at lunch?"]
    for text in texts:
        tokens = reference.tokenizer([text], return_tensors="pt")
        with torch.inference_mode():
            a = reference.model(**tokens).last_hidden_state.mean(1)
            b = quantized.model(**tokens).last_hidden_state.mean(1)
        assert torch.nn.functional.cosine_similarity(a, b).item() > 0.98, text


def test_quantize_linears_counts_what_it_replaced() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 8)))
    assert quantize_linears_int8(model) == 2
    assert isinstance(model[0], Int8Linear) and isinstance(model[2][0], Int8Linear)
    assert model(torch.randn(3, 8)).shape == (3, 8)


def test_siblings_reading_one_tensor_quantise_it_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attention's query, key and value read the same hidden states: quantised once, reused,
    and the answers are those of unshared layers; another tensor is quantised afresh."""
    from engine import quantize

    torch.manual_seed(2)
    owner = nn.Module()
    owner.query, owner.key, owner.value = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 4)
    owner.out = nn.Linear(8, 16)  # another width: its own group (none, being alone)
    model = nn.Sequential(owner)
    expected = {n: Int8Linear(getattr(owner, n)) for n in ("query", "key", "value")}
    quantize_linears_int8(model)
    assert owner.query.shared is owner.key.shared is owner.value.shared is not None
    assert owner.out.shared is None
    x, other = torch.randn(3, 16), torch.randn(3, 16)
    with torch.inference_mode():
        want = {n: layer(x) for n, layer in expected.items()}
        want_other = expected["key"](other)
        calls = []
        real = quantize.quantize_rows
        monkeypatch.setattr(quantize, "quantize_rows", lambda rows: calls.append(1) or real(rows))
        for name in ("query", "key", "value"):
            assert torch.equal(getattr(owner, name)(x), want[name])
        assert len(calls) == 1
        assert torch.equal(owner.key(other), want_other)
        assert len(calls) == 2


def test_siblings_under_lora_still_quantise_their_input_once(
    backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a LoRA plan active the wrappers hand their base layers 2-D rows: query, key and
    value must get the same rows object, or each would quantise the hidden states anew."""
    from engine import quantize
    from engine.lora import LoraStepPlan, SegmentLists
    from engine.lora_kernels import SegmentLoop

    quantized = load_backbone(quantize="int8")
    modules = quantized.linear_names
    plan = LoraStepPlan(
        num_rows=1,
        seg_row_starts=torch.tensor([0, 1], dtype=torch.int32),
        seg_pages=torch.zeros((1, 1), dtype=torch.int32),
        seg_rank=torch.zeros((len(modules), 1), dtype=torch.int32),
        seg_scale=torch.zeros((len(modules), 1)),
        module_active=tuple(True for _ in modules),  # every wrapper takes the LoRA path
        pools=tuple((torch.zeros(1, 1), torch.zeros(1, 1)) for _ in modules),
        kernel=SegmentLoop(),
        lists=SegmentLists((0, 1), [range(0, 0)], [[0]] * len(modules), [[0.0]] * len(modules)),
    )
    tokens = quantized.tokenizer(["see you at lunch?"], return_tensors="pt")
    calls = []
    real = quantize.quantize_rows
    monkeypatch.setattr(quantize, "quantize_rows", lambda rows: calls.append(1) or real(rows))
    with torch.inference_mode():
        plain = quantized.model(**tokens).last_hidden_state
        without_plan = len(calls)
        quantized.lora_state.plan = plan
        try:
            with_plan = quantized.model(**tokens).last_hidden_state
        finally:
            quantized.lora_state.plan = None
    assert len(calls) - without_plan == without_plan  # as many quantisations either way
    torch.testing.assert_close(with_plan, plain)  # rank-0 segments add nothing
