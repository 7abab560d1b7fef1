"""CPU time per request of graft's HTTP server process, split by thread: the event loop (where
every request is parsed, authenticated, resolved, tokenized and answered) and the model thread.

    python -m benchmarks.server_cpu [--requests 3000] [--concurrency 32] [--quantize int8]
        [--embedded] [--device cuda --quantize none] [--server-workers N]
        [--hidden 64 --layers 2]

``--embedded`` measures the engine in this process instead, called as an embedding
application calls it: the event loop's share is then the engine's front end alone
(resolution, tokenization, admission, delivery) plus the closed loop's own small cost.

A closed loop of ``--concurrency`` clients sends one SMS per request over keep-alive
connections to a server in its own process (as deployed), after ``--warmup`` requests; the
server's threads' CPU times come from ``/proc`` before and after (Linux only). The event loop
shares the interpreter lock with the model thread, so its microseconds per request are what
the HTTP path costs the model on a small machine, and what caps one process on a fast one.
``--server-workers N`` runs the server with N front-end processes (``graft serve --workers``);
their CPU per request is reported beside the engine process's threads. ``--hidden 64
--layers 2`` serves a random-weight BERT that small, so that the front end, not the model,
bounds the server, as on a GPU.
"""

import argparse
import asyncio
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

TEXT = "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121"


def front_end_cpu_s(pid: int) -> dict[int, float]:
    """User + system CPU seconds of each front-end process (``server.frontend``) of ``pid``."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for child in os.listdir("/proc"):
        if not child.isdigit():
            continue
        try:
            with open(f"/proc/{child}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{child}/cmdline", "rb") as f:
                command = f.read()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid and b"server.frontend" in command:
            out[int(child)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def thread_cpu_s(pid: int) -> dict[int, float]:
    """User + system CPU seconds of each thread of ``pid``."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def fleet_and_options(args: argparse.Namespace, work: Path, **extra: Any):
    """The scratch registry (on ``--hidden``'s random BERT, if given) and the target options
    of ``args``, with ``extra`` options; shared with benchmarks.server_profile."""
    from benchmarks.common import random_backbone_dir
    from benchmarks.load_fleet import build_fleet
    from benchmarks.load_targets import TargetOptions

    backbone_dir = random_backbone_dir(work, args.hidden, args.layers, default_layers=2)
    fleet = build_fleet(work, args.adapters, args.tenants, backbone_dir=backbone_dir)
    options = TargetOptions(
        threads=args.threads,
        plan_ahead=getattr(args, "plan_ahead", None),  # server_profile has no such flag
        switch_interval_ms=getattr(args, "switch_interval_ms", None),
        quantize=args.quantize,
        device=args.device,
        backbone_dir=backbone_dir,
        **extra,
    )
    return fleet, options


async def measure_embedded(args: argparse.Namespace, work: Path) -> dict[str, float]:
    """The same closed loop against an Engine in this process: its event loop is this thread."""
    import time

    from benchmarks.load_targets import open_target
    from benchmarks.open_loop import closed_loop

    fleet, options = fleet_and_options(args, work, timeout_s=None)
    requests = [(i % len(fleet.models), (TEXT,)) for i in range(args.requests)]
    async with open_target("embedded", fleet, options) as target:
        await closed_loop(target, requests[: args.warmup], concurrency=args.concurrency)
        before = await target.counters()
        loop_before = time.thread_time()
        answered, wall_s = await closed_loop(target, requests, concurrency=args.concurrency)
        loop_s = time.thread_time() - loop_before
        after = await target.counters()
    if answered != args.requests:
        raise RuntimeError(f"{args.requests - answered} of {args.requests} requests failed")
    num_steps = after["steps"] - before["steps"]
    per_request = 1e6 / args.requests
    return {
        "requests_per_s": args.requests / wall_s,
        "rows_per_step": args.requests / num_steps if num_steps else 0.0,
        "event_loop_us": loop_s * per_request,
        "model_thread_us": (after["step_cpu_us"] - before["step_cpu_us"]) / args.requests,
        "other_threads_us": 0.0,  # not measured in process: loaders and tokenizers are idle
        "front_ends_us": 0.0,
    }


