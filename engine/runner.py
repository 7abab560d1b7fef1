"""One engine step: padded token ids in, per-row label probabilities out.

Runs on the engine's single model thread; never touches asyncio.
"""

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.adapters import POOLING_CLS_POOLER, backbone_poolings
from engine.backbone import Backbone
from engine.lean_encoder import lean_encoder
from engine.lora import LoraKernel, LoraStepPlan, SegmentLists, rank_runs
from engine.lora_kernels import AutoCpu, GatherBmm, SegmentLoop
from engine.memory import AdapterMemory, Resident
from engine.packing import (
    MASKED_MAX_TOKENS,
    PackedInputs,
    PackedOutputs,
    PaddedOutputs,
    pack,
    packing_works,
    worth_packing,
)
from engine.static_step import (
    Shape,
    StaticOutputs,
    StaticStep,
    shape_of,
    shapes_for,
    static_steps_work,
)
from engine.step_heads import head_probs
from kernels import PoolViews
from scheduler import Batch

log = logging.getLogger(__name__)

# the adapter key of rows that run the bare backbone (no LoRA, no head): their pooled outputs
# feed any number of head-only models after the step. Never a "tenant/name@version" key.
BACKBONE_KEY = "(backbone)"


@dataclass(frozen=True, slots=True)
class Pooled:
    """The pooled outputs of one bare-backbone row, on the host."""

    vectors: Mapping[str, np.ndarray]  # pooling (engine.adapters.POOLINGS) -> float32 [H]


# per row: label probabilities (float32 [C]) of an adapter row, or a backbone row's Pooled
RowOutput = np.ndarray | Pooled


