"""Steps of fixed shapes, for CUDA graphs: one capture per shape bucket, one replay per step.

On a GPU a graft step is bound by the host: ~1,200 device-op calls at ~4 us each, against ~1 ms
of device work for 32 SMS on MiniLM (benchmarks/RESULTS.md, the H200 runs). A CUDA graph
replays a whole captured forward in one call. Capture needs every shape and every branch fixed,
and nothing that waits for the device, so a static step:

- pads rows and tokens up to a bucket (powers of two) and the LoRA rank to a rank bucket;
  every step the scheduler forms has one, and all of them are captured at start-up;
- runs LoRA on every wrapped Linear with the gather kernel, whose per-row pages and scales are
  data in fixed buffers (a row without LoRA on a module gets scale 0 and the zero page);
- hands the encoder a 4-D boolean mask, which it takes as it is: from a 2-D mask it would
  first ask the device whether any token is padding, a wait that capture forbids;
- pools every row both ways (mean, and the [CLS] pooler where there is one) into fixed
  output buffers; the heads, per segment, run after it, outside the graph.

Off CUDA, or before its capture, a static step runs eagerly: that is how the CPU tests check it
against the regular step.
"""

import contextlib
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.adapters import POOLING_CLS_POOLER, POOLING_FIRST, backbone_poolings
from engine.backbone import Backbone
from engine.lora import LoraStepPlan, RankRun
from engine.lora_kernels import GatherBmm
from engine.memory import AdapterMemory, Resident
from engine.packing import CHECK_TEXTS, check_tolerance

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512)
RANK_BUCKETS = (8, 16, 32, 64)


