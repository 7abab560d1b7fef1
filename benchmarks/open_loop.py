"""The driver: send a schedule open-loop, record every request; and two closed-loop helpers.

Open loop means each request leaves at its scheduled time whether or not earlier ones have
been answered, so a slow server faces a growing queue instead of a politely waiting client.
Latency is measured from the *scheduled* send time: when the driver itself falls behind
(``send_lag_s``), that delay counts against the server too instead of hiding it
("coordinated omission").
"""

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.arrivals import Arrival
from benchmarks.load_targets import Outcome, Target

FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the JSONL file keeps it; times in seconds."""

    t_send: float  # scheduled send time, after the run's start
    send_lag_s: float  # how much later than scheduled the driver really sent it
    latency_s: float | None  # answer complete minus scheduled send; None if never answered
    first_s: float | None  # first prediction minus scheduled send (embedded streams)
    queue_s: float | None  # first engine step touching it started, minus scheduled send
    compute_s: float | None  # from that step's start to the end of its last step
    # over HTTP, the server's own clock (Server-Timing): admission to its first step; the
    # compute above is then the server's too, and the rest of the latency is the client, the
    # network, HTTP and tokenizing
    server_queue_s: float | None
    status: int | str  # 200, 429, 503, 504, other HTTP codes, or "error"
    tenant: str
    model: str
    n_inputs: int
    tokens: int | None  # tokens the model saw (answered requests)
    error: str | None  # error type, exception class, or "unfinished"


@dataclass(frozen=True, slots=True)
class DrivenRun:
    """What ``drive`` returns: the records and the run's own measurements."""

    records: list[RequestRecord]  # in schedule order
    send_window_s: float  # from the start until the last request was sent
    wall_s: float  # from the start until the last answer (or the drain gave up)
    counters_before: dict[str, Any]  # target.counters() before the run
    counters_after: dict[str, Any]  # and after


async def drive(
    target: Target,
    arrivals: Sequence[Arrival],
    *,
    drain_s: float,
    progress: bool = True,
    label: str = "",
    start_at: float | None = None,
) -> DrivenRun:
    """Send ``arrivals`` on schedule; wait up to ``drain_s`` after the last for the answers.
    ``start_at``: the schedule's zero on ``time.monotonic``'s clock (shared by processes,
    benchmarks/driver_pool.py); default: now."""
    from tqdm import tqdm

    before = await target.counters()
    records: list[RequestRecord | None] = [None] * len(arrivals)
    pending: set[asyncio.Task[None]] = set()
    with tqdm(total=len(arrivals), unit="req", desc=label, disable=not progress) as bar:
        start = time.perf_counter()
        if start_at is not None:
            start += start_at - time.monotonic()
        for index, arrival in enumerate(arrivals):
            delay = start + arrival.t_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(_send(target, arrival, start, records, index))
            pending.add(task)
            task.add_done_callback(pending.discard)
            task.add_done_callback(lambda _: bar.update())
        send_window_s = time.perf_counter() - start
        if pending:
            _, unfinished = await asyncio.wait(set(pending), timeout=drain_s)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
        wall_s = time.perf_counter() - start
    after = await target.counters()
    return DrivenRun([r for r in records if r is not None], send_window_s, wall_s, before, after)


async def _send(
    target: Target,
    arrival: Arrival,
    start_s: float,
    records: list[RequestRecord | None],
    index: int,
) -> None:
    tenant, model = target.models[arrival.adapter]
    scheduled_s = start_s + arrival.t_s
    sent_s = time.perf_counter()
    try:
        outcome = await target.send(tenant, model, arrival.texts)
    except asyncio.CancelledError:  # the drain gave up on it: we cancelled, so we record it
        outcome = None
    except Exception as exc:  # a target's own failure: a miss and an error, never left out
        outcome = Outcome("error", time.perf_counter(), error=type(exc).__name__)
    records[index] = _record(arrival, tenant, model, scheduled_s, sent_s, outcome)


def _record(
    arrival: Arrival,
    tenant: str,
    model: str,
    scheduled_s: float,
    sent_s: float,
    outcome: Outcome | None,
) -> RequestRecord:
    def since(t: float | None) -> float | None:
        return None if t is None else round(t - scheduled_s, 6)

    span = outcome.step_span_s if outcome else None
    served = outcome.server_timing_s if outcome else None
    compute_s = round(span[1] - span[0], 6) if span else None
    return RequestRecord(
        t_send=round(arrival.t_s, 6),
        send_lag_s=round(sent_s - scheduled_s, 6),
        latency_s=since(outcome.done_s) if outcome else None,
        first_s=since(outcome.first_s) if outcome else None,
        queue_s=since(span[0]) if span else None,
        compute_s=round(served[1], 6) if served else compute_s,
        server_queue_s=round(served[0], 6) if served else None,
        status=outcome.status if outcome else "error",
        tenant=tenant,
        model=model,
        n_inputs=len(arrival.texts),
        tokens=outcome.tokens if outcome else None,
        error=outcome.error if outcome else "unfinished",
    )


async def closed_loop(
    target: Target,
    requests: Sequence[tuple[int, tuple[str, ...]]],
    *,
    concurrency: int,
    duration_s: float | None = None,
) -> tuple[int, float]:
    """Keep ``concurrency`` requests (adapter index, texts) in flight, cycling through
    ``requests``: once each when ``duration_s`` is None, else until it has passed.
    Returns (answered with 200, seconds)."""
    started = time.perf_counter()
    deadline = None if duration_s is None else started + duration_s
    position, answered = 0, 0

    def next_request() -> tuple[int, tuple[str, ...]] | None:
        nonlocal position
        if deadline is None and position >= len(requests):
            return None
        if deadline is not None and time.perf_counter() >= deadline:
            return None
        item = requests[position % len(requests)]
        position += 1
        return item

    async def worker() -> None:
        nonlocal answered
        while (item := next_request()) is not None:
            tenant, model = target.models[item[0]]
            outcome = await target.send(tenant, model, item[1])
            answered += outcome.status == 200

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answered, time.perf_counter() - started


def write_jsonl(path: Path, header: dict[str, Any], run: DrivenRun, footer: dict[str, Any]) -> None:
    """A header line, one line per request, a footer line; each line has a ``kind``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        out.write(json.dumps({"kind": "header", "format": FORMAT_VERSION, **header}) + "\n")
        for record in run.records:
            out.write(json.dumps({"kind": "request", **asdict(record)}) + "\n")
        out.write(json.dumps({"kind": "footer", **footer}) + "\n")
