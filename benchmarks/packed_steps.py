"""Steps of real SMS bursts three ways: padded, packed with one masked attention call, and
packed with each row attending apart (what the lean forward does from a packed length up).

    python -m benchmarks.packed_steps [--rows 4,8,16,32] [--bursts 10] [--threads 1]
        [--quantize int8]

A lightly loaded server's slowest steps are bursts: several SMS of mixed lengths arriving
together, 100-300 tokens in all. Each burst here is ``rows`` texts drawn from the packaged SMS
corpus, over ``--adapters`` adapters, and its step is timed in the three modes alternated,
on the engine's model thread; the table gives medians over the bursts, and the largest
difference of any answer from the padded step's (all three compute the same function).
"""

import argparse
import asyncio
import os
import random
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODES = ("padded", "masked", "apart")


def _bursts(tokenizer, rows: int, count: int, seed: int) -> list[list[list[int]]]:
    from training import load_sms_spam

    texts = [e.text for e in load_sms_spam() if e.text.strip()]
    rng = random.Random(seed * 1000 + rows)
    return [tokenizer(rng.sample(texts, rows))["input_ids"] for _ in range(count)]


def _time_modes(runner, batch, token_ids, repeats: int) -> tuple[dict[str, float], float]:
    """One burst's step in each mode, alternated ``repeats`` times: medians in ms, and the
    largest difference of any probability from the padded step's."""
    import time

    import numpy as np

    from engine import packing

    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    answers: dict[str, list] = {}
    saved = runner.pack_max_tokens, packing._ROWS_APART_MIN_TOKENS
    try:
        for _ in range(repeats):
            for mode in MODES:
                runner.pack_max_tokens = 0 if mode == "padded" else 1 << 20
                packing._ROWS_APART_MIN_TOKENS = 0 if mode == "apart" else 1 << 30
                packed_before = runner.num_packed_steps
                answers[mode] = runner.step(batch, token_ids)  # warm
                if (runner.num_packed_steps > packed_before) != (mode != "padded"):
                    raise RuntimeError(f"a burst's {mode} step ran otherwise: no padding to save")
                start = time.perf_counter()
                runner.step(batch, token_ids)
                times[mode].append((time.perf_counter() - start) * 1000)
    finally:
        runner.pack_max_tokens, packing._ROWS_APART_MIN_TOKENS = saved
    diff = max(
        float(np.abs(got - want).max())
        for mode in MODES
        for got, want in zip(answers[mode], answers["padded"], strict=True)
    )
    return {mode: statistics.median(values) for mode, values in times.items()}, diff


async def run(args: argparse.Namespace, work: Path) -> list[list[object]]:
    """Print the table (a row per burst size) and return its rows."""
    from benchmarks.common import format_table
    from benchmarks.load_fleet import build_fleet
    from engine import Engine, EngineConfig
    from scheduler import Batch

    fleet = build_fleet(work, args.adapters, 1, seed=0)
    config = EngineConfig(
        registry_dir=fleet.registry_dir, num_threads=args.threads, quantize=args.quantize
    )
    async with Engine(config) as engine:
        model = engine._loaded
        if not model.runner.lean or not model.runner.pack_max_tokens:
            raise SystemExit("this backbone is not served packed through the lean forward")

        def on_model(fn, *fn_args):  # as served: the model thread owns the only OpenMP team
            return engine._executor.submit(fn, *fn_args).result()

        keys = []
        for record in engine.registry.list_adapters(fleet.models[0][0]):
            key = f"{record.full_name}@{record.version}"
            on_model(model.memory.acquire, key, lambda r=record: model.store.read(r))
            keys.append(key)
        table = []
        for rows in args.rows:
            medians: dict[str, list[float]] = {mode: [] for mode in MODES}
            tokens, diffs = [], []
            for token_ids in _bursts(model.backbone.tokenizer, rows, args.bursts, args.seed):
                keyed = sorted(
                    zip([keys[i % len(keys)] for i in range(rows)], token_ids, strict=True)
                )
                token_ids = [ids for _, ids in keyed]
                batch = Batch.of([k for k, _ in keyed], [len(ids) for ids in token_ids])
                timed, diff = on_model(_time_modes, model.runner, batch, token_ids, args.repeats)
                diffs.append(diff)
                for mode in MODES:
                    medians[mode].append(timed[mode])
                tokens.append(sum(len(ids) for ids in token_ids))
            step = {mode: statistics.median(values) for mode, values in medians.items()}
            table.append(
                [
                    rows,
                    f"{statistics.median(tokens):.0f} ({min(tokens)}-{max(tokens)})",
                    *(f"{step[mode]:.2f}" for mode in MODES),
                    f"{step['apart'] / step['masked']:.3f}x",
                    f"{step['apart'] / step['padded']:.3f}x",
                    f"{max(diffs):.1e}",
                ]
            )
        headers = ["rows", "tokens (range)", *(f"{m} ms" for m in MODES)]
        headers += ["apart / masked", "apart / padded", "max prob diff"]
        print(format_table(headers, table))
        return table


def main(argv: list[str] | None = None) -> list[list[object]]:
    from benchmarks.common import int_list, serial_torch_here

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int_list, default=(4, 8, 16, 32), help="texts a burst")
    parser.add_argument("--bursts", type=int, default=10, help="bursts per row count")
    parser.add_argument("--repeats", type=int, default=5, help="alternations per burst")
    parser.add_argument("--adapters", type=int, default=8, help="adapters the rows spread over")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--quantize", default="none", help="none or int8 (backbone Linears)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    serial_torch_here()  # fleets here; steps run on the engine's model thread
    with tempfile.TemporaryDirectory(prefix="graft-packed-") as tmp:
        return asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    from benchmarks.common import exit_on_sigterm

    exit_on_sigterm()
    main()
