"""Noisy neighbour: while tenant A floods the engine, does tenant B's latency hold?

    python -m benchmarks.noisy_neighbor [--mode embedded|http|both] [--duration 20]
        [--contended-batch-tokens N] [--interlude-tokens N] [--max-batch-tokens N]
        [--a-step-tokens N]
        [--queue-rows 256] [--contended-first] [--threads N] [--quick] [--out DIR]

Two tenants share one engine, each with its own random rank-8 adapter (LoRA on every encoder
linear, as ``graft train`` makes them). Per mode (``embedded``: ``Engine.classify`` in this
process; ``http``: the aiohttp server started in this process on 127.0.0.1, port 0, and an
``aiohttp.ClientSession`` over loopback):

1. Step probes, on the idle engine: one request that runs as one step, of 1 short row and of 1,
   a contended budget's and a full budget's worth of A's 512-token rows: what a step costs.
2. Capacity: B-style requests (one real SMS text each), closed loop at each of
   ``--capacity-concurrency`` levels after a warm-up; the best answered requests/s.
3. For the fair scheduler, then one FIFO (``EngineConfig(is_fair=False)``, the baseline), each
   on a fresh engine (a fresh server in HTTP mode):
   a. B alone: open loop, Poisson arrivals at ``--load`` (0.3) x capacity for ``--duration``
      seconds. Latency counts from each request's *scheduled* arrival, so a late sender hides
      no queueing. A request unanswered ``--drain`` seconds after the last arrival has failed.
   b. B with the same arrival schedule while A floods (``--contended-first`` swaps a and b,
      so B has no served history on this engine when A arrives).

A's budget is its queue bound: ``tenant_max_queued_rows`` = ``--queue-rows`` (256) inputs may
wait (the bound is the engine default, so B has it too). "A floods at 10x its budget"
(``--flood 10``) means A asks for 10 x 256 inputs at all times: 10 x 256 / 128 = 20 loops, each
keeping one request of 128 BBC articles (``load_bbc_news(max_chars=5000)``, each at least 512
tokens, cut by the engine to the backbone's 512) in flight, re-submitted as soon as it is
answered or refused. After a 429/503 a loop sleeps the Retry-After hint capped at
``--retry-cap`` s (jittered), so the flood never stops. B starts once A has been refused once
(its queue is full), or after ``--head-start`` s. ``--a-step-tokens`` also gives A alone a
per-step token budget (``TenantPolicy.max_tokens_per_step``; FIFO ignores it).

Reported for A: inputs/s the engine ran for it (its counters, over the flooded phase), its 429s,
and the most rows it had admitted but not yet run, sampled every 20 ms: more than
``--queue-rows`` means admission let in more than the bound.

Outputs: a table on stdout and ``benchmarks/out/noisy_neighbor.json``. The target (the issue's):
B's success 100% and B's contended p99 at most 2x its solo p99, both measured in the same run.
"""

import argparse
import asyncio
import contextlib
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.common import (  # noqa: E402
    DEFAULT_OUT_DIR,
    int_list,
    machine_info,
    ratio,
    write_json,
)
from benchmarks.neighbor_clients import Client, open_client  # noqa: E402
from benchmarks.neighbor_load import (  # noqa: E402
    flooding,
    measure_capacity,
    open_loop,
    probe_steps,
)
from benchmarks.neighbor_report import HEADERS, print_report, table_rows  # noqa: E402
from benchmarks.neighbor_workload import MODELS, Workload, build_workload  # noqa: E402
from engine import Engine, EngineConfig, TenantPolicy  # noqa: E402

# phases ----------------------------------------------------------------------------------


async def _settle(client: Client, engine: Engine, workload: Workload, timeout_s: float) -> None:
    """Wait until nothing is queued, then for one B request: it runs after the step in flight."""
    deadline_s = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline_s:
        stats = engine.stats()
        if stats["waiting_rows"] == 0 and stats["requests_in_flight"] == 0:
            break
        await asyncio.sleep(0.05)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(client.classify("b", workload.b_texts[:1]), timeout_s)


