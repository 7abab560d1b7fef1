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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import common
from benchmarks.kernel_cases import (
    LORA_METHODS,
    PATTERNS,
    RANK_SETS,
    Case,
    linear_op,
    lora_op,
    make_case,
    min_bytes,
    pattern_sizes,
    seg_meta,
    without_unavailable,
)


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
    expected = sgmv_reference(zeros, case.x, case.a_pool, case.b_pool, *seg_meta(case))
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
