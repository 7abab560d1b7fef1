"""The LoRA update of one Linear alone, per kernel, against the Linear itself (y = x W^T + b).

    python -m benchmarks.kernels                 # in=out=384 and 768, 32 rows x 64 tokens
    python -m benchmarks.kernels --quick         # tiny smoke configuration (the test runs it)
    python -m benchmarks.kernels --device cuda   # adds the Triton kernel

Methods, all adding the same update ``scale_s * (x_s A_s^T) B_s^T`` for every segment ``s``:

- ``sgmv``: ``kernels.sgmv_lora``, one pair of matmuls per segment over the paged pool;
- ``bgmv``: ``kernels.bgmv_lora``, per-row gathered factors and two batched matmuls;
- ``naive-loop``: per segment, ``index_select`` the rows, two matmuls on the adapter's own
  A and B tensors, ``index_add_`` back (what a straightforward implementation does);
- ``padded-bmm``: every segment padded to the longest, one gather and two ``bmm``;
- ``triton``: ``kernels.triton_sgmv.sgmv_lora_triton`` (``--device cuda`` only).

Segments are over rows (a row's tokens share its adapter). Times are per call; the ratio is
the update's time over the base Linear's on the same ``x``: the fraction LoRA adds to it.
On CUDA each result also carries GB/s: the fewest bytes the operation must move (x read once,
y read and written once, each adapter's A and B rows read once; for the Linear x, W, bias
and y written) over its median time, set against a device-to-device copy measured in the
same run, which is the card's practical bandwidth ceiling.
"""

import argparse
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import common

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

        return lambda: sgmv_lora(y, case.x, case.a_pool, case.b_pool, *_seg_meta(case))
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


def _seg_meta(case: Case) -> tuple[torch.Tensor, ...]:
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
        y, case.x, case.a_pool, case.b_pool, *_seg_meta(case), tiles=tiles
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


@dataclass(frozen=True, slots=True)
class Result:
    hidden: int
    pattern: str
    ranks: str
    num_segments: int
    method: str  # "linear" or one of LORA_METHODS
    timing: common.Timing
    vs_linear: float  # median time over the base Linear's, same hidden size and x
    max_abs_diff: float | None  # against kernels.sgmv_reference (float32); None for linear
    gb_per_s: float  # fewest bytes the operation must move (min_bytes) over the median time

    def as_json(self) -> dict[str, Any]:
        fields = {k: getattr(self, k) for k in self.__slots__ if k != "timing"}
        return {**fields, **self.timing.as_json()}


def run_case(
    case: Case, methods: Sequence[str], timing: common.TimingConfig, sync: Callable[[], None]
) -> list[Result]:
    """Time the base Linear and each LoRA method on one case, interleaved; check each method
    against the float32 reference on the way."""
    from kernels import sgmv_reference

    zeros = torch.zeros(case.x.shape[0], case.hidden, device=case.x.device, dtype=case.x.dtype)
    expected = sgmv_reference(zeros, case.x, case.a_pool, case.b_pool, *_seg_meta(case))
    ops: dict[str, Callable[[], object]] = {"linear": linear_op(case)}
    diffs: dict[str, float | None] = {"linear": None}
    for method in methods:
        y = zeros.clone()
        op = lora_op(method, case, y)
        got = op()  # one call on zeros: the update itself
        got = got if isinstance(got, torch.Tensor) else y
        ops[method], diffs[method] = op, float((got.float() - expected).abs().max())
    timings = common.measure(ops, timing, sync)
    linear_s = timings["linear"].median_s
    lora_bytes, linear_bytes = min_bytes(case)
    return [
        Result(
            hidden=case.hidden,
            pattern=case.pattern,
            ranks=case.ranks,
            num_segments=len(case.sizes),
            method=method,
            timing=t,
            vs_linear=t.median_s / linear_s,
            max_abs_diff=diffs[method],
            gb_per_s=(linear_bytes if method == "linear" else lora_bytes) / t.median_s / 1e9,
        )
        for method, t in timings.items()
    ]


def min_bytes(case: Case) -> tuple[int, int]:
    """Bytes the LoRA update and the base Linear must move at the least, each input read once."""
    size = case.x.element_size()
    tokens = case.x.shape[0]
    ranks = case.seg_rank.tolist()
    adapter_rows = sum(r for r, n in zip(ranks, case.sizes, strict=True) if n)
    lora = (3 * tokens * case.hidden + 2 * adapter_rows * case.hidden) * size
    linear = (2 * tokens * case.hidden + case.hidden * case.hidden + case.hidden) * size
    return lora, linear