def _tenant_deltas(before: dict, after: dict) -> dict:
    return {
        tenant: {k: v - before.get(tenant, {}).get(k, 0) for k, v in counters.items()}
        for tenant, counters in after.items()
    }


async def run_phase(client, engine, workload, args, b_rate_per_s, *, is_flooded) -> dict:
    """B's open loop, alone or under A's flood; engine counters are deltas over the phase."""
    tenants_before, stats_before = engine.tenant_stats(), engine.stats()
    started = time.perf_counter()
    async with contextlib.AsyncExitStack() as stack:
        tally = None
        if is_flooded:
            tally = await stack.enter_async_context(flooding(client, engine, workload, args))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tally.refused.wait(), args.head_start)
        b = await open_loop(client, workload.b_texts, b_rate_per_s, args, seed=1)
    elapsed_s = time.perf_counter() - started
    tenants = _tenant_deltas(tenants_before, engine.tenant_stats())
    stats = engine.stats()
    steps, rows = stats["steps"] - stats_before["steps"], stats["rows"] - stats_before["rows"]
    await _settle(client, engine, workload, args.drain)
    result: dict[str, Any] = {
        "b": b,
        "elapsed_s": round(elapsed_s, 2),
        "engine": {
            "steps": steps,
            "rows": rows,
            "rows_per_step": round(rows / max(steps, 1), 2),
            "interludes": stats.get("interludes", 0) - stats_before.get("interludes", 0),
        },
        "tenants": tenants,
    }
    if tally is not None:
        a_run_rows = tenants.get("a", {}).get("run_rows", 0)
        result["a"] = {
            "inputs_served_per_s": round(a_run_rows / elapsed_s, 2),
            "inputs_answered": tally.num_inputs_answered,
            "max_queued_rows": tally.max_queued_rows,
            "statuses": dict(tally.statuses),
        }
        # the flood keeps the engine busy throughout, so wall time / steps is a step's cost
        result["engine"]["ms_per_step_saturated"] = round(1000 * elapsed_s / max(steps, 1), 2)
    return result


def engine_config(workload: Workload, args, *, is_fair: bool) -> EngineConfig:
    return EngineConfig(
        registry_dir=workload.registry_dir,
        num_threads=args.threads,
        max_batch_tokens=args.max_batch_tokens,
        contended_batch_tokens=args.contended_batch_tokens,
        interlude_tokens=args.interlude_tokens,
        tenant_max_queued_rows=args.queue_rows,
        is_fair=is_fair,
    )


