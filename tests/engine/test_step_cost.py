"""What a step costs the host in device-op calls: on a GPU, steps are bound by these calls
(benchmarks/RESULTS.md, the H200 profile), so their count per LoRA Linear is kept in check
here, where it is exact, rather than timed."""

from pathlib import Path

import pytest
import torch

from engine.lora_kernels import kernel_for
from engine.runner import ModelRunner
from scheduler import Batch
from tests.engine.mixed_fleet import resident_pool

TEXT = "Your parcel is waiting, confirm delivery at the link before it is returned"


def _aten_calls(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


@pytest.fixture
def runner_and_keys(backbone, tmp_path: Path, publish_random):
    from registry import Registry

    registry = Registry(tmp_path / "reg")
    registry.create_tenant("acme")
    records = [publish_random(registry, "acme", f"m{seed}", seed=seed) for seed in range(2)]
    memory, keys = resident_pool(backbone, registry, records, num_pages=64)
    yield ModelRunner(backbone, memory, "cpu", kernel_for("loop", "cpu")), keys
    registry.close()


@pytest.mark.parametrize("num_adapters", [1, 2])
def test_a_lora_step_adds_few_device_op_calls_per_linear(
    backbone, runner_and_keys, num_adapters: int
) -> None:
    runner, keys = runner_and_keys
    ids = backbone.tokenizer(TEXT)["input_ids"]
    rows = 4
    batch = Batch.of(sorted(keys[i % num_adapters] for i in range(rows)), [len(ids)] * rows)
    input_ids = torch.tensor([ids] * rows)

    def bare() -> None:
        with torch.inference_mode():
            backbone.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))

    def step() -> None:
        runner.step(batch, [ids] * rows)

    step()  # the first step of an adapter makes its views of the pools
    extra = _aten_calls(step) - _aten_calls(bare)
    wrapped = 12  # publish_random's adapters: LoRA on query and value of 6 layers
    # per segment and Linear: a shrink and an expand (mm, addmm_ and their conj checks) and,
    # for a segment of part of the step, its rows' slices; was 270 and 555 calls in all
    # before the pools' views were kept between steps (162 and 363 after)
    per_linear = 12 * num_adapters + 2
    assert extra <= wrapped * per_linear + 80, extra
    assert _aten_calls(step) == _aten_calls(step)  # nothing grows from step to step
