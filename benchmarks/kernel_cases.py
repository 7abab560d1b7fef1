"""The LoRA update's benchmark cases: segment patterns, the inputs built for them, and each
method's operation on a case (``benchmarks.kernels`` times them)."""

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

MIXED_RANK_CYCLE = (64, 4, 16, 8, 32)
RANK_SETS = ("r8", "r4-64")
LORA_METHODS = ("sgmv", "bgmv", "naive-loop", "padded-bmm", "triton")
ZIPF_ADAPTERS = 8
ALPHA = 16.0


def pattern_sizes(pattern: str, num_rows: int) -> tuple[int, ...]:
    """Rows per segment for a named traffic pattern."""
    if pattern == "one":
        return (num_rows,)
    if pattern == "distinct":
        return (1,) * num_rows
    if pattern.startswith("uniform-"):
        groups = min(int(pattern.removeprefix("uniform-")), num_rows)
        return tuple(num_rows // groups + (g < num_rows % groups) for g in range(groups))
    if pattern == "zipf":
        return _zipf(num_rows, min(ZIPF_ADAPTERS, num_rows))
    raise ValueError(f"unknown pattern {pattern!r}")


def _zipf(num_rows: int, groups: int) -> tuple[int, ...]:
    """Rows split 1/k over k = 1..groups (largest remainder, one row at least each)."""
    weights = [1 / k for k in range(1, groups + 1)]
    shares = [num_rows * w / sum(weights) for w in weights]
    sizes = [max(1, int(s)) for s in shares]
    by_remainder = sorted(range(groups), key=lambda g: int(shares[g]) - shares[g])
    for g in by_remainder[: num_rows - sum(sizes)]:
        sizes[g] += 1
    while sum(sizes) > num_rows:
        sizes[sizes.index(max(sizes))] -= 1
    return tuple(sizes)


PATTERNS = ("one", "uniform-4", "uniform-16", "zipf", "distinct", "uniform-32")


@dataclass(frozen=True, slots=True)
class Case:
    """One Linear, one batch of tokens, one segment layout: the inputs every method shares."""

    hidden: int  # in == out features
    pattern: str
    ranks: str  # one of RANK_SETS
    sizes: tuple[int, ...]  # rows per segment
    tokens_per_row: int
    x: torch.Tensor  # [N, hidden], N = rows * tokens_per_row
    weight: torch.Tensor  # [hidden, hidden], the base Linear
    bias: torch.Tensor  # [hidden]
    a_pool: torch.Tensor  # [P, hidden], page 0 zero
    b_pool: torch.Tensor  # [P, hidden]
    seg_starts: torch.Tensor  # int32 [S + 1], token offsets
    seg_pages: torch.Tensor  # int32 [S, R]
    seg_rank: torch.Tensor  # int32 [S]
    seg_scale: torch.Tensor  # float32 [S]
    row_pages: torch.Tensor  # int64 [B, R], the segment's pages per row
    row_scale: torch.Tensor  # [B] in x's dtype

    @property
    def num_rows(self) -> int:
        return sum(self.sizes)


def make_case(
    hidden: int,
    pattern: str,
    ranks: str,
    sizes: tuple[int, ...],
    tokens_per_row: int,
    device: str,
    dtype: torch.dtype,
) -> Case:
    gen = torch.Generator().manual_seed(hidden + len(sizes))
    seg_ranks = [
        8 if ranks == "r8" else MIXED_RANK_CYCLE[s % len(MIXED_RANK_CYCLE)]
        for s in range(len(sizes))
    ]
    num_pages = 1 + sum(seg_ranks)
    pages = torch.zeros(len(sizes), max(seg_ranks), dtype=torch.int32)
    first = 1  # contiguous pages per adapter: the allocator's usual case
    for s, rank in enumerate(seg_ranks):
        pages[s, :rank] = torch.arange(first, first + rank, dtype=torch.int32)
        first += rank
    pools = torch.randn(2, num_pages, hidden, generator=gen) * 0.05
    pools[:, 0] = 0.0
    starts = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32)
    scales = torch.tensor([ALPHA / r for r in seg_ranks], dtype=torch.float32)
    lengths = torch.tensor(sizes)
    num_tokens = sum(sizes) * tokens_per_row

    def put(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, dtype if t.is_floating_point() else t.dtype)

    return Case(
        hidden=hidden,
        pattern=pattern,
        ranks=ranks,
        sizes=sizes,
        tokens_per_row=tokens_per_row,
        x=put(torch.randn(num_tokens, hidden, generator=gen)),
        weight=put(torch.randn(hidden, hidden, generator=gen) * hidden**-0.5),
        bias=put(torch.zeros(hidden)),
        a_pool=put(pools[0]),
        b_pool=put(pools[1]),
        seg_starts=put(starts * tokens_per_row),
        seg_pages=put(pages),
        seg_rank=put(torch.tensor(seg_ranks, dtype=torch.int32)),
        seg_scale=scales.to(device),
        row_pages=put(pages.long().repeat_interleave(lengths, dim=0)),
        row_scale=put(scales.repeat_interleave(lengths)),
    )