def bucket(value: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket that holds ``value``; None past the largest."""
    return next((b for b in buckets if b >= value), None)


@dataclass(frozen=True, slots=True)
class Shape:
    rows: int
    tokens: int
    rank: int


def shape_of(
    num_rows: int,
    max_tokens: int,
    residents: Sequence[Resident | None],
    max_padded: int,
    max_width: int = TOKEN_BUCKETS[-1],
) -> Shape | None:
    """The bucket of a step, or None when it has none (it then runs the regular way). Steps
    of up to ``max_padded`` padded tokens have one, so every step the scheduler forms under
    the same budget does: buckets may pad that up to 4x. Tokens pad to at most ``max_width``,
    the backbone's position limit, which a bucket may pass."""
    if num_rows * max_tokens > max_padded:
        return None
    max_rank = max((len(r.pages) for r in residents if r is not None), default=0)
    rows = bucket(num_rows, ROW_BUCKETS)
    tokens = bucket(max_tokens, TOKEN_BUCKETS)
    rank = bucket(max(max_rank, 1), RANK_BUCKETS)
    if rows is None or tokens is None or rank is None:
        return None
    return Shape(rows, max(min(tokens, max_width), max_tokens), rank)


def shapes_for(ranks: Iterable[int], max_padded: int, max_width: int) -> list[Shape]:
    """Every shape ``shape_of`` can give steps of adapters of these ranks, for capturing
    them up front: a bucket is reachable when its smallest rows and tokens fit the budget."""
    rank_buckets = sorted({b for b in (bucket(max(r, 1), RANK_BUCKETS) for r in ranks) if b})
    shapes = {
        Shape(rows, min(tokens, max_width), rank)
        for rank in rank_buckets
        for fewest_rows, rows in _spans(ROW_BUCKETS)
        for fewest_tokens, tokens in _spans(TOKEN_BUCKETS)
        if fewest_rows * fewest_tokens <= max_padded and fewest_tokens <= max_width
    }
    return sorted(shapes, key=lambda s: (s.rank, s.rows, s.tokens))


def _spans(buckets: Sequence[int]) -> list[tuple[int, int]]:
    """(smallest value, bucket) for each bucket: what rounds up to it and to no smaller one."""
    return [(previous + 1, b) for previous, b in itertools.pairwise((0, *buckets))]


def static_steps_work(backbone: Backbone, device: str, dtype: torch.dtype) -> bool:
    """Run two texts with the usual 2-D mask and as a static step would, padded further and
    with a 4-D boolean mask (no LoRA): True when every real token's hidden state agrees. An
    encoder that builds its attention mask its own way fails, and then never runs static."""
    token_ids = [backbone.tokenizer(text)["input_ids"] for text in CHECK_TEXTS]
    width = max(len(row) for row in token_ids)
    padded_width = bucket(width, TOKEN_BUCKETS) or width
    ids = torch.zeros((2, len(token_ids), padded_width), dtype=torch.long)
    for i, row in enumerate(token_ids):
        ids[0, i, : len(row)] = torch.tensor(row)
        ids[1, i, : len(row)] = 1
    ids = ids.to(device)
    tolerance = check_tolerance(backbone, dtype)
    attend = ids[1].bool()[:, None, None, :].expand(-1, 1, padded_width, padded_width)
    try:
        with torch.inference_mode():
            usual = backbone.model(input_ids=ids[0, :, :width], attention_mask=ids[1, :, :width])
            static = backbone.model(input_ids=ids[0], attention_mask=attend)
    except Exception:  # noqa: BLE001 - no 4-D masks, whatever way a model says so
        return False
    for i, row in enumerate(token_ids):
        expected = usual.last_hidden_state[i, : len(row)].float()
        got = static.last_hidden_state[i, : len(row)].float()
        if not torch.allclose(got, expected, atol=tolerance):
            return False
    return True


class StaticOutputs:
    """A static step's pooled rows, read by the runner's heads like a padded step's."""

    __slots__ = ("_cls", "_first", "_mean")

    def __init__(
        self, mean: torch.Tensor, first: torch.Tensor | None, cls: torch.Tensor | None
    ) -> None:
        self._mean = mean
        self._first = first
        self._cls = cls

    def pooled(self, pooling: str, lo: int, hi: int) -> torch.Tensor:
        if pooling == POOLING_CLS_POOLER:
            assert self._cls is not None  # adapters that pool so are refused without a pooler
            return self._cls[lo:hi]
        if pooling == POOLING_FIRST:
            assert self._first is not None  # refused where the backbone's heads never read it
            return self._first[lo:hi]
        return self._mean[lo:hi]


class StaticStep:
    """One shape's input and output buffers and its forward; captured in a CUDA graph on
    first use when ``capture`` is set."""

    def __init__(
        self,
        backbone: Backbone,
        memory: AdapterMemory,
        shape: Shape,
        device: str,
        pad_id: int,
        *,
        capture: bool,
        graph_pool: object | None = None,
        capture_stream: "torch.cuda.Stream | None" = None,
    ) -> None:
        self._backbone = backbone
        self._memory = memory
        self.shape = shape
        self._pad_id = pad_id
        self._capture = capture
        self._graph_pool = graph_pool
        self._capture_stream = capture_stream
        self._graph: torch.cuda.CUDAGraph | None = None
        rows, tokens, rank = shape.rows, shape.tokens, shape.rank
        num_modules = len(backbone.linear_names)
        self.ids_and_mask = torch.zeros((2, rows, tokens), dtype=torch.int64, device=device)
        self.row_pages = torch.zeros((rows, rank), dtype=torch.int64, device=device)
        self.row_scale = torch.zeros((num_modules, rows), dtype=memory.dtype, device=device)
        hidden = backbone.hidden_size
        self.mean = torch.zeros((rows, hidden), dtype=memory.dtype, device=device)
        self.first = (
            torch.zeros((rows, hidden), dtype=memory.dtype, device=device)
            if POOLING_FIRST in backbone_poolings(backbone)
            else None
        )
        self.cls = (
            torch.zeros((rows, hidden), dtype=memory.dtype, device=device)
            if backbone.has_pooler
            else None
        )
        self._plan = self._gather_plan()
        self.outputs = StaticOutputs(self.mean, self.first, self.cls)

    def _gather_plan(self) -> LoraStepPlan:
        """Every row one run of the gather kernel at the bucket's rank, on every wrapped
        Linear: which adapter a row has is data in ``row_pages`` and ``row_scale``."""
        rows, rank = self.shape.rows, self.shape.rank
        num_modules = self.row_scale.shape[0]
        pools = self._memory.pools
        return LoraStepPlan(
            num_rows=rows,
            seg_row_starts=torch.tensor([0, rows], dtype=torch.int32),
            seg_pages=torch.zeros((1, rank), dtype=torch.int32),
            seg_rank=torch.full((num_modules, 1), rank, dtype=torch.int32),
            seg_scale=torch.zeros((num_modules, 1)),
            module_active=tuple(p is not None for p in pools),
            pools=pools,
            kernel=GatherBmm(),
            row_pages=self.row_pages,
            row_scale=self.row_scale,
            runs=(RankRun(0, 1, 0, rows, rank),),
        )

    def load(
        self,
        token_ids: Sequence[Sequence[int]],
        seg_starts: Sequence[int],
        residents: Sequence[Resident | None],
    ) -> None:
        """Fill the input buffers for a step of these rows, in segments: segment ``s`` holds
        rows ``seg_starts[s]`` to ``seg_starts[s + 1]``, of ``residents[s]`` (None: rows
        without LoRA). Rows past the real ones attend to their first token only."""
        rows, tokens, rank = self.shape.rows, self.shape.tokens, self.shape.rank
        count = len(token_ids)
        if len(seg_starts) != len(residents) + 1 or (seg_starts and seg_starts[-1] != count):
            raise ValueError(
                f"{count} rows of tokens, segments {list(seg_starts)} of {len(residents)}"
            )
        # whole arrays, not row by row: 128 rows took 0.46 ms of the model thread's Python
        lengths = np.fromiter(map(len, token_ids), dtype=np.int64, count=count)
        present = np.arange(tokens) < lengths[:, None]
        ids = np.full((2, rows, tokens), self._pad_id, dtype=np.int64)
        ids[0, :count][present] = np.fromiter(
            itertools.chain.from_iterable(token_ids), dtype=np.int64, count=int(lengths.sum())
        )
        ids[1] = 0
        ids[1, :count] = present
        ids[1, :, 0] = 1  # a padding row with no token to attend to would give NaN
        # one row per segment, repeated over its rows: a copy of cached arrays per segment
        num_modules = self.row_scale.shape[0]
        seg_pages = np.zeros((len(residents), rank), dtype=np.int64)  # page 0 holds zeros
        seg_scale = np.zeros((len(residents), num_modules), dtype=np.float32)
        for s, resident in enumerate(residents):
            if resident is not None:
                seg_pages[s, : len(resident.page_array)] = resident.page_array
                seg_scale[s] = resident.scale_array
        seg_rows = np.diff(np.asarray(seg_starts, dtype=np.int64))
        pages = np.zeros((rows, rank), dtype=np.int64)
        pages[:count] = np.repeat(seg_pages, seg_rows, axis=0)
        scale = np.zeros((num_modules, rows), dtype=np.float32)
        scale[:, :count] = np.repeat(seg_scale, seg_rows, axis=0).T
        self.ids_and_mask.copy_(torch.from_numpy(ids))
        self.row_pages.copy_(torch.from_numpy(pages))
        self.row_scale.copy_(torch.from_numpy(scale))

    @property
    def is_capturing(self) -> bool:
        """True until this step's graph exists, if it is to be captured at all."""
        return self._capture and self._graph is None

    def run(self) -> StaticOutputs:
        """The forward over the buffers: replayed once captured, else run eagerly (and
        captured first when ``capture`` is set)."""
        if self._graph is not None:
            self._graph.replay()
        elif self._capture:
            self._graph = self._captured()
            self._graph.replay()
        else:
            self._forward()
        return self.outputs

    def _captured(self) -> "torch.cuda.CUDAGraph":
        """Warm up and capture on the runner's one side stream. Not ``torch.cuda.graph``: it
        synchronises and empties the device's and pinned host memory's caching allocators
        before each capture, a cost every step behind a capture in serving waits out."""
        side = self._capture_stream or torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            for _ in range(2):  # cuBLAS workspaces and kernel choices settle before capture
                self._forward()
            # thread_local: a loader thread pinning host memory meanwhile is not an error;
            # graphs share one memory pool, safe since one stream replays them one at a time,
            # and their outputs go to buffers allocated before capture
            graph.capture_begin(pool=self._graph_pool, capture_error_mode="thread_local")
            try:
                self._forward()
            except BaseException:
                with contextlib.suppress(Exception):  # the forward's error is the one to see
                    graph.capture_end()
                raise
            graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        return graph

    def _forward(self) -> None:
        state = self._backbone.lora_state
        outer = state.plan
        state.plan = self._plan
        try:
            input_ids, mask = self.ids_and_mask[0], self.ids_and_mask[1]
            tokens = mask.shape[1]
            attend = mask.bool()[:, None, None, :].expand(-1, 1, tokens, tokens)
            out = self._backbone.model(input_ids=input_ids, attention_mask=attend)
        finally:
            state.plan = outer
        hidden = out.last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        self.mean.copy_((hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0))
        if self.first is not None:
            self.first.copy_(hidden[:, 0])
        if self.cls is not None:
            self.cls.copy_(out.pooler_output)
