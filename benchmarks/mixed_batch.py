"""Mixed-adapter batch throughput: graft against the bare base model, PEFT and merged models.

    python -m benchmarks.mixed_batch              # headline: batch 32 x 64 tokens, N = 1,4,16,32
    python -m benchmarks.mixed_batch --sweep      # and a grid of batch sizes x sequence lengths
    python -m benchmarks.mixed_batch --quick      # tiny smoke configuration (the test runs it)
    python -m benchmarks.mixed_batch --hidden 768 --layers 12 --device cuda  # BERT-base shape

In one process, on the same token ids (real SMS and BBC texts) and the same adapter weights:

- ``base``: the backbone alone (``AutoModel``, a clean copy, no adapters): the ceiling;
- ``graft-<kernel>``: ``ModelRunner.step`` on a prebuilt batch of N resident adapters, for each
  LoRA kernel (``loop``, ``gather``, ``auto``); the step includes padding the token lists, the
  plan, the heads and the softmax, as in serving;
- ``peft``: one ``PeftModel`` holding the adapters, ``adapter_names=[...]`` per row;
- ``merged``: one ``merge_and_unload`` model per adapter, each running its own rows.

Adapters are random PEFT ``SEQ_CLS`` LoRA adapters on every Linear named query, key, value or
dense (the pooler's dense included), written once with ``engine.write_peft_adapter``. The
methods are timed interleaved (one sample of each per round), so load from other processes
falls on all of them alike; on a shared machine ``--threads 1`` still gives steadier ratios, as
OpenMP threads stall whenever another process takes one of their cores.
"""

import argparse
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import common
from benchmarks.mixed_batch_contenders import (
    METHODS,
    MIXED_RANKS,
    UNIFORM_RANKS,
    Contenders,
    Scenario,
    Step,
    Workload,
)
from benchmarks.mixed_batch_report import Result, plot, results_table, summary, summary_table


def run_scenario(
    scenario: Scenario,
    contenders: Contenders,
    texts: Sequence[str],
    args: argparse.Namespace,
) -> list[Result]:
    """Time every method on one scenario, interleaved, and compare their probabilities."""
    work = contenders.workload(scenario, texts)
    steps: dict[str, Step] = {}
    outputs: dict[str, np.ndarray | None] = {}
    for method in args.methods:
        step = contenders.step(method, work)
        if step is not None:
            steps[method] = step
            outputs[method] = step()  # untimed first call: warms up, gives outputs to compare
    timings = common.measure(steps, timing_config(args), common.synchronizer(args.device))
    rate = {m: scenario.batch / t.median_s for m, t in timings.items()}
    print(f"  {scenario.label}: " + "  ".join(f"{m} {r:.1f}" for m, r in rate.items()) + " seq/s")
    reference = next((m for m in ("peft", "merged") if m in timings), None)
    expected = outputs[reference] if reference else None
    return [
        Result(
            scenario=scenario,
            method=method,
            seq_per_s=rate[method],
            timing=timing,
            vs_base=common.ratio(rate[method], rate.get("base")),
            vs_peft=common.ratio(rate[method], rate.get("peft")),
            max_abs_diff=_max_diff(outputs[method], expected) if method != reference else None,
        )
        for method, timing in timings.items()
    ]


def _max_diff(got: np.ndarray | None, expected: np.ndarray | None) -> float | None:
    if got is None or expected is None:
        return None
    return float(np.abs(got - expected).max())


