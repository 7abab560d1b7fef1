"""The noisy-neighbour benchmark's numbers: latency percentiles, B's timeline, the table.

Split out of ``benchmarks.noisy_neighbor`` so that the arithmetic and the printing live apart
from the asyncio that produces them: ``latency_summary`` turns one phase's outcomes into its
JSON fields, and ``table_rows`` and ``print_report`` turn the whole payload into what stdout
shows.
"""

import math
import statistics
from collections import Counter

from benchmarks.common import describe_machine, fmt_ratio, format_table
from benchmarks.load_stats import percentile
from benchmarks.neighbor_clients import Outcome

NUM_WINDOWS = 20  # B's timeline: arrival windows per phase


def latency_summary(
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
            "p50_ms": _rounded(percentile([ms for ms in window if ms is not None], 50)),
        }
        for i, window in enumerate(windows)
    ]
    return {
        "num_sent": len(outcomes),
        "num_ok": len(answered),
        "success_pct": round(100 * len(answered) / len(outcomes), 2) if outcomes else None,
        "p50_ms": _rounded(percentile(latency_ms, 50)),
        "p99_ms": _rounded(percentile(latency_ms, 99)),
        "max_ms": _rounded(max(latency_ms, default=None)),
        "mean_ms": _rounded(statistics.fmean(latency_ms) if latency_ms else None),
        "queue_p50_ms": _rounded(percentile(queue_ms, 50)),
        "queue_p99_ms": _rounded(percentile(queue_ms, 99)),
        "compute_p50_ms": _rounded(percentile(compute_ms, 50)),
        "compute_p99_ms": _rounded(percentile(compute_ms, 99)),
        "statuses": dict(Counter(o.status for o, _ in outcomes)),
        "timeline": timeline,
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


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
