"""The engine's CPU LoRA kernels against the float32 reference, over rank runs."""

import pytest
import torch

from engine.lora import LoraStepPlan, SegmentLists, rank_runs
from engine.lora_kernels import AutoCpu, GatherBmm, SegmentLoop, kernel_for
from kernels import PoolViews, sgmv_reference

IN, OUT, TOKENS = 24, 40, 3


def test_rank_runs_merge_neighbours_of_one_rank_and_skip_rank_zero() -> None:
    runs = rank_runs([2, 1, 0, 3, 1, 2], [0, 8, 8, 8, 16, 8])
    assert [(r.first_segment, r.end_segment, r.first_row, r.end_row, r.rank) for r in runs] == [
        (1, 4, 2, 6, 8),
        (4, 5, 6, 7, 16),
        (5, 6, 7, 9, 8),
    ]
    assert rank_runs([4], [0]) == ()


def _plan(ranks: list[int], rows: list[int], seed: int = 0, *, with_lists: bool = False):
    """A plan over a random pool: segment s has ``rows[s]`` rows of ``TOKENS`` tokens; with
    ``with_lists`` its metadata as Python numbers too, as the engine's runner builds it."""
    gen = torch.Generator().manual_seed(seed)
    num_pages = sum(ranks) + 1
    a_pool = torch.randn(num_pages, IN, generator=gen)
    b_pool = torch.randn(num_pages, OUT, generator=gen)
    a_pool[0], b_pool[0] = 0.0, 0.0  # the zero page that pads short ranks
    width = max(max(ranks), 1)
    pages = torch.zeros(len(ranks), width, dtype=torch.int32)
    first = 1
    for s, r in enumerate(ranks):
        pages[s, :r] = torch.arange(first, first + r, dtype=torch.int32)
        first += r
    seg_rank = torch.tensor([ranks], dtype=torch.int32)
    scale = torch.tensor([[2.0 / max(r, 1) for r in ranks]], dtype=torch.float32)
    lengths = torch.tensor(rows)
    starts = torch.zeros(len(rows) + 1, dtype=torch.int32)
    starts[1:] = torch.cumsum(lengths, 0)
    plan = LoraStepPlan(
        num_rows=sum(rows),
        seg_row_starts=starts,
        seg_pages=pages,
        seg_rank=seg_rank,
        seg_scale=scale,
        module_active=(True,),
        pools=((a_pool, b_pool),),
        kernel=SegmentLoop(),
        row_pages=pages.long().repeat_interleave(lengths, dim=0),
        row_scale=(scale * (seg_rank > 0)).repeat_interleave(lengths, dim=1),
        runs=rank_runs(rows, ranks),
        lists=SegmentLists(
            row_starts=tuple(starts.tolist()),
            pages=[pages[s, :r].tolist() for s, r in enumerate(ranks)],
            ranks=seg_rank.tolist(),
            scales=scale.tolist(),
        )
        if with_lists
        else None,
        num_lora_segments=sum(1 for r, n in zip(ranks, rows, strict=True) if r and n),
        views=PoolViews(((a_pool, b_pool),)) if with_lists else None,
    )
    x = torch.randn(sum(rows) * TOKENS, IN, generator=gen)
    y = torch.randn(sum(rows) * TOKENS, OUT, generator=gen)
    return plan, x, y


PATTERNS = {
    "one adapter": ([8], [5]),
    "every row its own, rank sorted": ([4] * 9 + [16] * 9 + [64] * 3, [1] * 21),
    "mixed ranks interleaved": ([64, 4, 16, 8, 32] * 4, [2, 1, 3, 1, 2] * 4),
    "rows without adapter": ([0, 8, 8, 0, 8] * 4, [2, 1, 1, 3, 1] * 4),
    "zipf groups": ([8] * 12, [12, 6, 4, 3, 2, 2, 2, 1, 1, 1, 1, 1]),
}


@pytest.mark.parametrize("with_lists", [False, True], ids=["tensors", "lists and views"])
@pytest.mark.parametrize("kernel", [SegmentLoop(), GatherBmm(), AutoCpu(), AutoCpu(2)])
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_cpu_kernels_match_reference(kernel, pattern: str, with_lists: bool) -> None:
    ranks, rows = PATTERNS[pattern]
    plan, x, y = _plan(ranks, rows, with_lists=with_lists)
    expected = sgmv_reference(y, x, *plan.segment_args(0, x.shape[0]))
    kernel.apply(0, y, x, plan)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)


