"""LoRA on a frozen Linear, for every adapter of a mixed batch at once."""

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from kernels import PoolViews


class LoraKernel(Protocol):
    """How one wrapped Linear adds its segments' low-rank updates (CPU loop, gather, Triton).

    ``y`` and ``x`` are the layer's 2-D output and input ([N, out], [N, in]); N is
    ``plan.num_rows`` times the tokens per row. Updates ``y`` in place.
    """

    def apply(self, index: int, y: torch.Tensor, x: torch.Tensor, plan: "LoraStepPlan") -> None: ...

    def reads_segment_tensors(self, num_lora_segments: int) -> bool:
        """Whether a step of that many LoRA segments reads the plan's ``seg_*`` tensors on the
        device; if not, the runner leaves them on the host and copies nothing."""
        ...


class RankRun(NamedTuple):
    """Neighbouring segments whose adapters have one rank: one gather-matmul pair at that rank."""

    first_segment: int
    end_segment: int
    first_row: int
    end_row: int
    rank: int


def rank_runs(rows_per_segment: list[int], ranks: list[int]) -> tuple[RankRun, ...]:
    """Cut a step's segments into runs of equal adapter rank (rank-0 segments left out;
    empty segments inside a run are harmless and do not split it).

    The planner orders segments by rank, so a batch holds one run per distinct rank: mixed
    ranks then cost their own rank instead of every row padded to the largest one.
    """
    runs: list[RankRun] = []
    row = 0
    for s, (count, rank) in enumerate(zip(rows_per_segment, ranks, strict=True)):
        if count and rank:
            last = runs[-1] if runs else None
            if last is not None and last.end_row == row and last.rank == rank:
                runs[-1] = last._replace(end_segment=s + 1, end_row=row + count)
            else:
                runs.append(RankRun(s, s + 1, row, row + count, rank))
        row += count
    return tuple(runs)


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
    kernel: LoraKernel  # the implementation every layer of this step uses
    row_pages: torch.Tensor | None = None  # int64 [B, R], per-row pages (gather kernels)
    row_scale: torch.Tensor | None = None  # [M, B] in the pool dtype, 0 where no LoRA
    runs: tuple[RankRun, ...] = ()  # equal-rank segment runs (gather kernels), see rank_runs
    lists: "SegmentLists | None" = None  # the same metadata as Python numbers (CPU loop)
    num_lora_segments: int = 0  # segments with rows and LoRA on some module (AutoCuda)
    views: "PoolViews | None" = None  # the pools' per-adapter views, kept across steps
    # token count -> every segment's token offsets: each Linear of the step reads the same
    _starts: dict[int, list[int]] = field(default_factory=dict, compare=False, repr=False)

    def segment_args(
        self, index: int, num_tokens: int, first: int = 0, end: int | None = None
    ) -> tuple[torch.Tensor, ...]:
        """(a_pool, b_pool, token offsets, pages, ranks, scales) of one module over segments
        ``first:end`` (all by default), in the order the segmented kernels take them after
        ``y`` and ``x``. Offsets stay absolute, so kernels index the whole ``y`` and ``x``."""
        pools = self.pools[index]
        assert pools is not None  # layers call kernels only for active modules
        tokens_per_row = num_tokens // self.num_rows
        end = self.seg_pages.shape[0] if end is None else end
        return (
            pools[0],
            pools[1],
            self.seg_row_starts[first : end + 1] * tokens_per_row,
            self.seg_pages[first:end],
            self.seg_rank[index, first:end],
            self.seg_scale[index, first:end],
        )

    def segment_lists(
        self, index: int, num_tokens: int, first: int = 0, end: int | None = None
    ) -> tuple[list[int], list[Sequence[int]], list[int], list[float]]:
        """``segment_args`` minus the pools, as Python numbers (``lists`` must be set)."""
        lists = self.lists
        assert lists is not None
        end = len(lists.pages) if end is None else end
        starts = self._starts.get(num_tokens)
        if starts is None:
            if lists.token_starts is not None and num_tokens == lists.token_starts[-1]:
                starts = [lists.token_starts[row] for row in lists.row_starts]
            else:  # padded rows, or one token per row (the pooler)
                tokens_per_row = num_tokens // self.num_rows
                starts = [start * tokens_per_row for start in lists.row_starts]
            self._starts[num_tokens] = starts
        return (
            starts[first : end + 1],
            lists.pages[first:end],
            lists.ranks[index][first:end],
            lists.scales[index][first:end],
        )


class SegmentLists(NamedTuple):
    """A step's segment metadata as Python numbers, built once per step."""

    row_starts: tuple[int, ...]  # [S + 1]
    pages: list[Sequence[int]]  # [S][rank], pool rows of each segment's adapter (a range
    # when contiguous, so kernels take a view without checking)
    ranks: list[list[int]]  # [M][S]
    scales: list[list[float]]  # [M][S]
    # [rows + 1] token offsets of an unpadded (packed) step's rows; None when padded
    token_starts: tuple[int, ...] | None = None


class StepLora:
    """Holds the plan of the step in progress; owned by the backbone, set by the runner.

    One object per backbone, passed to each wrapper at construction: no module-level state.
    """

    __slots__ = ("_rows", "between_layers", "plan")

    def __init__(self) -> None:
        self.plan: LoraStepPlan | None = None
        # called at every pause point of the encoder (before each block) while set: the engine
        # runs short steps of other tenants there, so a long step delays them by one block
        self.between_layers: Callable[[], None] | None = None
        self._rows: tuple[weakref.ref[torch.Tensor], torch.Tensor] | None = None

    def rows_of(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """``x`` as [tokens, width], one object for every sibling Linear that reads ``x``
        (attention's query, key and value): one view op instead of three, and an int8 base
        layer sees the same tensor its siblings quantised (engine/quantize.SharedInput)."""
        last = self._rows
        if last is not None and last[0]() is x and last[1].shape[1] == width:
            return last[1]
        rows = _rows_of(x, width)
        self._rows = (weakref.ref(x), rows)
        return rows


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
        plan = self.state.plan
        if plan is None or not plan.module_active[self.index]:
            return self.base(x)
        # the base Linear on 2-D rows, as the kernels take them: two device-op calls fewer
        # than a 3-D Linear plus views of its input and output
        rows = self.state.rows_of(x, self.in_features)
        y = self.base(rows)
        plan.kernel.apply(self.index, y, rows, plan)
        return y.view(*x.shape[:-1], self.out_features)


def _rows_of(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` as [tokens, width]: ``view`` where it can (one op per call, where ``reshape`` is
    two), 36 Linears a step."""
    return t.view(-1, width) if t.is_contiguous() else t.reshape(-1, width)
