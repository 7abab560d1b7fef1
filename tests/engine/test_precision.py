"""Lower precision on the CPU answers what float32 answers, to its rounding.

bfloat16 (``EngineConfig.dtype``, ``graft serve --dtype``): the same labels where float32 is
not a near tie, scores within 5e-2. int8 backbone weights (``EngineConfig.quantize``, ``graft
serve --quantize``) round more (each Linear's input is quantised to 8 bits per call), so its
bounds are wider. The mixed fleet runs through shared steps, so the LoRA kernels, both poolings
and a head-only model all run at the lower precision."""

import pytest
import torch

from engine import Engine, EngineConfig
from engine.quantize import Int8Linear
from tests.engine.mixed_fleet import answers, assert_close


async def _fp32_answers(fleet_registry) -> list:
    async with Engine(EngineConfig(registry_dir=fleet_registry.root)) as fp32:
        return await answers(fp32, fleet_registry)


def _assert_same_labels(got: list, expected: list, min_margin: float) -> None:
    """Labels agree wherever float32's top two scores are ``min_margin`` apart or more."""
    for preds, refs in zip(got, expected, strict=True):
        for pred, ref in zip(preds, refs, strict=True):
            margin = sorted(ref.scores.values())[-1] - sorted(ref.scores.values())[-2]
            if margin > min_margin:
                assert pred.label == ref.label


async def test_cpu_bfloat16_engine_is_close_to_fp32(fleet_registry) -> None:
    expected = await _fp32_answers(fleet_registry)
    config = EngineConfig(registry_dir=fleet_registry.root, dtype="bfloat16")
    async with Engine(config) as bf16:
        got = await answers(bf16, fleet_registry)
        assert bf16.backbone.model.dtype == torch.bfloat16
    assert_close(got, expected, atol=5e-2)
    _assert_same_labels(got, expected, min_margin=0.1)


async def test_cpu_int8_engine_is_close_to_fp32(fleet_registry) -> None:
    expected = await _fp32_answers(fleet_registry)
    config = EngineConfig(registry_dir=fleet_registry.root, quantize="int8")
    async with Engine(config) as int8:
        got = await answers(int8, fleet_registry)
        bases = [linear.base for linear in int8.backbone.linears.values()]
        assert all(isinstance(b, Int8Linear) for b in bases)
    # the fleet's random heads (unit-normal weights over 384 features) magnify any change of
    # the pooled vector; the backbone's own closeness is pinned in tests/engine/test_quantize.py
    assert_close(got, expected, atol=0.35)
    _assert_same_labels(got, expected, min_margin=0.6)
    # int8 really ran: some score moved (a no-op quantisation would match to fp32 rounding)
    moved = max(
        abs(p.scores[k] - r.scores[k])
        for preds, refs in zip(got, expected, strict=True)
        for p, r in zip(preds, refs, strict=True)
        for k in r.scores
    )
    assert moved > 1e-4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quantize": "int4"}, "quantize must be one of"),
        ({"quantize": "int8", "dtype": "bfloat16"}, "float32 activations"),
        ({"quantize": "int8", "device": "cuda"}, "CPU only"),
    ],
)
def test_quantize_config_refuses_what_int8_cannot_run(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)
