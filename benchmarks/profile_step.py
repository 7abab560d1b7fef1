"""Where one engine step spends its time: the host-side cost per step, for finding overhead.

    python -m benchmarks.profile_step [--device cuda] [--dtype bfloat16] [--rows 1,32]
        [--quantize int8]

On a GPU a small step is bound by the host (Python, and one launch per device op), not by the
device: this prints, per batch size, the step time, the device ops launched per step (the
torch profiler's aten calls, graft against the bare forward of the same backbone), and the
Python functions that take the most time over a number of steps (cProfile, by own time).
"""

import argparse
import asyncio
import cProfile
import io
import itertools
import os
import pstats
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = "Your parcel is waiting, confirm delivery at the link before it is returned"


def _aten_calls(fn, repeats: int) -> dict[str, float]:
    """Aten calls per run of ``fn``, by op name."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    return {e.key: e.count / repeats for e in prof.key_averages() if e.key.startswith("aten::")}


def _print_op_diff(step: dict[str, float], bare: dict[str, float], top: int) -> None:
    """The ops a step calls more often than the bare forward: where graft's launches go."""
    extra = sorted(
        ((step.get(k, 0) - bare.get(k, 0), k) for k in step.keys() | bare.keys()), reverse=True
    )
    print("  aten calls per step over the bare forward:")
    for more, key in extra[:top]:
        if more:
            print(f"  {more:+8.1f}  {key}")


def _compare_forward(runner, model, on_model, step, sync, repeats: int, rounds: int = 5) -> None:
    """The step through the lean forward (engine/lean_encoder.py) and through the model's own,
    alternated ``rounds`` times: medians of both, measured together."""
    lean = runner._encode
    if not runner.lean:
        print("  the model's own forward serves this backbone: nothing to compare")
        return
    times: dict[str, list[float]] = {"lean": [], "own": []}
    try:
        for _ in range(rounds):
            for name, encode in (("lean", lean), ("own", model)):
                runner._encode = encode
                times[name].append(on_model(_time_ms, step, sync, repeats))
    finally:
        runner._encode = lean
    lean_ms, own_ms = (statistics.median(times[k]) for k in ("lean", "own"))
    print(
        f"  step through the lean forward {lean_ms:.2f} ms, through the model's own "
        f"{own_ms:.2f} ms: {lean_ms / own_ms:.3f}x (medians of {rounds} alternations)"
    )


def _time_ms(fn, sync, repeats: int) -> float:
    for _ in range(3):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats * 1000


def _profiled(fn, sync, repeats: int) -> cProfile.Profile:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(repeats):
        fn()
    sync()
    profiler.disable()
    return profiler


async def profile(args: argparse.Namespace, work: Path) -> None:
    import torch

    from benchmarks.common import random_backbone_dir
    from benchmarks.load_fleet import build_fleet
    from engine import Engine, EngineConfig
    from scheduler import Batch

    backbone_dir = random_backbone_dir(
        work, args.hidden, args.layers, default_layers=12, layout=args.layout
    )
    fleet = build_fleet(work, max(args.adapters), 1, seed=0, backbone_dir=backbone_dir)
    config = EngineConfig(
        registry_dir=fleet.registry_dir,
        backbone_dir=backbone_dir,
        device=args.device,
        num_threads=args.threads,
        dtype=args.dtype,
        quantize=args.quantize,
        lora_kernel=args.kernel,
        cuda_graphs=args.cuda_graphs,
    )
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    async with Engine(config) as engine:
        model = engine._loaded

        def on_model(fn, *args):  # as served: the model thread owns the only OpenMP team
            return engine._executor.submit(fn, *args).result()

        records = [r for r in engine.registry.list_adapters(fleet.models[0][0])]
        keys = []
        for record in records:
            key = f"{record.full_name}@{record.version}"
            on_model(model.memory.acquire, key, lambda r=record: model.store.read(r))
            keys.append(key)
        ids = model.backbone.tokenizer(TEXT)["input_ids"]
        backbone = model.backbone.model
        for rows, num_adapters in itertools.product(args.rows, args.adapters):
            keys_of_rows = sorted(keys[i % num_adapters] for i in range(rows))
            batch = Batch.of(keys_of_rows, [len(ids)] * rows)
            segs = batch.seg_adapter

            def step(batch=batch, rows=rows) -> None:
                model.runner.step(batch, [ids] * rows)

            input_ids = torch.tensor([ids] * rows, device=args.device)
            mask = torch.ones_like(input_ids)

            def bare(input_ids=input_ids, mask=mask) -> None:
                with torch.inference_mode():
                    backbone(input_ids=input_ids, attention_mask=mask)

            step_ms, bare_ms = (
                on_model(_time_ms, step, sync, args.repeats),
                on_model(_time_ms, bare, sync, args.repeats),
            )
            step_ops, bare_ops = on_model(_aten_calls, step, 5), on_model(_aten_calls, bare, 5)
            print(
                f"\n{rows} rows x {len(ids)} tokens, {len(segs)} adapters: step {step_ms:.2f} ms "
                f"({sum(step_ops.values()):.0f} aten calls), bare forward {bare_ms:.2f} ms "
                f"({sum(bare_ops.values()):.0f} aten calls)"
            )
            if args.compare_forward:
                _compare_forward(model.runner, backbone, on_model, step, sync, args.repeats)
            if args.ops:
                _print_op_diff(step_ops, bare_ops, args.ops)
            if args.top < 1:  # timings only
                continue
            profiler = on_model(_profiled, step, sync, args.repeats)
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
            print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[-4000:])


def main(argv: list[str] | None = None) -> None:
    from benchmarks.common import RANDOM_LAYOUTS, serial_torch_here

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--quantize", default="none", help="none or int8 (backbone Linears)")
    parser.add_argument("--rows", default="1,32", help="batch sizes, comma-separated")
    parser.add_argument(
        "--adapters", default="8", help="distinct adapters in a batch, comma-separated"
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--kernel",
        default="auto",
        help="LoRA kernel: auto, loop, gather, triton or triton-fused",
    )
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="steps captured in CUDA graphs and replayed (EngineConfig.cuda_graphs; default: "
        "the engine's, on with CUDA)",
    )
    parser.add_argument(
        "--compare-forward",
        action="store_true",
        help="also time each step through the model's own forward, alternated with the lean one",
    )
    parser.add_argument(
        "--ops", type=int, default=0, help="list this many ops a step calls more than bare"
    )
    parser.add_argument(
        "--hidden", type=int, default=None, help="a random-weight BERT of this width instead"
    )
    parser.add_argument("--layers", type=int, default=None, help="its layers (default 12)")
    parser.add_argument(
        "--layout",
        choices=RANDOM_LAYOUTS,
        default="bert",
        help="the random encoder's module tree (with --hidden): BERT's or DistilBERT's",
    )
    parser.add_argument(
        "--top", type=int, default=15, help="functions listed per batch size (0: timings only)"
    )
    args = parser.parse_args(argv)
    if (args.layers is not None or args.layout != "bert") and args.hidden is None:
        parser.error("--layers and --layout need --hidden")
    args.rows = [int(r) for r in args.rows.split(",")]
    args.adapters = [int(n) for n in args.adapters.split(",")]
    serial_torch_here()  # fleets and tensors here; steps run on the engine's model thread
    with tempfile.TemporaryDirectory(prefix="graft-profile-") as tmp:
        asyncio.run(profile(args, Path(tmp)))


if __name__ == "__main__":
    from benchmarks.common import exit_on_sigterm

    exit_on_sigterm()
    main()
