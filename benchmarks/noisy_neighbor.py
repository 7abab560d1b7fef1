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
import itertools
import json
import math
import os
import random
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import aiohttp  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    DEFAULT_OUT_DIR,
    describe_machine,
    fmt_ratio,
    format_table,
    int_list,
    machine_info,
    ratio,
    write_json,
)
from engine import (  # noqa: E402
    Backbone,
    Engine,
    EngineConfig,
    EngineError,
    EngineOverloaded,
    TenantBusy,
    TenantPolicy,
    load_backbone,
    write_peft_adapter,
)
from registry import Registry  # noqa: E402
from server.app import run_server  # noqa: E402

MODELS = {"a": "news", "b": "sms"}  # tenant -> its one model
REFUSED = ("429", "503")
NUM_WINDOWS = 20  # B's timeline: arrival windows per phase


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one request came to, whatever the transport."""

    status: str  # "ok", "429", "503", or the failure's name (HTTP status or exception type)
    num_inputs: int = 0  # predictions received: len(texts) when ok, else 0
    retry_after_s: float = 0.0  # the server's hint on 429/503, else 0
    queue_s: float | None = None  # when ok: admission to its first step (the engine's timing)
    compute_s: float | None = None  # when ok: its first step's start to its last step's end


class Client(Protocol):
    async def classify(self, tenant: str, texts: tuple[str, ...]) -> Outcome: ...


class EngineClient:
    """Submits to the engine in this process and awaits the job, keeping its timings."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def classify(self, tenant: str, texts: tuple[str, ...]) -> Outcome:
        try:
            job = await self._engine.submit(tenant, MODELS[tenant], texts)
            try:
                predictions = await job.results()
            except asyncio.CancelledError:
                job.cancel()  # as Engine.classify does: its queued rows never run
                raise
        except TenantBusy as exc:
            return Outcome("429", retry_after_s=exc.retry_after_s)
        except EngineOverloaded as exc:
            return Outcome("503", retry_after_s=exc.retry_after_s)
        except EngineError as exc:
            return Outcome(type(exc).__name__)
        timings = job.timings()
        return Outcome("ok", len(predictions), 0.0, timings.queue_s, timings.compute_s)