def profile_graft(contenders: Contenders, work: Workload, methods: Sequence[str]) -> None:
    """torch.profiler's top operators for one graft step per kernel: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    for method in (m for m in methods if m.startswith("graft-")):
        step = contenders.step(method, work)
        if step is None:
            continue
        step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
        print(f"\nprofile of one {method} step ({len(work.row_adapters)} rows):")
        table = prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40
        )
        print(table)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32, help="rows per step (headline)")
    p.add_argument("--seq", type=int, default=64, help="tokens per row (headline)")
    p.add_argument("--adapters", type=common.int_list, default=(1, 4, 16, 32), help="N values")
    p.add_argument("--mixed-adapters", type=int, help="N of the mixed-rank run (largest N)")
    p.add_argument("--methods", type=common.names_of(METHODS), default=METHODS)
    p.add_argument("--sweep", action="store_true", help="also run the batch x seq grid")
    p.add_argument("--sweep-batches", type=common.int_list, default=(8, 32, 128))
    p.add_argument("--sweep-seqs", type=common.int_list, default=(32, 64, 128))
    p.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--hidden", type=int, help="random-weight BERT backbone of this width")
    p.add_argument("--layers", type=int, help="random-weight BERT backbone of this depth")
    p.add_argument("--budget-s", type=float, default=2.5, help="timing budget per method")
    p.add_argument("--profile", action="store_true", help="profile one graft step per kernel")
    p.add_argument("--out", type=Path, default=common.DEFAULT_OUT_DIR)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.adapters, args.sweep = 4, 16, (1, 4), False
    return args


def timing_config(args: argparse.Namespace) -> common.TimingConfig:
    if args.quick:
        return common.TimingConfig(warmup=0, min_reps=1, max_reps=1, budget_s=0.0, min_sample_s=0.0)
    return common.TimingConfig(
        warmup=1, min_reps=3, max_reps=25, budget_s=args.budget_s, min_sample_s=0.0
    )


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    """Per shape (the headline first): rank 8 for each N, then one mixed-rank run."""
    shapes = [(args.batch, args.seq)]
    if args.sweep:
        grid = [(b, s) for b in args.sweep_batches for s in args.sweep_seqs]
        shapes += [shape for shape in grid if shape != shapes[0]]
    found: list[Scenario] = []
    for batch, seq in shapes:
        counts = [n for n in args.adapters if n <= batch]
        found += [Scenario(batch, seq, n, UNIFORM_RANKS) for n in counts]
        mixed = min(args.mixed_adapters or max(counts, default=1), batch)
        found.append(Scenario(batch, seq, mixed, MIXED_RANKS))
    return found


def quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet_libraries()
    common.set_threads(args.threads)
    plan = scenarios(args)
    machine = common.machine_info(args.device)
    print(f"machine: {common.describe_machine(machine)}")
    texts = common.real_texts(max(s.batch for s in plan))
    tmp = Path(tempfile.mkdtemp(prefix="graft-bench-"))
    try:
        model_dir = _backbone_dir(args, tmp)
        dtype = getattr(torch, args.dtype)
        contenders = Contenders.build(model_dir, tmp / "adapters", plan, args.device, dtype)
        print(f"backbone: {model_dir} ({contenders.describe()})")
        results = [r for s in plan for r in run_scenario(s, contenders, texts, args)]
        load_note = common.note_load(machine)
        if args.profile:
            largest = max(plan, key=lambda s: (s.ranks == UNIFORM_RANKS, s.num_adapters))
            profile_graft(contenders, contenders.workload(largest, texts), args.methods)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    payload = _report(args, machine, contenders.describe(), results)
    print(load_note)
    return payload


def _backbone_dir(args: argparse.Namespace, tmp: Path) -> Path:
    from engine import packaged_backbone_dir

    if args.hidden is None and args.layers is None:
        return packaged_backbone_dir()
    return common.build_random_backbone(
        tmp / "backbone",
        hidden=args.hidden or 384,
        layers=args.layers or 6,
        tokenizer_dir=packaged_backbone_dir(),
    )


def _report(
    args: argparse.Namespace, machine: dict[str, Any], backbone: str, results: list[Result]
) -> dict[str, Any]:
    rows = summary(results)
    print("\n" + results_table(results))
    print(
        "\nseq/s at the median step, best = at the fastest step; max|dp| = largest difference of "
        "any row's class\nprobabilities from PEFT's (from merged's where PEFT did not run)."
    )
    print("\n" + summary_table(rows))
    png = args.out / "mixed_batch.png"
    payload = {
        "benchmark": "mixed_batch",
        "machine": machine,
        "backbone": backbone,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": [r.as_json() for r in results],
        "summary": rows,
        "plot": str(png) if plot(results, args.batch, args.seq, png) else None,
    }
    common.write_json(args.out / "mixed_batch.json", payload)
    print(f"\nwrote {args.out / 'mixed_batch.json'}; plot: {payload['plot'] or 'no matplotlib'}")
    return payload


if __name__ == "__main__":
    main()
