"""The noisy-neighbour benchmark's load generators: B's open loop, A's flood, the idle probes.

Split out of ``benchmarks.noisy_neighbor`` so that each source of traffic reads on its own:
``open_loop`` sends B's Poisson arrivals and times them from their schedule, ``flooding`` keeps
A's loops re-submitting for as long as a phase runs, and ``measure_capacity`` and
``probe_steps`` measure the engine before any phase, to size B's rate and a step's cost.
"""

import asyncio
import contextlib
import itertools
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks.neighbor_clients import Client, Outcome
from benchmarks.neighbor_report import latency_summary
from benchmarks.neighbor_workload import MODELS, Workload
from engine import Engine

REFUSED = ("429", "503")


async def _timed(client: Client, text: str, scheduled_s: float) -> tuple[Outcome, float]:
    outcome = await client.classify("b", (text,))
    return outcome, time.perf_counter() - scheduled_s


async def open_loop(client: Client, texts: Sequence[str], rate_per_s: float, args, seed: int):
    """B: Poisson arrivals for ``args.duration`` s; latency from the scheduled arrival."""
    rng = random.Random(seed)
    started, arrival_s = time.perf_counter(), 0.0
    arrivals: list[float] = []  # seconds after the start, one per request
    tasks: list[asyncio.Task[tuple[Outcome, float]]] = []
    while len(tasks) < args.max_b_requests:
        arrival_s += rng.expovariate(rate_per_s)
        if arrival_s >= args.duration:
            break
        await asyncio.sleep(max(0.0, started + arrival_s - time.perf_counter()))
        text = texts[len(tasks) % len(texts)]
        tasks.append(asyncio.create_task(_timed(client, text, started + arrival_s)))
        arrivals.append(arrival_s)
    pending: set[asyncio.Task[tuple[Outcome, float]]] = set()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=args.drain)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    outcomes = [(Outcome("unanswered"), 0.0) if t in pending else t.result() for t in tasks]
    return latency_summary(outcomes, arrivals, args.duration)


@dataclass(slots=True)
class FloodTally:
    """A's side of the flood, counted by its client loops."""

    num_inputs_answered: int = 0
    max_queued_rows: int = 0  # most rows A had admitted and not yet run, sampled every 20 ms
    statuses: Counter[str] = field(default_factory=Counter)
    refused: asyncio.Event = field(default_factory=asyncio.Event)  # set at the first 429/503


async def _flood_loop(client: Client, workload: Workload, start: int, tally: FloodTally, args):
    rng = random.Random(start)
    for i in itertools.count(start):
        outcome = await client.classify("a", workload.a_bodies[i % len(workload.a_bodies)])
        tally.statuses[outcome.status] += 1
        tally.num_inputs_answered += outcome.num_inputs
        if outcome.status == "ok":
            continue
        if outcome.status in REFUSED:
            tally.refused.set()
        wait_s = min(outcome.retry_after_s or args.retry_cap, args.retry_cap)
        await asyncio.sleep(wait_s * rng.uniform(0.5, 1.0))


async def _watch_queue(engine: Engine, tally: FloodTally) -> None:
    """A's queue depth as its counters give it: admitted rows not yet run, dropped or expired."""
    while True:
        c = engine.tenant_stats().get("a", {})
        finished = c.get("run_rows", 0) + c.get("aborted_rows", 0) + c.get("expired_rows", 0)
        tally.max_queued_rows = max(tally.max_queued_rows, c.get("admitted_rows", 0) - finished)
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def flooding(client: Client, engine: Engine, workload: Workload, args):
    """A's loops run while inside; leaving cancels them (and so their queued rows)."""
    tally = FloodTally()
    loops = [
        asyncio.create_task(_flood_loop(client, workload, i, tally, args))
        for i in range(args.a_loops)
    ]
    loops.append(asyncio.create_task(_watch_queue(engine, tally)))
    try:
        yield tally
    finally:
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)


async def measure_capacity(client: Client, texts: Sequence[str], args) -> dict:
    """Closed loops of single short requests at each concurrency; the best answered requests/s.

    More concurrency is not always more throughput: a step pads every row to its longest, so
    wide batches of SMS texts waste compute on padding. Hence the sweep, after a warm-up.
    """

    async def worker(deadline_s: float, start: int, step: int, statuses: Counter[str]) -> None:
        for i in itertools.count(start, step):
            if time.perf_counter() >= deadline_s:
                return
            statuses[(await client.classify("b", (texts[i % len(texts)],))).status] += 1

    levels = [(args.capacity_concurrency[-1], args.capacity_warmup, "warmup")]
    levels += [(c, args.capacity_duration, "measure") for c in args.capacity_concurrency]
    sweep = []
    for concurrency, seconds, purpose in levels:
        statuses: Counter[str] = Counter()
        started = time.perf_counter()
        await asyncio.gather(
            *(worker(started + seconds, i, concurrency, statuses) for i in range(concurrency))
        )
        rate = statuses["ok"] / (time.perf_counter() - started)
        if purpose == "measure":
            sweep.append({"concurrency": concurrency, "requests_per_s": round(rate, 2)})
    best = max(sweep, key=lambda level: level["requests_per_s"])
    return {**best, "sweep": sweep}


async def probe_steps(engine: Engine, workload: Workload, args) -> list[dict]:
    """Idle-engine latency of one request that runs as one step: the cost of a step's shape."""
    config, row_tokens = engine.config, workload.a_row_tokens
    budgets = {1, config.contended_budget_tokens or row_tokens, config.max_batch_tokens}
    counts = sorted(
        {max(1, min(b // row_tokens, config.max_batch_rows, args.a_inputs)) for b in budgets}
    )
    shapes = [("short", (workload.b_texts[0],))]
    shapes += [("long", workload.a_bodies[0][:n]) for n in counts]
    probes = []
    for kind, texts in shapes:
        samples = []
        for _ in range(args.probe_reps):
            started = time.perf_counter()
            await engine.classify("a", MODELS["a"], texts)
            samples.append((time.perf_counter() - started) * 1000)
        probes.append(
            {"rows": len(texts), "kind": kind, "ms": round(statistics.median(samples), 2)}
        )
    return probes
