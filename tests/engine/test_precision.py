"""bfloat16 on the CPU (``EngineConfig.dtype``, ``graft serve --dtype``) answers what float32
answers, to bf16's rounding: the same labels where float32 is not a near tie, scores within
5e-2. The mixed fleet runs through shared steps, so the LoRA kernels, both poolings and a
head-only model all run in bf16."""

import torch

from engine import Engine, EngineConfig
from tests.engine.mixed_fleet import answers, assert_close


async def test_cpu_bfloat16_engine_is_close_to_fp32(fleet_registry) -> None:
    async with Engine(EngineConfig(registry_dir=fleet_registry.root)) as fp32:
        expected = await answers(fp32, fleet_registry)
    config = EngineConfig(registry_dir=fleet_registry.root, dtype="bfloat16")
    async with Engine(config) as bf16:
        got = await answers(bf16, fleet_registry)
        assert bf16.backbone.model.dtype == torch.bfloat16
    assert_close(got, expected, atol=5e-2)
    for preds, refs in zip(got, expected, strict=True):
        for pred, ref in zip(preds, refs, strict=True):
            margin = sorted(ref.scores.values())[-1] - sorted(ref.scores.values())[-2]
            if margin > 0.1:
                assert pred.label == ref.label