def test_only_kernels_that_read_segment_tensors_get_them_on_the_device() -> None:
    """The runner copies a plan's ``seg_*`` tensors to the device only for a kernel that reads
    them: on a GPU each copy is a launch and a wait, in a step bound by the host."""
    for kernel in (SegmentLoop(), GatherBmm(), AutoCpu()):
        assert not kernel.reads_segment_tensors(1) and not kernel.reads_segment_tensors(100)
    kernel, _ = _counting_auto_cuda()
    assert not kernel.reads_segment_tensors(3) and kernel.reads_segment_tensors(4)
    assert kernel._triton.reads_segment_tensors(1)


def test_gather_refuses_a_plan_without_runs() -> None:
    plan, x, y = _plan([8, 8], [1, 1])
    bare = LoraStepPlan(**{f: getattr(plan, f) for f in plan.__slots__ if f != "runs"})
    with pytest.raises(ValueError, match="rank runs"):
        GatherBmm().apply(0, y, x, bare)


def test_segment_loop_reads_page_ranges_and_scattered_pages_alike() -> None:
    """The step plan hands contiguous pages over as ranges (a view, no per-layer check) and
    scattered ones as lists (a gather); both must give the reference's answer."""
    from engine.runner import _page_run
    from kernels import sgmv_lora_lists

    assert _page_run((3, 4, 5)) == range(3, 6)
    assert _page_run((5, 2, 7)) == [5, 2, 7] and _page_run((4, 3)) == [4, 3]
    assert _page_run(()) == []
    gen = torch.Generator().manual_seed(3)
    a_pool, b_pool = torch.randn(9, IN, generator=gen), torch.randn(9, OUT, generator=gen)
    x = torch.randn(2 * TOKENS, IN, generator=gen)
    y = torch.randn(2 * TOKENS, OUT, generator=gen)
    starts, ranks, scales = [0, TOKENS, 2 * TOKENS], [3, 3], [0.5, 2.0]
    expected = sgmv_reference(
        y,
        x,
        a_pool,
        b_pool,
        torch.tensor(starts, dtype=torch.int32),
        torch.tensor([[1, 2, 3], [6, 4, 8]], dtype=torch.int32),
        torch.tensor(ranks, dtype=torch.int32),
        torch.tensor(scales),
    )
    pages = [_page_run((1, 2, 3)), _page_run((6, 4, 8))]
    assert isinstance(pages[0], range) and isinstance(pages[1], list)
    sgmv_lora_lists(y, x, a_pool, b_pool, starts, pages, ranks, scales)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)


def _counting_auto_cuda():
    pytest.importorskip("triton", reason="AutoCuda holds the Triton kernel")
    from engine.lora_kernels import AutoCuda

    kernel = AutoCuda()
    calls = []
    inner = kernel._triton.apply
    kernel._triton.apply = lambda *args: (calls.append(1), inner(*args))
    return kernel, calls


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_auto_cuda_matches_reference_on_either_path(pattern: str) -> None:
    """Triton runs in its interpreter here; on a GPU, tests/engine/test_cuda.py covers it."""
    kernel, calls = _counting_auto_cuda()
    ranks, rows = PATTERNS[pattern]
    plan, x, y = _plan(ranks, rows, with_lists=True)
    expected = sgmv_reference(y, x, *plan.segment_args(0, x.shape[0]))
    kernel.apply(0, y, x, plan)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
    assert bool(calls) == (plan.num_lora_segments > 3)  # a few adapters loop, many launch


def test_auto_cuda_loops_only_over_a_few_segments_with_lists() -> None:
    kernel, calls = _counting_auto_cuda()
    plan, x, y = _plan([8, 0, 8, 8], [1, 3, 1, 1], with_lists=True)
    assert plan.num_lora_segments == 3  # the rank-0 segment counts for nothing
    kernel.apply(0, y, x, plan)
    assert not calls
    plan, x, y = _plan([8, 8], [1, 1])  # no Python numbers: only Triton can read the plan
    kernel.apply(0, y, x, plan)
    assert calls
    assert type(kernel_for("auto", "cuda")).__name__ == "AutoCuda"
    assert isinstance(kernel_for("auto", "cpu"), AutoCpu)
