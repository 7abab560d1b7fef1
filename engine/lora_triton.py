"""The GPU LoraKernel: segmented shrink and expand in Triton, two launches per wrapped Linear
(or one, fused)."""

import torch

from engine.lora import LoraStepPlan
from kernels import sgmv_lora_triton, sgmv_lora_triton_fused
from kernels.triton_sgmv import tile_map

_MAX_CACHED = 8  # (plan, token count) pairs: a step, its pooler, and interludes nested in it


class TritonSgmv:
    """One program per (segment, token tile): cost tracks tokens, not the number of adapters.

    Reads nothing back from the device. On a GPU these calls are bound by launches, not bytes,
    so the token offsets and tile map are built once per step and token count (every encoder
    Linear of a step shares them) instead of once per call. On a CPU-only machine it runs in
    Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported), for tests.
    """

    def __init__(self, *, fused: bool = False) -> None:
        # id(plan), tokens -> (plan, offsets, tiles); the plan is kept so its id stays unique
        self._steps: dict[tuple[int, int], tuple[LoraStepPlan, torch.Tensor, tuple]] = {}
        # fused: shrink and expand in one launch per Linear (kernels.triton_fused)
        self._lora = sgmv_lora_triton_fused if fused else sgmv_lora_triton

    def reads_segment_tensors(self, num_lora_segments: int) -> bool:
        return True

    def apply(self, index: int, y: torch.Tensor, x: torch.Tensor, plan: LoraStepPlan) -> None:
        num_tokens = x.shape[0]
        found = self._steps.get((id(plan), num_tokens))
        if found is None:
            if len(self._steps) >= _MAX_CACHED:
                self._steps.clear()
            starts = plan.seg_row_starts * (num_tokens // plan.num_rows)
            found = (plan, starts, tile_map(starts, num_tokens))
            self._steps[(id(plan), num_tokens)] = found
        _, starts, tiles = found
        pools = plan.pools[index]
        assert pools is not None  # layers call kernels only for active modules
        self._lora(
            y,
            x,
            pools[0],
            pools[1],
            starts,
            plan.seg_pages,
            plan.seg_rank[index],
            plan.seg_scale[index],
            tiles=tiles,
        )