@contextlib.asynccontextmanager
async def warm_server(fleet, options, requests: list, args: argparse.Namespace):
    """graft's server over ``fleet`` in its own process, and an HTTP target on
    ``args.concurrency`` keep-alive connections, warmed with ``requests[: args.warmup]``:
    yields (server process, aiohttp session, URL, target); the server stops on the way out."""
    import aiohttp

    from benchmarks.load_server_process import ServerProcess
    from benchmarks.load_targets import HttpTarget
    from benchmarks.open_loop import closed_loop
    from engine.collector import freeze_startup_objects, release_startup_objects

    server = ServerProcess("serve", fleet, options)
    url = await asyncio.to_thread(server.start)
    try:
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            target = HttpTarget("serve", session, url, fleet.models, fleet.keys, timeout_s=None)
            await closed_loop(target, requests[: args.warmup], concurrency=args.concurrency)
            # the client holds torch and the fleet: unfrozen, a full collection of them
            # stops it for a quarter of a second (benchmarks/load_sweep.py's _freeze)
            freeze_startup_objects()
            try:
                yield server, session, url, target
            finally:
                release_startup_objects()
    finally:
        await asyncio.to_thread(server.stop)


async def measure(args: argparse.Namespace, work: Path) -> dict[str, float]:
    from benchmarks.load_server_process import read_metrics
    from benchmarks.open_loop import closed_loop

    fleet, options = fleet_and_options(args, work, server_workers=args.server_workers)
    requests = [(i % len(fleet.models), (TEXT,)) for i in range(args.requests)]
    async with warm_server(fleet, options, requests, args) as (server, session, url, target):
        pid = server.pid
        steps_before = (await read_metrics(session, url))["steps"]
        before, fronts_before = thread_cpu_s(pid), front_end_cpu_s(pid)
        answered, wall_s = await closed_loop(target, requests, concurrency=args.concurrency)
        after, fronts_after = thread_cpu_s(pid), front_end_cpu_s(pid)
        num_steps = (await read_metrics(session, url))["steps"] - steps_before
    if answered != args.requests:
        raise RuntimeError(f"{args.requests - answered} of {args.requests} requests failed")
    spent = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    loop_s = spent.pop(pid)  # the main thread runs the event loop
    busiest = max(spent.values(), default=0.0)  # the model thread
    per_request = 1e6 / args.requests
    return {
        "requests_per_s": args.requests / wall_s,
        "rows_per_step": args.requests / num_steps if num_steps else 0.0,
        "event_loop_us": loop_s * per_request,
        "model_thread_us": busiest * per_request,
        "other_threads_us": (sum(spent.values()) - busiest) * per_request,
        "front_ends_us": sum(fronts_after[p] - fronts_before.get(p, 0.0) for p in fronts_after)
        * per_request,
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    from benchmarks.common import serial_torch_here

    serial_torch_here()  # --embedded runs the engine here: its model thread's team only
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quantize", default="int8", help="none or int8 (CPU only)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n] (with --quantize none)")
    parser.add_argument(
        "--embedded", action="store_true", help="the engine in this process, not the server"
    )
    parser.add_argument(
        "--server-workers", type=int, default=0, help="the server's front-end processes"
    )
    parser.add_argument(
        "--plan-ahead",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="graft's EngineConfig.plan_ahead: the next step planned while one runs "
        "(default: the engine's, on with CUDA)",
    )
    parser.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None,
        help="graft's EngineConfig.switch_interval_ms: how long the model thread may wait "
        "for the interpreter lock while the event loop holds it (default: the engine's)",
    )
    parser.add_argument("--hidden", type=int, default=None, help="a random-weight BERT this wide")
    parser.add_argument("--layers", type=int, default=None, help="with --hidden: its depth (2)")
    args = parser.parse_args(argv)
    if args.layers is not None and args.hidden is None:
        parser.error("--layers needs --hidden")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="graft-server-cpu-") as tmp:
        run = measure_embedded if args.embedded else measure
        result = asyncio.run(run(args, Path(tmp)))
    print(
        f"{args.requests} requests, {args.concurrency} in flight: "
        f"{result['requests_per_s']:.1f} req/s, {result['rows_per_step']:.1f} rows a step; "
        "CPU per request: event loop "
        f"{result['event_loop_us']:.0f} us, model thread {result['model_thread_us']:.0f} us, "
        f"other threads {result['other_threads_us']:.0f} us, "
        f"front-end processes {result['front_ends_us']:.0f} us"
    )
    return result


if __name__ == "__main__":
    from benchmarks.common import exit_on_sigterm

    exit_on_sigterm()
    main()
