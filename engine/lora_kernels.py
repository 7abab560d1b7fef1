"""The LoraKernel implementations, chosen once per engine from the device and config."""

import logging

import torch

from engine.lora import LoraKernel, LoraStepPlan, RankRun
from kernels import bgmv_lora, sgmv_lora, sgmv_lora_lists, sgmv_lora_views

log = logging.getLogger(__name__)


class SegmentLoop:
    """One pair of matmuls per segment: best when a batch holds a few adapters.

    Differentiable, so training uses it too.
    """

    def apply(self, index: int, y: torch.Tensor, x: torch.Tensor, plan: LoraStepPlan) -> None:
        segment_loop(index, y, x, plan)

    def reads_segment_tensors(self, num_lora_segments: int) -> bool:
        return False  # the runner's plans always carry the Python lists


def segment_loop(
    index: int,
    y: torch.Tensor,
    x: torch.Tensor,
    plan: LoraStepPlan,
    first: int = 0,
    end: int | None = None,
) -> None:
    """The loop over segments ``first:end``, from the plan's Python numbers when it has them."""
    if plan.lists is None:
        sgmv_lora(y, x, *plan.segment_args(index, x.shape[0], first, end))
        return
    if plan.views is not None:
        lists = plan.segment_lists(index, x.shape[0], first, end)
        sgmv_lora_views(y, x, plan.views, index, *lists)
        return
    pools = plan.pools[index]
    assert pools is not None  # layers call kernels only for active modules
    sgmv_lora_lists(y, x, pools[0], pools[1], *plan.segment_lists(index, x.shape[0], first, end))


class GatherBmm:
    """Per-row gathered factors and two batched matmuls per equal-rank run of segments: flat
    cost in distinct adapters, and mixed ranks each at their own rank."""

    def apply(self, index: int, y: torch.Tensor, x: torch.Tensor, plan: LoraStepPlan) -> None:
        if not plan.runs:  # an active module always has a run: the plan was built without them
            raise ValueError("the gather kernel needs the plan's rank runs (lora.rank_runs)")
        for run in plan.runs:
            self.apply_run(index, y, x, plan, run)

    def reads_segment_tensors(self, num_lora_segments: int) -> bool:
        return False  # per-row pages and scales instead

    @staticmethod
    def apply_run(
        index: int, y: torch.Tensor, x: torch.Tensor, plan: LoraStepPlan, run: RankRun
    ) -> None:
        pools = plan.pools[index]
        assert pools is not None and plan.row_pages is not None and plan.row_scale is not None
        rows = plan.num_rows
        lo, hi = run.first_row, run.end_row
        y3, x3 = y.view(rows, -1, y.shape[-1]), x.view(rows, -1, x.shape[-1])
        pages, scale = plan.row_pages, plan.row_scale[index]
        if lo > 0 or hi < rows:  # slicing costs device-op calls: none for a run of every row
            y3, x3, pages, scale = y3[lo:hi], x3[lo:hi], pages[lo:hi], scale[lo:hi]
        if run.rank < pages.shape[1]:
            pages = pages[:, : run.rank]
        bgmv_lora(y3, x3, pools[0], pools[1], pages, scale)


class AutoCpu:
    """Per run of equal-rank segments: the gather path when the run holds many adapters,
    else the loop over its segments.

    Measured on a 2-core CPU (benchmarks/kernels.py, benchmarks/mixed_batch.py): the two cost
    about the same for a handful of segments at rank 8, and the gather wins beyond; with ranks
    4..64 mixed, runs of 6-7 segments per rank already favour the gather (0.85x of the bare
    backbone against 0.81x for the loop).
    """

    def __init__(self, min_gather_segments: int = 4) -> None:
        self._min_gather_segments = min_gather_segments

    def apply(self, index: int, y: torch.Tensor, x: torch.Tensor, plan: LoraStepPlan) -> None:
        if plan.row_pages is None or not plan.runs:
            segment_loop(index, y, x, plan)
            return
        for run in plan.runs:
            if run.end_segment - run.first_segment >= self._min_gather_segments:
                GatherBmm.apply_run(index, y, x, plan, run)
            else:
                segment_loop(index, y, x, plan, run.first_segment, run.end_segment)

    def reads_segment_tensors(self, num_lora_segments: int) -> bool:
        return False


# segments up to which a CUDA step loops over cuBLAS matmuls instead of launching Triton
_MAX_LOOP_SEGMENTS_CUDA = 3


class AutoCuda:
    """Per step: the loop over segments (two torch matmuls each) for a few segments, the
    Triton kernels (two launches per Linear, whatever the segment count) beyond.

    On a GPU these calls are bound by the host's launch cost, not by bytes. On the H200 of
    benchmarks/RESULTS.md, Triton's Python launcher took about 49 us per launch, two per
    Linear; the loop costs seven torch dispatches per segment and Linear, two of them
    launches (~5-10 us each, the rest views at a few us). A step of one to three adapters,
    the usual small step of a lightly loaded server, then costs less as plain matmuls. Not
    yet timed on a GPU: ``_MAX_LOOP_SEGMENTS_CUDA`` is where those estimates break even
    (``benchmarks/gpu_run.sh profile`` compares both).
    """

    def __init__(self, max_loop_segments: int = _MAX_LOOP_SEGMENTS_CUDA) -> None:
        from engine.lora_triton import TritonSgmv

        self._triton = TritonSgmv()
        self._max_loop_segments = max_loop_segments

    def apply(self, index: int, y: torch.Tensor, x: torch.Tensor, plan: LoraStepPlan) -> None:
        if plan.lists is not None and plan.num_lora_segments <= self._max_loop_segments:
            segment_loop(index, y, x, plan)
        else:
            self._triton.apply(index, y, x, plan)

    def reads_segment_tensors(self, num_lora_segments: int) -> bool:
        return num_lora_segments > self._max_loop_segments


def kernel_for(name: str, device: str) -> LoraKernel:
    """Map the configured kernel name to its implementation (done once, at engine start)."""
    if name == "auto":
        name = "auto-cuda" if device.startswith("cuda") else "auto-cpu"
    if name == "auto-cpu":
        return AutoCpu()
    if name == "auto-cuda":
        _warn_if_interpreted(device)
        return AutoCuda()
    if name == "loop":
        return SegmentLoop()
    if name == "gather":
        return GatherBmm()
    if name in ("triton", "triton-fused"):
        if not device.startswith("cuda") and not _is_interpreted():
            # without the interpreter every step would fail, every tenant's rows with it
            raise ValueError(
                f"lora_kernel={name!r} needs a CUDA device; on the CPU Triton runs only in its "
                "interpreter (TRITON_INTERPRET=1, set before triton is imported: slow, for "
                "tests). Use auto or gather here"
            )
        from engine.lora_triton import TritonSgmv

        _warn_if_interpreted(device)
        return TritonSgmv(fused=name == "triton-fused")
    raise ValueError(
        f"unknown LoRA kernel {name!r}; expected auto, loop, gather, triton or triton-fused"
    )


def _is_interpreted() -> bool:
    """Whether Triton's kernels run in its interpreter: fixed when triton was imported, so
    asked of it, not read from today's environment."""
    from kernels.triton_sgmv import IS_INTERPRETED

    return IS_INTERPRETED


def _warn_if_interpreted(device: str) -> None:
    if device.startswith("cuda") and _is_interpreted():
        log.warning(
            "TRITON_INTERPRET is set: the LoRA kernels run in Triton's interpreter on the "
            "CPU, orders of magnitude slower than on the GPU"
        )