def linear_op(case: Case) -> Callable[[], object]:
    return lambda: torch.nn.functional.linear(case.x, case.weight, case.bias)


def lora_op(method: str, case: Case, y: torch.Tensor) -> Callable[[], object]:
    """The update of ``method`` into ``y`` as a no-argument call."""
    if method == "sgmv":
        from kernels import sgmv_lora

        return lambda: sgmv_lora(y, case.x, case.a_pool, case.b_pool, *seg_meta(case))
    if method == "bgmv":
        from kernels import bgmv_lora

        y3 = y.view(case.num_rows, case.tokens_per_row, -1)
        x3 = case.x.view(case.num_rows, case.tokens_per_row, -1)
        return lambda: bgmv_lora(y3, x3, case.a_pool, case.b_pool, case.row_pages, case.row_scale)
    if method == "naive-loop":
        return _naive_loop(case, y)
    if method == "padded-bmm":
        return _padded_bmm(case, y)
    if method == "triton":
        return _triton(case, y)
    raise ValueError(f"unknown method {method!r}")


def seg_meta(case: Case) -> tuple[torch.Tensor, ...]:
    return case.seg_starts, case.seg_pages, case.seg_rank, case.seg_scale


def _naive_loop(case: Case, y: torch.Tensor) -> Callable[[], None]:
    """Per segment: gather its tokens, two matmuls on its own factors, scatter-add back."""
    starts = case.seg_starts.tolist()
    segments = []
    for s, rank in enumerate(case.seg_rank.tolist()):
        pages = case.seg_pages[s, :rank].long()
        index = torch.arange(starts[s], starts[s + 1], device=case.x.device)
        a = case.a_pool[pages]  # [r, in], a copy: the adapter's own tensor, not a pool view
        b = case.b_pool[pages].t().contiguous()  # [out, r], as PEFT stores lora_B
        segments.append((index, a, b, float(case.seg_scale[s])))

    def run() -> None:
        for index, a, b, scale in segments:
            rows = case.x.index_select(0, index)
            y.index_add_(0, index, (rows @ a.t()) @ b.t(), alpha=scale)

    return run


def _padded_bmm(case: Case, y: torch.Tensor) -> Callable[[], None]:
    """Every segment padded to the longest (tokens) and the largest rank, then two bmm."""
    device = case.x.device
    longest = max(case.sizes) * case.tokens_per_row
    starts = case.seg_starts.tolist()
    index = torch.zeros(len(case.sizes), longest, dtype=torch.long)
    valid = torch.zeros(len(case.sizes), longest, dtype=torch.bool)
    for s in range(len(case.sizes)):
        count = starts[s + 1] - starts[s]
        index[s, :count] = torch.arange(starts[s], starts[s + 1])
        valid[s, :count] = True
    index, valid = index.to(device), valid.to(device)
    targets = index[valid]
    pages = case.seg_pages.long()
    scale = case.seg_scale.to(case.x.dtype).view(-1, 1, 1)

    def run() -> None:
        xs = case.x[index]  # [S, L, in], padding rows repeat token 0 and are dropped below
        shrunk = torch.bmm(xs, case.a_pool[pages].transpose(1, 2)).mul_(scale)
        out = torch.bmm(shrunk, case.b_pool[pages])  # [S, L, out]
        y.index_add_(0, targets, out[valid])

    return run


def _triton(case: Case, y: torch.Tensor) -> Callable[[], object]:
    from kernels.triton_sgmv import sgmv_lora_triton, tile_map

    # the tile map is built once per step in the engine (engine/lora_triton.py): so here too
    tiles = tile_map(case.seg_starts, case.x.shape[0])
    return lambda: sgmv_lora_triton(
        y, case.x, case.a_pool, case.b_pool, *seg_meta(case), tiles=tiles
    )


def without_unavailable(methods: Sequence[str], device: str) -> tuple[str, ...]:
    """Drop (and say so) the methods this machine cannot run: Triton needs CUDA."""
    if "triton" not in methods:
        return tuple(methods)
    if not device.startswith("cuda"):
        reason = "needs --device cuda"
    elif importlib.util.find_spec("kernels.triton_sgmv") is None:
        reason = "kernels/triton_sgmv.py is not there"
    else:
        return tuple(methods)
    print(f"triton: skipped ({reason})")
    return tuple(m for m in methods if m != "triton")


def min_bytes(case: Case) -> tuple[int, int]:
    """Bytes the LoRA update and the base Linear must move at the least, each input read once."""
    size = case.x.element_size()
    tokens = case.x.shape[0]
    ranks = case.seg_rank.tolist()
    adapter_rows = sum(r for r, n in zip(ranks, case.sizes, strict=True) if n)
    lora = (3 * tokens * case.hidden + 2 * adapter_rows * case.hidden) * size
    linear = (2 * tokens * case.hidden + case.hidden * case.hidden + case.hidden) * size
    return lora, linear
