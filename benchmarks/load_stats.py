"""The load report's arithmetic, on records as read from the JSONL files (plain dicts).

Definitions (``benchmarks.report`` prints them):

- throughput: answered (200) requests, and their input texts, per second of the run's span,
  from the first scheduled send to the last answer;
- latency percentiles: of answered requests, linear interpolation as numpy's default;
- SLO attainment: the share of *all* sent requests answered 200 within the SLO (errors count
  as misses);
- goodput: the highest offered rate at which >= 99% met the SLO, taking only rates at and
  below which every tested rate passed;
- saturation: the most throughput any rate of a sweep reached.
"""

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GOODPUT_SHARE = 0.99
LOW_LOAD_FRACTION = 0.3  # "p99 at 30% of saturation"
HTTP_KINDS = ("serve", "url")


@dataclass(frozen=True, slots=True)
class Run:
    """One JSONL file."""

    path: Path
    header: dict[str, Any]
    records: list[dict[str, Any]]
    footer: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RunSummary:
    """One offered rate of one scenario."""

    path: str
    scenario: str  # the scenario's name, the same for every rate of a sweep
    target: str  # embedded, serve, url, backbone, peft
    corpus: str
    num_adapters: int
    popularity: str
    arrival: str  # poisson or gamma
    cv: float  # the gaps' coefficient of variation (1 for Poisson)
    offered_rps: float  # the configured mean rate
    sent_rps: float  # requests sent per second of the send window, as the driver managed
    num_sent: int
    num_ok: int  # answered 200
    throughput_rps: float  # answered requests per second of the run's span
    throughput_seq_s: float  # answered input texts per second
    latency_ms: dict[str, float | None]  # p50/p90/p99 of answered requests
    # the same for the queue part, where recorded (over HTTP, the server's own: admission to
    # its first step), and for the compute part
    queue_ms: dict[str, float | None] | None
    compute_ms: dict[str, float | None] | None
    slo_attainment: float  # answered within the SLO / sent
    errors: dict[str, int]  # status -> count, 200 excluded
    tenant_shares: dict[str, dict[str, float]]  # tenant -> offered / served share
    send_lag_p99_ms: float | None  # how far the driver fell behind its schedule
    rows_per_step: float | None  # mean batch size of the model steps during the run
    busy_share: float | None  # model-thread time in steps / run wall time (1: model-bound)
    # the model thread's CPU time in steps / its time in steps (graft's engine counters): below
    # 1, steps waited for the interpreter lock or for a core
    cpu_share: float | None = None
    # over HTTP, what the latency holds beyond the server's queue and compute: the client, the
    # network, HTTP and tokenizing (graft's Server-Timing); None for other targets
    outside_ms: dict[str, float | None] | None = None
    # the sweep's closed-loop probe before its first rate (auto rates only), requests/s
    probe_rps: float | None = None