async def run_mode(mode: str, workload: Workload, args) -> dict:
    """Probes and capacity on the fair engine, then B solo and contended, fair then FIFO."""
    result: dict[str, Any] = {"load_average_1m_before": round(os.getloadavg()[0], 2)}
    for scheduler, is_fair in (("fair", True), ("fifo", False)):
        config = engine_config(workload, args, is_fair=is_fair)
        async with open_client(mode, config, workload) as (client, engine):
            if args.a_step_tokens:
                policy = TenantPolicy(
                    max_tokens_per_step=args.a_step_tokens, max_queued_rows=args.queue_rows
                )
                engine.set_tenant_policy("a", policy)
            for tenant in MODELS:  # page both adapters in, warm the path
                await client.classify(tenant, (workload.b_texts[0],))
            if "capacity" not in result:
                result["step_probes"] = await probe_steps(engine, workload, args)
                result["capacity"] = await measure_capacity(client, workload.b_texts, args)
                capacity = result["capacity"]["requests_per_s"]
                result["b_rate_per_s"] = round(args.load * capacity, 2)
            rate = max(result["b_rate_per_s"], 0.5)
            phases = {}
            for is_flooded in (True, False) if args.contended_first else (False, True):
                phases[is_flooded] = await run_phase(
                    client, engine, workload, args, rate, is_flooded=is_flooded
                )
            solo, contended = phases[False], phases[True]
        result[scheduler] = {
            "solo": solo,
            "contended": contended,
            "p50_ratio": ratio(contended["b"]["p50_ms"], solo["b"]["p50_ms"]),
            "p99_ratio": ratio(contended["b"]["p99_ms"], solo["b"]["p99_ms"]),
        }
    result["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("embedded", "http", "both"), default="embedded")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of B arrivals")
    parser.add_argument("--drain", type=float, default=20.0, help="seconds B may still wait")
    parser.add_argument("--load", type=float, default=0.3, help="B's rate / capacity")
    parser.add_argument("--flood", type=float, default=10.0, help="A's demand / queue bound")
    parser.add_argument("--a-inputs", type=int, default=128, help="inputs per A request")
    parser.add_argument("--queue-rows", type=int, default=256, help="tenant_max_queued_rows")
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--contended-batch-tokens", type=int, default=512)
    parser.add_argument(
        "--interlude-tokens", type=int, default=256, help="engine's interlude budget (0: off)"
    )
    parser.add_argument("--a-step-tokens", type=int, default=None, help="A's tokens per step")
    parser.add_argument(
        "--contended-first",
        action="store_true",
        help="flood before B's solo phase, so B has no served history when A arrives",
    )
    parser.add_argument("--retry-cap", type=float, default=0.5, help="max s A waits after 429")
    parser.add_argument("--head-start", type=float, default=2.0, help="max s A floods first")
    parser.add_argument("--capacity-concurrency", type=int_list, default=(4, 16, 64))
    parser.add_argument("--capacity-duration", type=float, default=3.0, help="s per level")
    parser.add_argument("--capacity-warmup", type=float, default=1.0)
    parser.add_argument("--max-b-requests", type=int, default=20000, help="per phase")
    parser.add_argument("--num-b-texts", type=int, default=2000)
    parser.add_argument("--probe-reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--quick", action="store_true", help="tiny configuration for tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.drain, args.head_start, args.max_b_requests = 1.0, 2.0, 0.5, 40
        args.a_inputs, args.queue_rows, args.num_b_texts, args.probe_reps = 4, 8, 200, 1
        args.capacity_concurrency, args.capacity_duration, args.capacity_warmup = (4, 16), 0.5, 0.2
    args.a_loops = max(1, math.ceil(args.flood * args.queue_rows / args.a_inputs))
    return args


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.common import serial_torch_here

    serial_torch_here()  # the engine's model thread keeps the only OpenMP team
    args = parse_args(argv)
    modes = ("embedded", "http") if args.mode == "both" else (args.mode,)
    with tempfile.TemporaryDirectory(prefix="graft-noisy-") as tmp:
        workload = build_workload(Path(tmp), args)
        config = engine_config(workload, args, is_fair=True)
        results = {mode: asyncio.run(run_mode(mode, workload, args)) for mode in modes}
    payload = {
        "machine": machine_info(config.device),
        "config": {
            "max_batch_tokens": config.max_batch_tokens,
            "max_batch_rows": config.max_batch_rows,
            "contended_batch_tokens": config.contended_budget_tokens,
            "interlude_tokens": config.interlude_budget_tokens,
            "tenant_max_queued_rows": config.tenant_max_queued_rows,
            "max_queued_rows": config.max_queued_rows,
            "a_max_tokens_per_step": args.a_step_tokens,
            "a_inputs_per_request": args.a_inputs,
            "a_row_tokens": workload.a_row_tokens,
            "a_loops": args.a_loops,
            "flood_x_budget": args.flood,
            "b_load": args.load,
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
        "table": {"headers": list(HEADERS), "rows": table_rows(results)},
    }
    print_report(payload)
    write_json(args.out / "noisy_neighbor.json", payload)
    return payload


if __name__ == "__main__":
    from benchmarks.common import exit_on_sigterm

    exit_on_sigterm()
    main()
