"""The LoraKernel implementations, chosen once per engine from the device and config."""

import torch

from engine.lora import LoraKernel, LoraStepPlan
from kernels import bgmv_lora, sgmv_lora


class SegmentLoop:
    """One pair of matmuls per segment: best when a batch holds a few adapters.

    Differentiable, so training uses it too.
    """

    def apply(self, index: int, y: torch.Tensor, x: torch.Tensor, plan: LoraStepPlan) -> None:
        sgmv_lora(y, x, *plan.segment_args(index, x.shape[0]))


class GatherBmm:
    """Per-row gathered factors and two batched matmuls: flat cost in distinct adapters."""

    def apply(self, index: int, y: torch.Tensor, x: torch.Tensor, plan: LoraStepPlan) -> None:
        pools = plan.pools[index]
        assert pools is not None and plan.row_pages is not None and plan.row_scale is not None
        rows = plan.num_rows
        bgmv_lora(
            y.view(rows, -1, y.shape[-1]),
            x.view(rows, -1, x.shape[-1]),
            pools[0],
            pools[1],
            plan.row_pages,
            plan.row_scale[index],
        )


class AutoCpu:
    """Per step: the gather path for batches of many adapters of similar rank, else the loop.

    Measured on a 2-core CPU (benchmarks/kernels.py): the two cost the same up to about 8
    segments at rank 8, the gather wins beyond, and it loses badly when mixed ranks make it
    pad every row to the largest rank.
    """

    def __init__(self, min_gather_segments: int = 8, max_rank_padding: float = 1.5) -> None:
        self._loop = SegmentLoop()
        self._gather = GatherBmm()
        self._min_gather_segments = min_gather_segments
        self._max_rank_padding = max_rank_padding

    def apply(self, index: int, y: torch.Tensor, x: torch.Tensor, plan: LoraStepPlan) -> None:
        use_gather = (
            plan.row_pages is not None
            and plan.seg_pages.shape[0] >= self._min_gather_segments
            and plan.rank_padding <= self._max_rank_padding
        )
        (self._gather if use_gather else self._loop).apply(index, y, x, plan)


def kernel_for(name: str, device: str) -> LoraKernel:
    """Map the configured kernel name to its implementation (done once, at engine start)."""
    if name == "auto":
        name = "triton" if device.startswith("cuda") else "auto-cpu"
    if name == "auto-cpu":
        return AutoCpu()
    if name == "loop":
        return SegmentLoop()
    if name == "gather":
        return GatherBmm()
    if name == "triton":
        from engine.lora_triton import TritonSgmv

        return TritonSgmv()
    raise ValueError(f"unknown LoRA kernel {name!r}; expected auto, loop, gather or triton")
