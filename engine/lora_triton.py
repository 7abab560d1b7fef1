"""The GPU LoraKernel: segmented shrink and expand in Triton, two launches per wrapped Linear."""

import torch

from engine.lora import LoraStepPlan
from kernels import sgmv_lora_triton


class TritonSgmv:
    """One program per (segment, token tile): cost tracks tokens, not the number of adapters.

    Reads nothing back from the device. On a CPU-only machine it runs in Triton's interpreter
    (``TRITON_INTERPRET=1`` set before triton is imported), which is for tests only.
    """

    def apply(self, index: int, y: torch.Tensor, x: torch.Tensor, plan: LoraStepPlan) -> None:
        pools = plan.pools[index]
        assert pools is not None  # the layer only calls when the module is active
        tokens_per_row = x.shape[0] // plan.num_rows
        sgmv_lora_triton(
            y,
            x,
            pools[0],
            pools[1],
            plan.seg_row_starts * tokens_per_row,
            plan.seg_pages,
            plan.seg_rank[index],
            plan.seg_scale[index],
        )
