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
        sgmv_lora_triton(y, x, *plan.segment_args(index, x.shape[0]))
