"""What planning the next step during the last one (EngineConfig.plan_ahead) saves when a step
waits on a device, measured without one.

    python -m benchmarks.plan_ahead [--device-ms 0,2,5] [--requests 3000] [--concurrency 64]
        [--rounds 2]

An embedded engine on a random BERT 64 wide and 2 deep (so the model costs little), scheduled
as a CUDA engine is by default (whole steps, never shrunk or paused, lookahead 64 rows),
serves a closed loop of SMS over 100 adapters. ``--device-ms D`` adds D ms to every step on
the model thread, slept with the interpreter lock released, as a GPU step spends its replay
and its wait for the results: the host's share of a step stays what it is, the device's is
simulated.
Each setting runs with plan-ahead off and on, alternated over ``--rounds``; the report gives
requests a second, rows a step, the share of steps planned ahead, and on / off per setting.
A mechanism check only: the real test is ``bash benchmarks/gpu_run.sh plan-ahead``.
"""

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

TEXT = "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121"


async def _run(fleet, backbone_dir: str, plan_ahead: bool, device_ms: float, args) -> dict:
    from engine import Engine, EngineConfig

    config = EngineConfig(
        registry_dir=fleet.registry_dir,
        backbone_dir=backbone_dir,
        num_threads=1,
        plan_ahead=plan_ahead,
        # the scheduling a CUDA engine gets by default: whole steps, never shrunk or paused
        contended_batch_tokens=None,
        interlude_tokens=0,
        lookahead_rows=64,
    )
    async with Engine(config) as engine:
        runner = engine._loaded.runner
        step = runner.step

        def device_step(*a: Any, **k: Any) -> Any:
            out = step(*a, **k)
            time.sleep(device_ms / 1000)  # the interpreter lock is free meanwhile
            return out

        runner.step = device_step  # type: ignore[method-assign]
        models = fleet.models

        async def client(k: int, n: int) -> None:
            for i in range(n):
                tenant, model = models[(k * 7 + i) % len(models)]
                await engine.classify(tenant, model, [TEXT])

        per_client = max(1, args.requests // args.concurrency)
        await asyncio.gather(*(client(k, 5) for k in range(args.concurrency)))  # warm
        before, started = engine.stats(), time.perf_counter()
        await asyncio.gather(*(client(k, per_client) for k in range(args.concurrency)))
        wall_s, after = time.perf_counter() - started, engine.stats()
    steps = after["steps"] - before["steps"]
    answered = per_client * args.concurrency
    return {
        "requests_per_s": answered / wall_s,
        "rows_per_step": answered / steps,
        "planned_ahead_share": (after["planned_ahead"] - before["planned_ahead"]) / steps,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    from benchmarks.common import random_backbone_dir, serial_torch_here
    from benchmarks.load_fleet import build_fleet

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device-ms", default="0,2,5", help="simulated device ms a step")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    serial_torch_here()
    rows = []
    with tempfile.TemporaryDirectory(prefix="graft-plan-ahead-") as tmp:
        work = Path(tmp)
        backbone_dir = random_backbone_dir(work, 64, 2, default_layers=2)
        fleet = build_fleet(work, 100, 10, backbone_dir=backbone_dir)
        for device_ms in (float(d) for d in args.device_ms.split(",")):
            runs: dict[bool, list[dict]] = {False: [], True: []}
            for _ in range(args.rounds):
                for plan_ahead in (False, True):
                    found = asyncio.run(_run(fleet, backbone_dir, plan_ahead, device_ms, args))
                    runs[plan_ahead].append(found)
            rate = {k: statistics.median(r["requests_per_s"] for r in v) for k, v in runs.items()}
            row = {
                "device_ms": device_ms,
                "off_req_s": [round(r["requests_per_s"]) for r in runs[False]],
                "on_req_s": [round(r["requests_per_s"]) for r in runs[True]],
                "off_rows_per_step": round(
                    statistics.mean(r["rows_per_step"] for r in runs[False]), 1
                ),
                "on_rows_per_step": round(
                    statistics.mean(r["rows_per_step"] for r in runs[True]), 1
                ),
                "on_planned_ahead": round(
                    statistics.mean(r["planned_ahead_share"] for r in runs[True]), 2
                ),
                "on_over_off": round(rate[True] / rate[False], 3),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