@dataclass(frozen=True, slots=True)
class SweepSummary:
    """Every rate of one scenario."""

    scenario: str
    target: str
    corpus: str
    num_adapters: int
    popularity: str
    arrival: str
    cv: float
    points: list[RunSummary]  # ascending offered rate
    saturation_rps: float  # highest throughput reached at any rate
    saturation_seq_s: float
    goodput_rps: float | None  # None: no tested rate met the SLO target
    low_load_rps: float  # the tested rate closest to 30% of saturation
    low_load_p99_ms: float | None  # p99 latency there
    probe_rps: float | None = None  # closed-loop capacity measured before the sweep


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile with linear interpolation (numpy's default); None if empty.
    Every benchmark uses this one, so that a p99 means the same thing in each table."""
    if not len(values):
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def percentiles_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    out = {}
    for q in (50, 90, 99):
        value = percentile(values_s, q)
        out[f"p{q}"] = None if value is None else round(value * 1000, 3)
    return out


def is_ok(record: dict[str, Any]) -> bool:
    return record["status"] == 200 and record["latency_s"] is not None


def is_saturated(summary: RunSummary, slo_s: float) -> bool:
    """The server stopped keeping up: answers lag the offer, p99 exploded, or many failed."""
    if summary.num_sent == 0:  # a short run at a low rate may send nothing: no evidence
        return False
    p99_ms = summary.latency_ms["p99"]
    failed = 1 - summary.num_ok / summary.num_sent
    return (
        summary.throughput_rps < 0.85 * summary.sent_rps
        or p99_ms is None
        or p99_ms > 20 * slo_s * 1000
        or failed > 0.05
    )


def slo_attainment(records: Sequence[dict[str, Any]], slo_s: float) -> float:
    """Share of all sent requests answered 200 within ``slo_s``; 0 for no requests."""
    if not records:
        return 0.0
    return sum(is_ok(r) and r["latency_s"] <= slo_s for r in records) / len(records)


def throughput(
    records: Sequence[dict[str, Any]], schedule_end_s: float | None = None
) -> tuple[float, float]:
    """(requests/s, sequences/s) answered, over the schedule's start (``t_send`` 0) to the
    last answer, or to the schedule's end (``schedule_end_s``) if later. From the first send
    instead, the gap before it went uncounted: a sparse rate of N Poisson requests read high
    by about 1/N, the mean gap before the first; ended at the last answer, the gap after the
    last send went uncounted alike."""
    ok = [r for r in records if is_ok(r)]
    if not ok:
        return 0.0, 0.0
    last = max(max(r["t_send"] + r["latency_s"] for r in ok), schedule_end_s or 0.0)
    span = max(last, 1e-9)
    return len(ok) / span, sum(r["n_inputs"] for r in ok) / span


def error_counts(records: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Requests by status, 200 excluded; unanswered ones count under "error"."""
    counts = Counter(str(r["status"]) for r in records if not is_ok(r))
    return dict(sorted(counts.items()))


def tenant_shares(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per tenant: its share of the requests sent and of the requests answered."""
    sent = Counter(r["tenant"] for r in records)
    served = Counter(r["tenant"] for r in records if is_ok(r))
    num_sent, num_served = max(sum(sent.values()), 1), max(sum(served.values()), 1)
    return {
        t: {"offered": sent[t] / num_sent, "served": served[t] / num_served}
        for t in sorted(sent, key=lambda t: (-sent[t], t))
    }


def goodput_rps(
    points: Sequence[tuple[float, float]], required: float = GOODPUT_SHARE
) -> float | None:
    """Highest offered rate below which every tested (rate, attainment) met ``required``."""
    best = None
    for rate, attainment in sorted(points):
        if attainment < required:
            break
        best = rate
    return best


def _split_ms(records: Sequence[dict[str, Any]], field: str) -> dict[str, float | None] | None:
    values = [r[field] for r in records if is_ok(r) and r.get(field) is not None]
    return percentiles_ms(values) if values else None


def summarize(run: Run, slo_s: float) -> RunSummary:
    records, header, scenario = run.records, run.header, run.header["scenario"]
    ok = [r for r in records if is_ok(r)]
    traffic = header.get("traffic") or {}
    # the schedule ran its whole duration unless the request cap ended it first
    capped = len(records) >= traffic.get("max_requests", math.inf)
    rps, seq_s = throughput(records, None if capped else traffic.get("duration_s"))
    window = run.footer.get("send_window_s") or max((r["t_send"] for r in records), default=0)
    lags = [r["send_lag_s"] for r in records if r.get("send_lag_s") is not None]
    lag_p99 = percentile(lags, 99)
    return RunSummary(
        path=str(run.path),
        scenario=scenario["name"],
        target=scenario["target"],
        corpus=scenario["corpus"],
        num_adapters=int(scenario["num_adapters"]),
        popularity=scenario["popularity"],
        arrival=scenario.get("arrival", "poisson"),  # files from before the field: Poisson
        cv=float(scenario.get("cv", 1.0)),
        offered_rps=float(header["rate_rps"]),
        sent_rps=len(records) / window if window else 0.0,
        num_sent=len(records),
        num_ok=len(ok),
        throughput_rps=rps,
        throughput_seq_s=seq_s,
        latency_ms=percentiles_ms([r["latency_s"] for r in ok]),
        queue_ms=_split_ms(records, "queue_s") or _split_ms(records, "server_queue_s"),
        compute_ms=_split_ms(records, "compute_s"),
        slo_attainment=slo_attainment(records, slo_s),
        errors=error_counts(records),
        tenant_shares=tenant_shares(records),
        send_lag_p99_ms=None if lag_p99 is None else round(lag_p99 * 1000, 3),
        outside_ms=_outside_ms(ok),
        probe_rps=header.get("probe_capacity_rps"),
        **step_stats(run.footer),
    )


def _outside_ms(ok: Sequence[dict[str, Any]]) -> dict[str, float | None] | None:
    """Per answered request with the server's own timings: latency less its queue and
    compute."""
    outside = [
        r["latency_s"] - r["server_queue_s"] - r["compute_s"]
        for r in ok
        if r.get("server_queue_s") is not None and r.get("compute_s") is not None
    ]
    return percentiles_ms(outside) if outside else None


def step_stats(footer: dict[str, Any]) -> dict[str, float | None]:
    """Mean rows per step, the model thread's busy share and its CPU share in steps, from the
    footer's counters (graft's step clock and engine counters, or a baseline batcher's own);
    None where not recorded."""

    def steps(counters: dict[str, Any]) -> dict[str, Any]:
        return counters.get("step_clock", counters)

    top_before = footer.get("counters_before") or {}
    top_after = footer.get("counters_after") or {}
    before, after = steps(top_before), steps(top_after)
    wall_s = footer.get("wall_s")
    cpu_share = _cpu_share(top_before, top_after)
    if not {"steps", "rows", "busy_s"} <= before.keys() & after.keys() or not wall_s:
        return {"rows_per_step": None, "busy_share": None, "cpu_share": cpu_share}
    num_steps = after["steps"] - before["steps"]
    return {
        "rows_per_step": (after["rows"] - before["rows"]) / num_steps if num_steps else None,
        "busy_share": (after["busy_s"] - before["busy_s"]) / wall_s,
        "cpu_share": cpu_share,
    }


def _cpu_share(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    """CPU over wall time of graft's model thread in steps: its engine counters embedded
    (``step_*_us``), or GET /metrics' (``cpu_s``, ``busy_s``) for a server process."""

    def spent(counters: dict[str, Any]) -> tuple[float, float] | None:
        if "cpu_s" in counters and "busy_s" in counters:
            return counters["cpu_s"], counters["busy_s"]
        if "step_cpu_us" in counters and "step_busy_us" in counters:
            return counters["step_cpu_us"] / 1e6, counters["step_busy_us"] / 1e6
        return None

    first, last = spent(before), spent(after)
    if first is None or last is None or last[1] <= first[1]:
        return None
    return (last[0] - first[0]) / (last[1] - first[1])


def sweeps(summaries: Sequence[RunSummary]) -> list[SweepSummary]:
    """Group the runs by scenario; one summary per sweep, in first-seen order."""
    groups: dict[str, list[RunSummary]] = defaultdict(list)
    for s in summaries:
        groups[s.scenario].append(s)
    out = []
    for name, points in groups.items():
        points = sorted(points, key=lambda s: s.offered_rps)
        saturation = max(points, key=lambda s: s.throughput_rps)
        low = min(
            points,
            key=lambda s: abs(s.offered_rps - LOW_LOAD_FRACTION * saturation.throughput_rps),
        )
        first = points[0]
        out.append(
            SweepSummary(
                scenario=name,
                target=first.target,
                corpus=first.corpus,
                num_adapters=first.num_adapters,
                popularity=first.popularity,
                arrival=first.arrival,
                cv=first.cv,
                points=points,
                saturation_rps=saturation.throughput_rps,
                saturation_seq_s=max(s.throughput_seq_s for s in points),
                # a short run at a low rate may send nothing: no evidence either way
                goodput_rps=goodput_rps(
                    [(s.offered_rps, s.slo_attainment) for s in points if s.num_sent]
                ),
                low_load_rps=low.offered_rps,
                low_load_p99_ms=low.latency_ms["p99"],
                probe_rps=first.probe_rps,
            )
        )
    return out


def comparisons(
    sweep_list: Sequence[SweepSummary], slo_s: float | None = None
) -> list[dict[str, Any]]:
    """The project's targets as ratios of saturation throughput (sequences/s), where both
    sides were measured: HTTP >= 0.85x embedded, embedded >= 0.9x bare backbone; and graft's
    HTTP server against the PEFT one. Both sides of a pair saw the same arrival process: bursts
    cost every server throughput, so bursty graft is held to a bursty backbone.

    Beside it, ``probe_ratio``: the same pair's closed-loop probes (requests/s; None where a
    side has none). A sweep's saturation is the best of rates 1.3x apart, each placed from its
    own side's probe, so its ratio moves by up to that step; a long probe
    (``--probe-seconds``) measures each side's capacity directly.

    With ``slo_s``, a side whose sweep never saturated is only a floor under its saturation:
    ``bound`` says which way the true ratio may lie from ``ratio`` (">=": the numerator is a
    floor; "<=": the denominator; "?": both), and ``met`` is None where that leaves it open."""

    def find(target: str | tuple[str, ...], like: SweepSummary, *, adapters: bool = True):
        kinds = (target,) if isinstance(target, str) else target
        for s in sweep_list:
            same = (s.corpus, s.arrival, s.cv) == (like.corpus, like.arrival, like.cv) and (
                not adapters
                or (s.num_adapters == like.num_adapters and s.popularity == like.popularity)
            )
            if s.target in kinds and same:
                return s
        return None

    rows = []
    for s in sweep_list:
        pairs = []
        if s.target in HTTP_KINDS:
            pairs.append(("http / embedded", find("embedded", s), 0.85))
            pairs.append(("graft http / peft http", find("peft", s), None))
        if s.target == "embedded":
            pairs.append(("embedded / bare backbone", find("backbone", s, adapters=False), 0.9))
        for label, other, aim in pairs:
            if other is not None and other.saturation_seq_s > 0:
                ratio = s.saturation_seq_s / other.saturation_seq_s
                bound = _bound(s, other, slo_s)
                rows.append(
                    {
                        "comparison": label,
                        "scenario": s.scenario,
                        "against": other.scenario,
                        "ratio": round(ratio, 3),
                        "bound": bound,
                        "probe_ratio": _probe_ratio(s, other),
                        "aim": aim,
                        "met": None if aim is None else _met(ratio, aim, bound),
                    }
                )
    return rows


def _bound(one: SweepSummary, other: SweepSummary, slo_s: float | None) -> str:
    """ "" where both sweeps saturated (or no SLO was given to judge it), else which way the
    true ratio may lie from the measured one."""
    if slo_s is None:
        return ""
    floors = [not any(is_saturated(p, slo_s) for p in s.points) for s in (one, other)]
    return {(False, False): "", (True, False): ">=", (False, True): "<=", (True, True): "?"}[
        (floors[0], floors[1])
    ]


def _met(ratio: float, aim: float, bound: str) -> bool | None:
    if bound == "":
        return ratio >= aim
    if bound == ">=" and ratio >= aim:
        return True  # a floor over the aim
    if bound == "<=" and ratio < aim:
        return False  # a ceiling under it
    return None


def _probe_ratio(one: SweepSummary, other: SweepSummary) -> float | None:
    if not one.probe_rps or not other.probe_rps:
        return None
    return round(one.probe_rps / other.probe_rps, 3)