def copy_bandwidth(device: str, num_bytes: int = 1 << 30) -> float | None:
    """Device-to-device copy GB/s (bytes read plus written), median of 20: the ceiling."""
    if not device.startswith("cuda"):
        return None
    src = torch.empty(num_bytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for i in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end) / 1000)
    times.sort()
    return 2 * num_bytes / times[len(times) // 2] / 1e9


def run_all(args: argparse.Namespace) -> list[Result]:
    timing, sync = timing_config(args), common.synchronizer(args.device)
    dtype = getattr(torch, args.dtype)
    results: list[Result] = []
    for hidden in args.hidden:
        seen: dict[tuple[int, ...], str] = {}
        for pattern in args.patterns:
            sizes = pattern_sizes(pattern, args.rows)
            if sizes in seen:
                print(f"{pattern}: the same layout as {seen[sizes]} at {args.rows} rows, skipped")
                continue
            seen[sizes] = pattern
            for ranks in RANK_SETS:
                case = make_case(hidden, pattern, ranks, sizes, args.tokens, args.device, dtype)
                found = run_case(case, args.methods, timing, sync)
                results += found
                cells = "  ".join(f"{r.method} {r.timing.median_s * 1e6:.0f}" for r in found)
                print(f"  {hidden} {pattern} {ranks}: {cells} us")
    return results


def results_table(results: Sequence[Result], methods: Sequence[str], gbps: bool = False) -> str:
    """One line per case: each method's time in microseconds and its ratio to the Linear
    (with ``gbps``, also its GB/s)."""
    cases: dict[tuple[int, str, str, int], dict[str, Result]] = {}
    for r in results:
        cases.setdefault((r.hidden, r.pattern, r.ranks, r.num_segments), {})[r.method] = r
    shown = ["linear", *(m for m in methods if any(m in by for by in cases.values()))]
    rows = []
    for (hidden, pattern, ranks, segments), by_method in cases.items():
        cells = [f"{hidden}", pattern, ranks, f"{segments}"]
        for method in shown:
            r = by_method.get(method)
            cells.append("-" if r is None else _cell(r, gbps))
        rows.append(cells)
    headers = ["hidden", "pattern", "ranks", "segs", *(f"{m} us" for m in shown)]
    return common.format_table(headers, rows)


def _cell(r: Result, gbps: bool = False) -> str:
    time_us = f"{r.timing.median_s * 1e6:.0f}"
    rate = f" {r.gb_per_s:.0f}GB/s" if gbps else ""
    if r.method == "linear":
        return time_us + rate
    return f"{time_us} ({common.fmt_ratio(r.vs_linear)}{rate})"


def timing_config(args: argparse.Namespace) -> common.TimingConfig:
    if args.quick:
        return common.TimingConfig(warmup=1, min_reps=1, max_reps=2, budget_s=0.0, min_sample_s=0.0)
    return common.TimingConfig(
        warmup=3, min_reps=5, max_reps=50, budget_s=args.budget_s, min_sample_s=0.005
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--hidden", type=common.int_list, default=(384, 768), help="in = out features of the Linear"
    )
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per row")
    parser.add_argument("--patterns", type=common.names_of(PATTERNS), default=PATTERNS)
    parser.add_argument("--methods", type=common.names_of(LORA_METHODS), default=LORA_METHODS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (all cores)")
    parser.add_argument("--budget-s", type=float, default=0.4, help="timing budget per method")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.rows, args.tokens = (64,), 12, 4
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common.set_threads(args.threads)
    machine = common.machine_info(args.device)
    print(f"machine: {common.describe_machine(machine)}")
    args.methods = without_unavailable(args.methods, args.device)
    results = run_all(args)
    load_note = common.note_load(machine)
    print(
        f"\n{args.rows} rows x {args.tokens} tokens; each cell: median time per call "
        "(its ratio to the base Linear on the same x)"
    )
    ceiling = copy_bandwidth(args.device)
    print(results_table(results, args.methods, gbps=ceiling is not None))
    if ceiling is not None:
        best = max(r.gb_per_s for r in results)
        print(
            f"device-to-device copy: {ceiling:.0f} GB/s (read + write); fastest cell above "
            f"{best:.0f} GB/s = {best / ceiling:.0%} of it"
        )
    worst = max((r.max_abs_diff for r in results if r.max_abs_diff is not None), default=None)
    print(
        f"max |difference| from kernels.sgmv_reference over all cases: {worst:.1e}"
        if worst is not None
        else "no LoRA method ran"
    )
    payload = {
        "benchmark": "kernels",
        "machine": machine,
        "copy_gb_per_s": ceiling,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": [r.as_json() for r in results],
    }
    print(load_note)
    path = args.out / "kernels.json"
    common.write_json(path, payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