class ModelRunner:
    """Builds the step's LoRA plan, runs the backbone once, applies each segment's head.

    Rows of the ``BACKBONE_KEY`` segment run without LoRA and come back pooled, headless.
    """

    def __init__(
        self,
        backbone: Backbone,
        memory: AdapterMemory,
        device: str,
        kernel: LoraKernel,
        *,
        pack_max_tokens: int = 0,
        step_max_tokens: int | None = None,
        static_max_tokens: int = 0,
        cuda_graphs: bool = False,
        lean_forward: bool = True,
    ) -> None:
        self._backbone = backbone
        # the model's forward in plain torch calls where they compute the same (lean_encoder.py)
        lean = lean_encoder(backbone, memory.dtype) if lean_forward else None
        self._encode: Callable[..., Any] = lean if lean is not None else backbone.model
        self.lean = lean is not None
        if lean_forward and lean is None:
            log.info("%s runs its own forward: the lean one does not fit it", backbone.name)
        self._poolings = backbone_poolings(backbone)  # pooled for head-only models' rows
        self._kernel = kernel
        self._memory = memory
        self._device = device
        pad = backbone.tokenizer.pad_token_id
        self._pad_id = int(pad) if pad is not None else 0
        num_modules = len(backbone.linear_names)
        self._no_ranks = torch.zeros(num_modules, dtype=torch.int32)
        self._no_scales = torch.zeros(num_modules, dtype=torch.float32)
        self.num_steps = 0
        self.num_rows = 0
        # unpadded steps: on the CPU (where compute follows tokens), with the loop kernels
        # (segments over token ranges), and only for a backbone that computes the same packed
        loops = isinstance(kernel, SegmentLoop | AutoCpu)
        can_pack = pack_max_tokens > 0 and device == "cpu" and loops
        can_pack = can_pack and packing_works(backbone, device, memory.dtype)
        most = pack_max_tokens if self.lean else min(pack_max_tokens, MASKED_MAX_TOKENS)
        self.pack_max_tokens = most if can_pack else 0
        # where any step of up to ``step_max_tokens`` (the scheduler's budget) can run packed,
        # rows attending apart, the scheduler budgets real tokens (engine/stack.py): every
        # step with padding then runs packed, so no step costs more than its budget
        self.budgets_real_tokens = (
            step_max_tokens is not None and self.lean and self.pack_max_tokens >= step_max_tokens
        )
        self.num_packed_steps = 0
        # per-row pages and scales, for the kernels that gather them (a few device ops and
        # copies a step, which a GPU step bound by the host does not spend for nothing)
        self._gathers = isinstance(kernel, GatherBmm | AutoCpu)
        self._views = PoolViews(memory.pools)  # the pools never move: views of them last
        # steps of bucketed shapes up to this many padded tokens (engine/static_step.py), each
        # captured in a CUDA graph on first use with ``cuda_graphs``; 0 = never
        if static_max_tokens > 0 and not static_steps_work(backbone, device, memory.dtype):
            log.warning(
                "static steps (CUDA graphs) are off: %s answers differently with a 4-D mask",
                backbone.name,
            )
            static_max_tokens = 0
        self._static_max_tokens = static_max_tokens
        self._cuda_graphs = cuda_graphs and device.startswith("cuda")
        self._static: dict[Shape, StaticStep] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self._cuda_graphs else None
        self._capture_stream = torch.cuda.Stream() if self._cuda_graphs else None
        self.num_static_steps = 0
        self.num_captures = 0
        self.capture_seconds = 0.0

    @torch.inference_mode()
    def step(self, batch: Batch, token_ids: Sequence[Sequence[int]]) -> list[RowOutput]:
        """One output per row of ``batch``, in row order: probabilities (labels as the
        adapter's) for adapter rows, ``Pooled`` for ``BACKBONE_KEY`` rows.

        Rows leave torch as numpy float32 vectors: one array per segment, sliced per row.
        """
        residents = [
            None if key == BACKBONE_KEY else self._memory.get(key) for key in batch.seg_adapter
        ]
        packed = (
            pack(token_ids, self._device, self._memory.dtype, rows_apart=self.lean)
            if worth_packing(token_ids, self.pack_max_tokens, any_padding=self.budgets_real_tokens)
            else None
        )
        state = self._backbone.lora_state
        outer = state.plan  # set when this step runs between two layers of a longer one
        static = None
        if packed is None and outer is None and state.between_layers is None:
            static = self._static_step(batch, residents)
        if static is not None:  # the whole forward in fixed buffers, replayed if captured
            static.load(token_ids, batch.seg_starts, residents)
            outputs = self._run_static(static)
            if outputs is not None:
                return self._finish(batch, residents, outputs, packed, static=True)
        has_lora = any(r is not None for r in residents)
        starts = packed.token_starts if packed is not None else None
        state.plan = self._plan(batch, residents, starts) if has_lora else None
        try:
            pooler = self._forward(token_ids, batch.max_tokens, packed)
            if isinstance(pooler, PackedOutputs) and self._needs_cls(residents):
                pooler.run_pooler()
        finally:
            state.plan = outer
        return self._finish(batch, residents, pooler, packed)

    def _finish(
        self,
        batch: Batch,
        residents: list[Resident | None],
        pooler: "PaddedOutputs | PackedOutputs | StaticOutputs",
        packed: PackedInputs | None,
        *,
        static: bool = False,
    ) -> list[RowOutput]:
        outputs = self._head_outputs(batch, residents, pooler)
        self.num_steps += 1
        self.num_rows += len(batch.rows)
        self.num_packed_steps += packed is not None
        self.num_static_steps += static
        return outputs

    def _run_static(self, static: StaticStep) -> StaticOutputs | None:
        """Replay (or capture) a static step; None when its capture failed, which turns static
        steps off for good: this step and every later one then run the regular way, rather
        than each shape failing its steps in turn."""
        capturing = static.is_capturing
        start = time.perf_counter()
        try:
            outputs = static.run()
        except Exception:
            if not capturing:
                raise
            log.exception("CUDA graph capture failed; static steps are off from now on")
            self._static_max_tokens = 0
            self._static.clear()
            return None
        if capturing:
            self.num_captures += 1
            self.capture_seconds += time.perf_counter() - start
        return outputs

    def capture_static(self, ranks: Iterable[int]) -> int:
        """Capture, before serving, every shape a step of adapters of these ranks can take:
        on first use a capture holds up its step and every request behind it (26 ms a shape
        on MiniLM, 149 ms on BERT-base, on an H200: benchmarks/RESULTS.md). Shapes of other
        ranks are captured on first use. Returns how many were captured."""
        if not self._cuda_graphs or self._static_max_tokens <= 0:
            return 0
        before = self.num_captures
        width = self._backbone.max_tokens
        with torch.inference_mode():
            for shape in shapes_for(ranks, self._static_max_tokens, width):
                step = self._static_of(shape)
                step.load([], [0], [])  # padding rows: any contents will do for a capture
                if self._run_static(step) is None:
                    break  # capture failed: static steps are off (logged)
        return self.num_captures - before

    def _static_step(self, batch: Batch, residents: list[Resident | None]) -> StaticStep | None:
        """The step's fixed-shape twin, made on first use of its shape; None when static
        steps are off or no bucket holds this one."""
        if self._static_max_tokens <= 0:
            return None
        shape = shape_of(
            len(batch.rows),
            batch.max_tokens,
            residents,
            self._static_max_tokens,
            self._backbone.max_tokens,
        )
        return None if shape is None else self._static_of(shape)

    def _static_of(self, shape: Shape) -> StaticStep:
        step = self._static.get(shape)
        if step is None:
            step = self._static[shape] = StaticStep(
                self._backbone,
                self._memory,
                shape,
                self._device,
                self._pad_id,
                capture=self._cuda_graphs,
                graph_pool=self._graph_pool,
                capture_stream=self._capture_stream,
            )
        return step

    def _head_outputs(
        self,
        batch: Batch,
        residents: list[Resident | None],
        pooler: "PaddedOutputs | PackedOutputs | StaticOutputs",
    ) -> list[RowOutput]:
        """Every segment's head over its rows, in a few device ops for the whole step and one
        copy of every probability to the host (engine/step_heads.py)."""
        heads = [r.head if r is not None else None for r in residents]
        probs = head_probs(batch.seg_starts, heads, pooler)
        outputs: list[RowOutput] = []
        for s, seg_probs in enumerate(probs):
            if seg_probs is None:  # backbone rows: pooled, for head-only models
                outputs.extend(
                    self._pooled_rows(pooler, batch.seg_starts[s], batch.seg_starts[s + 1])
                )
            else:
                outputs.extend(seg_probs)
        return outputs

    def _forward(
        self, token_ids: Sequence[Sequence[int]], width: int, packed: PackedInputs | None
    ) -> "PaddedOutputs | PackedOutputs":
        encode = self._encode
        if packed is None:
            input_ids, mask = self._pad(token_ids, width)
            return PaddedOutputs(encode(input_ids=input_ids, attention_mask=mask), mask)
        apart = packed.attention_mask is None  # the lean forward attends row by row
        rows_apart = {"row_starts": packed.token_starts} if apart else {}
        out = encode(
            input_ids=packed.input_ids,
            attention_mask=packed.attention_mask,
            position_ids=packed.position_ids,
            **rows_apart,
        )
        return PackedOutputs(self._backbone, out.last_hidden_state, packed)

    def _needs_cls(self, residents: list[Resident | None]) -> bool:
        if not self._backbone.has_pooler:
            return False
        return any(r is None or r.head.pooling == POOLING_CLS_POOLER for r in residents)

    def _pooled_rows(
        self, pooler: "PaddedOutputs | PackedOutputs | StaticOutputs", lo: int, hi: int
    ) -> list[Pooled]:
        """Every pooling the backbone offers, so any mix of head-only models shares the row."""
        by_pooling = {p: pooler.pooled(p, lo, hi).float().cpu().numpy() for p in self._poolings}
        return [
            Pooled(vectors={p: vectors[i] for p, vectors in by_pooling.items()})
            for i in range(hi - lo)
        ]

    def _pad(
        self, token_ids: Sequence[Sequence[int]], width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # ids and mask filled in numpy and copied to the device together: per-row torch
        # writes cost ~10 device-op calls a row, which a GPU step (bound by the host) pays
        ids = np.full((2, len(token_ids), width), self._pad_id, dtype=np.int64)
        ids[1] = 0
        for i, row in enumerate(token_ids):
            ids[0, i, : len(row)] = row
            ids[1, i, : len(row)] = 1
        both = torch.from_numpy(ids).to(self._device)  # one copy to the device, not two
        return both[0], both[1]

    def _plan(
        self,
        batch: Batch,
        residents: list[Resident | None],
        token_starts: tuple[int, ...] | None = None,
    ) -> LoraStepPlan:
        """The step's segment metadata; a None resident (backbone rows) has rank 0 everywhere.
        With ``token_starts`` (a packed step) rows are token ranges, for the loop kernels."""
        page_lists = [r.pages if r is not None else () for r in residents]
        max_rank = max((len(p) for p in page_lists), default=0)
        # padding points at page 0, which holds zeros in every pool
        page_array = np.zeros((len(residents), max(max_rank, 1)), dtype=np.int32)
        for s, seg_pages in enumerate(page_lists):
            page_array[s, : len(seg_pages)] = seg_pages
        pages = torch.from_numpy(page_array)
        ranks = torch.stack(
            [r.rank_by_module if r is not None else self._no_ranks for r in residents], dim=1
        )
        scales = torch.stack(
            [r.scale_by_module if r is not None else self._no_scales for r in residents], dim=1
        )
        lengths = [batch.seg_starts[s + 1] - batch.seg_starts[s] for s in range(len(residents))]
        num_lora = sum(1 for p, n in zip(page_lists, lengths, strict=True) if p and n)
        device, dtype = self._device, self._memory.dtype
        # a step the kernel runs from the Python lists copies no segment tensors to the device
        seg_device = device if self._kernel.reads_segment_tensors(num_lora) else "cpu"
        # a packed step has no [rows, tokens] shape to gather over
        gather = self._gathers and token_starts is None
        row_pages = row_scale = None
        if gather:
            # each row's segment, built in Python: repeat_interleave costs ~0.6 ms a call here
            seg_of_row = torch.tensor([s for s, n in enumerate(lengths) for _ in range(n)])
            row_pages = pages.long()[seg_of_row].to(device)
            row_scale = scales[:, seg_of_row].to(device, dtype)
        return LoraStepPlan(
            num_rows=len(batch.rows),
            seg_row_starts=torch.tensor(batch.seg_starts, dtype=torch.int32, device=seg_device),
            seg_pages=pages.to(seg_device),
            seg_rank=ranks.to(seg_device),
            seg_scale=scales.to(seg_device),
            module_active=tuple(bool(v) for v in (ranks.sum(dim=1) > 0).tolist()),
            pools=self._memory.pools,
            kernel=self._kernel,
            row_pages=row_pages,
            row_scale=row_scale,
            runs=rank_runs(lengths, [len(p) for p in page_lists]) if gather else (),
            lists=SegmentLists(
                row_starts=tuple(batch.seg_starts),
                pages=[_page_run(p) for p in page_lists],
                ranks=ranks.tolist(),
                scales=scales.tolist(),
                token_starts=token_starts,
            ),
            num_lora_segments=num_lora,
            views=self._views,
        )


def _page_run(pages: tuple[int, ...]) -> range | list[int]:
    """A segment's pages as a range when they are contiguous (the usual case), else a list."""
    if pages and pages == tuple(range(pages[0], pages[0] + len(pages))):
        return range(pages[0], pages[0] + len(pages))
    return list(pages)
