"""LoRA on a frozen Linear, for every adapter of a mixed batch at once."""

from dataclasses import dataclass

import torch
from torch import nn

from kernels import sgmv_lora


@dataclass(frozen=True, slots=True)
class LoraStepPlan:
    """Segment metadata of one engine step, built once and read by every LoRA layer.

    Segments are over batch rows; a layer whose input has T tokens per row scales the
    row offsets by T (T is 1 for the pooler, which sees one token per row).
    """

    num_rows: int  # B, rows in the batch
    seg_row_starts: torch.Tensor  # int32 [S + 1], row offsets of segments
    seg_pages: torch.Tensor  # int32 [S, R], pool rows of each segment's adapter
    seg_rank: torch.Tensor  # int32 [M, S], rank per wrapped module and segment (0 = none)
    seg_scale: torch.Tensor  # float32 [M, S], alpha / r per wrapped module and segment
    module_active: tuple[bool, ...]  # [M], whether any segment has LoRA on that module
    pools: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...]  # [M] (a_pool, b_pool)


class StepLora:
    """Holds the plan of the step in progress; owned by the backbone, set by the runner.

    One object per backbone, passed to each wrapper at construction: no module-level state.
    """

    __slots__ = ("plan",)

    def __init__(self) -> None:
        self.plan: LoraStepPlan | None = None


class LoraLinear(nn.Module):
    """``y = W x + b + scale_s * B_s (A_s x)`` where ``s`` is the row's segment.

    With no plan set (plain backbone use, training of the head only) it is the base Linear.
    """

    def __init__(self, base: nn.Linear, index: int, state: StepLora) -> None:
        super().__init__()
        self.base = base
        self.index = index
        self.state = state
        self.in_features = base.in_features
        self.out_features = base.out_features

    @property
    def weight(self) -> torch.Tensor:  # some HF code reads .weight (dtype, device checks)
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        plan = self.state.plan
        if plan is None or not plan.module_active[self.index]:
            return y
        pools = plan.pools[self.index]
        assert pools is not None  # module_active implies a pool
        x2 = x.reshape(-1, self.in_features)
        y2 = y.reshape(-1, self.out_features)
        tokens_per_row = x2.shape[0] // plan.num_rows
        sgmv_lora(
            y2,
            x2,
            pools[0],
            pools[1],
            plan.seg_row_starts * tokens_per_row,
            plan.seg_pages,
            plan.seg_rank[self.index],
            plan.seg_scale[self.index],
        )
        return y2.view_as(y)
