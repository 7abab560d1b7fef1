"""The CPU path of the segmented LoRA update, in plain torch."""

from collections import OrderedDict
from collections.abc import Sequence

import torch


def sgmv_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_pages: torch.Tensor,
    seg_rank: torch.Tensor,
    seg_scale: torch.Tensor,
) -> None:
    """Add each segment's low-rank update into ``y`` in place (shrink then expand).

    Shapes (N tokens, S segments, P pool rows, R max rank in this batch):

    - ``y``: [N, out], the base projection's output; updated in place.
    - ``x``: [N, in], the projection's input, rows sorted so that each segment is contiguous.
    - ``a_pool``: [P, in]; row ``p`` is one rank-row of some adapter's A (A is [r, in]).
    - ``b_pool``: [P, out]; row ``p`` is the matching row of B transposed (B is [out, r]).
    - ``seg_starts``: int32 [S + 1], token offsets; segment ``s`` is ``x[starts[s]:starts[s+1]]``.
    - ``seg_pages``: int32 [S, R], pool rows of the segment's adapter, first ``rank`` used.
    - ``seg_rank``: int32 [S]; 0 means the segment has no adapter on this module and is skipped.
    - ``seg_scale``: float32 [S], ``alpha / r`` (or rsLoRA's ``alpha / sqrt(r)``).

    Pages are fixed width (one row of ``in`` or ``out`` values), so adapters of rank 4..64 share
    one pool without padding. Accumulates in the dtype of ``y`` (float32 on the CPU).
    """
    sgmv_lora_lists(
        y,
        x,
        a_pool,
        b_pool,
        seg_starts.tolist(),
        seg_pages.tolist(),
        seg_rank.tolist(),
        seg_scale.tolist(),
    )


def sgmv_lora_lists(
    y: torch.Tensor,
    x: torch.Tensor,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    starts: Sequence[int],
    pages: Sequence[Sequence[int]],
    ranks: Sequence[int],
    scales: Sequence[float],
) -> None:
    """:func:`sgmv_lora` with the segment metadata as Python numbers (token offsets, pages per
    segment, ranks, scales): a step converts it once for all its layers, so no layer turns
    tensors back into numbers (on a one-row step that conversion cost as much as the math)."""
    views = PoolViews(((a_pool, b_pool),), max_entries=0)
    sgmv_lora_views(y, x, views, 0, starts, pages, ranks, scales)


def sgmv_lora_views(
    y: torch.Tensor,
    x: torch.Tensor,
    views: "PoolViews",
    index: int,
    starts: Sequence[int],
    pages: Sequence[Sequence[int]],
    ranks: Sequence[int],
    scales: Sequence[float],
) -> None:
    """:func:`sgmv_lora_lists` over module ``index`` of ``views``' pools, whose views of each
    adapter's factors outlive the step."""
    num_tokens = x.shape[0]
    for s, rank in enumerate(ranks):
        lo, hi = starts[s], starts[s + 1]
        if rank == 0 or lo == hi:
            continue
        a_t, b = views.factors(index, pages[s], rank)
        if lo == 0 and hi == num_tokens:  # one segment for the whole step: no slicing ops
            y.addmm_(torch.mm(x, a_t), b, alpha=scales[s])
        else:
            y[lo:hi].addmm_(torch.mm(x[lo:hi], a_t), b, alpha=scales[s])


class PoolViews:
    """Each adapter's ``A.T`` and ``B`` as views of the pools, kept from step to step.

    Taking them anew costs seven device-op calls per segment and Linear (two slices, one
    transpose), and a GPU step is bound by such calls. A view is of pool rows, not of an
    adapter, so it stays right whatever adapter later holds those pages; pages that are not
    contiguous are gathered (a copy) and never kept. Bounded, least recently used out first:
    every view is an object the cycle collector walks.
    """

    __slots__ = ("_max", "_pools", "_views")

    def __init__(
        self,
        pools: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
        max_entries: int = 4096,
    ) -> None:
        self._pools = tuple(pools)
        self._max = max_entries
        self._views: OrderedDict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = (
            OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._views)

    def factors(
        self, index: int, pages: Sequence[int], rank: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A.T [in, rank], B [rank, out]) of the adapter on ``pages`` in module ``index``."""
        pools = self._pools[index]
        assert pools is not None  # layers call kernels only for active modules
        if not isinstance(pages, range):
            return _rows(pools[0], pages, rank).t(), _rows(pools[1], pages, rank)
        key = (index, pages.start, rank)
        found = self._views.get(key)
        if found is not None:
            self._views.move_to_end(key)
            return found
        first = pages.start
        found = (pools[0][first : first + rank].t(), pools[1][first : first + rank])
        if self._max > 0:
            if len(self._views) >= self._max:
                self._views.popitem(last=False)
            self._views[key] = found
        return found


def _rows(pool: torch.Tensor, pages: Sequence[int], rank: int) -> torch.Tensor:
    """The adapter's rows: a view when its pages are contiguous (the allocator's usual case).
    A ``range`` is contiguous by construction: the step plan checks once per segment, not
    once per layer."""
    if isinstance(pages, range):
        return pool[pages.start : pages.start + rank]
    first = pages[0]
    if pages[rank - 1] - first == rank - 1 and all(pages[i] == first + i for i in range(rank)):
        return pool[first : first + rank]
    return pool.index_select(0, torch.tensor(pages[:rank], dtype=torch.long, device=pool.device))


def bgmv_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    row_pages: torch.Tensor,
    row_scale: torch.Tensor,
) -> None:
    """Per-row gathered LoRA: two batched matmuls per layer, however many adapters.

    - ``y``: [B, T, out], updated in place; ``x``: [B, T, in] (T tokens per row, padded).
    - ``row_pages``: int64 [B, R], pool rows of each row's adapter; ranks below R are padded
      with a page that holds zeros in every pool, so padding adds nothing.
    - ``row_scale``: [B] in y's dtype, ``alpha / r`` of the row's adapter on this module, 0 for
      rows whose adapter does not target it.

    The gather copies only B x R pool rows (A and B are tiny), never the activations, so its
    cost is flat in the number of distinct adapters: the CPU path for mixed batches.
    """
    flat = row_pages.reshape(-1)  # index_select: a third faster than pool[row_pages] here
    a = a_pool.index_select(0, flat).view(*row_pages.shape, -1)  # [B, R, in]
    b = b_pool.index_select(0, flat).view(*row_pages.shape, -1)  # [B, R, out]
    shrunk = torch.bmm(x, a.transpose(1, 2))  # [B, T, R]
    shrunk.mul_(row_scale.view(-1, 1, 1))
    y.baddbmm_(shrunk, b)