class HttpClient:
    """``POST /v1/classify`` over loopback; each distinct body is encoded once, so the flood's
    640 kB bodies cost the shared CPU the transfer and the server's parse, not our encoding."""

    def __init__(self, session: aiohttp.ClientSession, url: str, api_keys: dict[str, str]):
        self._session = session
        self._url = f"{url}/v1/classify"
        self._headers = {
            tenant: {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            for tenant, key in api_keys.items()
        }
        self._bodies: dict[tuple[str, tuple[str, ...]], bytes] = {}

    async def classify(self, tenant: str, texts: tuple[str, ...]) -> Outcome:
        body = self._bodies.get((tenant, texts))
        if body is None:
            payload = {"model": MODELS[tenant], "input": list(texts)}
            body = self._bodies[(tenant, texts)] = json.dumps(payload).encode()
        try:
            async with self._session.post(
                self._url, data=body, headers=self._headers[tenant]
            ) as response:
                raw = await response.read()
                if response.status == 200:
                    timings = _server_timing(response.headers.get("Server-Timing", ""))
                    num_inputs = len(json.loads(raw)["data"])
                    return Outcome(
                        "ok", num_inputs, 0.0, timings.get("queue"), timings.get("compute")
                    )
                retry_after_s = float(response.headers.get("Retry-After") or 0)
                return Outcome(str(response.status), retry_after_s=retry_after_s)
        except aiohttp.ClientError as exc:
            return Outcome(type(exc).__name__)


def _server_timing(header: str) -> dict[str, float]:
    """``queue;dur=1.5, compute;dur=9.0`` (milliseconds) -> {"queue": 0.0015, ...} seconds."""
    durations = {}
    for metric in header.split(","):
        name, _, params = metric.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur" and value:
                durations[name] = float(value) / 1000
    return durations


@dataclass(frozen=True, slots=True)
class Workload:
    registry_dir: Path  # registry with tenants "a" and "b", one adapter each
    api_keys: dict[str, str]  # tenant -> API key, for HTTP mode
    b_texts: tuple[str, ...]  # SMS texts, one per B request
    a_bodies: tuple[tuple[str, ...], ...]  # A's requests: --a-inputs long texts each
    a_row_tokens: int  # tokens of every A row after truncation (the backbone's limit)


def build_workload(work: Path, args: argparse.Namespace) -> Workload:
    from training import load_bbc_news, load_sms_spam

    backbone = load_backbone()
    registry = Registry(work / "registry", durable=False)
    api_keys = {tenant: registry.create_tenant(tenant) for tenant in MODELS}
    for seed, (tenant, model) in enumerate(MODELS.items()):
        source = work / model
        _write_random_adapter(backbone, source, seed)
        manifest = {"labels": ["x", "y"], "base_sha256": backbone.sha256, "rank": 8}
        registry.publish(tenant, model, source, {**manifest, "pooling": "mean", "metrics": {}})
    registry.close()
    rng = random.Random(0)
    sms = [e.text for e in load_sms_spam() if e.text.strip()]
    limit = backbone.max_tokens
    candidates = [e.text for e in load_bbc_news(max_chars=5000) if len(e.text) >= 2000]
    lengths = backbone.tokenizer(candidates)["input_ids"]
    long_texts = [t for t, ids in zip(candidates, lengths, strict=True) if len(ids) >= limit]
    return Workload(
        registry_dir=work / "registry",
        api_keys=api_keys,
        b_texts=tuple(rng.sample(sms, min(len(sms), args.num_b_texts))),
        a_bodies=tuple(tuple(rng.sample(long_texts, args.a_inputs)) for _ in range(4)),
        a_row_tokens=limit,
    )


def _write_random_adapter(backbone: Backbone, out_dir: Path, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    modules = {
        name: (
            torch.randn(8, backbone.linears[name].in_features, generator=gen) * 0.02,
            torch.randn(backbone.linears[name].out_features, 8, generator=gen) * 0.02,
        )
        for name in backbone.linear_names
        if not name.startswith("pooler")
    }
    head = torch.randn(2, backbone.hidden_size, generator=gen)
    write_peft_adapter(
        out_dir, backbone, modules, rank=8, alpha=16, head_weight=head, head_bias=torch.zeros(2)
    )


# load generators -------------------------------------------------------------------------


async def _timed(client: Client, text: str, scheduled_s: float) -> tuple[Outcome, float]:
    outcome = await client.classify("b", (text,))
    return outcome, time.perf_counter() - scheduled_s


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


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
    return _latency_summary(outcomes, arrivals, args.duration)


def _latency_summary(
    outcomes: list[tuple[Outcome, float]], arrivals: list[float], duration_s: float
) -> dict:
    """Percentiles over answered requests (latency, and the engine's queue and compute parts),
    and per window of arrivals how the median moved."""
    answered = [(o, latency_s) for o, latency_s in outcomes if o.status == "ok"]
    latency_ms = [latency_s * 1000 for _, latency_s in answered]
    queue_ms = [o.queue_s * 1000 for o, _ in answered if o.queue_s is not None]
    compute_ms = [o.compute_s * 1000 for o, _ in answered if o.compute_s is not None]
    window_s = duration_s / NUM_WINDOWS
    windows: list[list[float | None]] = [[] for _ in range(NUM_WINDOWS)]
    for (outcome, latency_s), arrival_s in zip(outcomes, arrivals, strict=True):
        ok_ms = latency_s * 1000 if outcome.status == "ok" else None
        windows[min(NUM_WINDOWS - 1, int(arrival_s / window_s))].append(ok_ms)
    timeline = [
        {
            "from_s": round(i * window_s, 2),
            "sent": len(window),
            "ok": len([ms for ms in window if ms is not None]),
            "p50_ms": _rounded(_percentile([ms for ms in window if ms is not None], 50)),
        }
        for i, window in enumerate(windows)
    ]
    return {
        "num_sent": len(outcomes),
        "num_ok": len(answered),
        "success_pct": round(100 * len(answered) / len(outcomes), 2) if outcomes else None,
        "p50_ms": _rounded(_percentile(latency_ms, 50)),
        "p99_ms": _rounded(_percentile(latency_ms, 99)),
        "max_ms": _rounded(max(latency_ms, default=None)),
        "mean_ms": _rounded(statistics.fmean(latency_ms) if latency_ms else None),
        "queue_p50_ms": _rounded(_percentile(queue_ms, 50)),
        "queue_p99_ms": _rounded(_percentile(queue_ms, 99)),
        "compute_p50_ms": _rounded(_percentile(compute_ms, 50)),
        "compute_p99_ms": _rounded(_percentile(compute_ms, 99)),
        "statuses": dict(Counter(o.status for o, _ in outcomes)),
        "timeline": timeline,
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


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
    budgets = {1, config.contended_batch_tokens or row_tokens, config.max_batch_tokens}
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


@contextlib.asynccontextmanager
async def serving(config: EngineConfig) -> AsyncIterator[tuple[str, Engine]]:
    """``run_server`` on 127.0.0.1, port 0, in this event loop; yields its URL and engine."""
    loop = asyncio.get_running_loop()
    listening: asyncio.Future[str] = loop.create_future()
    ready: asyncio.Future[Engine] = loop.create_future()

    async def on_listening(url: str) -> None:
        listening.set_result(url)

    async def on_ready(engine: Engine) -> None:
        ready.set_result(engine)

    server = asyncio.create_task(
        run_server(config, "127.0.0.1", 0, on_listening=on_listening, on_ready=on_ready)
    )
    try:
        await asyncio.wait([server, ready], return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            server.result()  # re-raises why it stopped
            raise RuntimeError("server stopped before it was ready")
        yield listening.result(), ready.result()
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server


@contextlib.asynccontextmanager
async def open_client(mode: str, config: EngineConfig, workload: Workload):
    if mode == "embedded":
        async with Engine(config) as engine:
            yield EngineClient(engine), engine
        return
    connector = aiohttp.TCPConnector(limit=0)  # open loop: no client-side queue
    async with serving(config) as (url, engine), aiohttp.ClientSession(connector=connector) as s:
        yield HttpClient(s, url, workload.api_keys), engine


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


# output ----------------------------------------------------------------------------------


def table_rows(results: dict) -> list[list[object]]:
    rows = []
    for mode, result in results.items():
        for scheduler in ("fair", "fifo"):
            r = result[scheduler]
            solo, cont = r["solo"]["b"], r["contended"]["b"]
            met = cont["success_pct"] == 100 and (r["p99_ratio"] or math.inf) <= 2
            rows.append(
                [
                    f"{mode} {scheduler}",
                    f"{solo['p50_ms']} / {solo['p99_ms']}",
                    f"{cont['p50_ms']} / {cont['p99_ms']}",
                    fmt_ratio(r["p99_ratio"]),
                    f"{solo['success_pct']} / {cont['success_pct']}",
                    r["contended"]["a"]["inputs_served_per_s"],
                    r["contended"]["a"]["statuses"].get("429", 0),
                    r["contended"]["a"]["max_queued_rows"],
                    "yes" if met else "no",
                ]
            )
    return rows


HEADERS = (
    "mode, scheduler",
    "B solo p50/p99 ms",
    "B contended p50/p99 ms",
    "p99 ratio",
    "B success % solo/cont",
    "A inputs/s",
    "A 429s",
    "A max queued",
    "target met",
)


def print_report(payload: dict) -> None:
    print(f"machine: {describe_machine(payload['machine'])}")
    print(f"config: {payload['config']}")
    for mode, result in payload["results"].items():
        probes = ", ".join(f"{p['rows']} {p['kind']}: {p['ms']} ms" for p in result["step_probes"])
        print(
            f"{mode}: capacity {result['capacity']['sweep']} req/s, B rate "
            f"{result['b_rate_per_s']} req/s; idle one-step probes: {probes}"
        )
        for scheduler in ("fair", "fifo"):
            cont = result[scheduler]["contended"]
            print(
                f"  {scheduler} contended: {cont['engine']} | B statuses {cont['b']['statuses']}"
                f" | A statuses {cont['a']['statuses']}"
            )
            for phase in ("solo", "contended"):
                b = result[scheduler][phase]["b"]
                print(
                    f"    B {phase}: queue p50/p99 {b['queue_p50_ms']} / {b['queue_p99_ms']} ms,"
                    f" compute p50/p99 {b['compute_p50_ms']} / {b['compute_p99_ms']} ms"
                )
    print(format_table(HEADERS, table_rows(payload["results"])))


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
            "contended_batch_tokens": config.contended_batch_tokens,
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
    main()
