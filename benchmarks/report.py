"""Read load-test JSONL files; print throughput, latency percentiles, SLO attainment, goodput.

    python -m benchmarks.report FILE_OR_DIR... [--slo-ms 50] [--out DIR]

Per file (one offered rate): throughput in requests/s and sequences/s over the run's span
(first scheduled send to last answer), p50/p90/p99 latency of answered requests (split into
queue and compute where the file recorded it: over HTTP, the server's own Server-Timing, and
what lies outside it, the client, HTTP and tokenizing), SLO attainment (share of *all* sent requests
answered 200 within ``--slo-ms``: errors count as misses), errors by status, per-tenant shares.

Per sweep (files with the same scenario at different rates): saturation throughput (the most
any rate achieved), goodput (the highest offered rate at which >= 99% met the SLO, taking only
rates at and below which every tested rate passed, so a lucky point past a failing one does
not count), and p99 at the rate closest to 30% of saturation. Then the ratios the project
aims at (reported, never asserted). Plots go to ``--out`` (default ``benchmarks/out/load``).
"""

import argparse
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.load_stats import (
    Run,
    RunSummary,
    SweepSummary,
    comparisons,
    is_saturated,
    summarize,
    sweeps,
)

DEFAULT_SLO_MS = 50.0


# reading ---------------------------------------------------------------------------------


def read_run(path: Path) -> Run:
    header: dict[str, Any] | None = None
    footer: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    with path.open() as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            item = json.loads(line)
            kind = item.pop("kind", "request")
            if kind == "header":
                header = item
            elif kind == "footer":
                footer = item
            elif kind == "request":
                records.append(item)
            else:
                raise ValueError(f"{path}:{number}: unknown line kind {kind!r}")
    if header is None:
        raise ValueError(f"{path}: no header line; not a load-test file")
    return Run(path, header, records, footer)


def expand(paths: Iterable[Path]) -> list[Path]:
    """Files as given; directories become the JSONL files under them."""
    found: list[Path] = []
    for path in paths:
        found.extend(sorted(path.rglob("*.jsonl")) if path.is_dir() else [path])
    return found


# printing --------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    from benchmarks.common import format_table

    return format_table(headers, rows)


def runs_table(summaries: Sequence[RunSummary]) -> str:
    rows = []
    for s in summaries:
        split = "-"
        if s.queue_ms and s.compute_ms:
            split = f"{_fmt(s.queue_ms['p99'])}/{_fmt(s.compute_ms['p99'])}"
        errors = ",".join(f"{k}:{v}" for k, v in s.errors.items()) or "-"
        rows.append(
            [
                s.scenario,
                _fmt(s.offered_rps),
                s.num_sent,
                _fmt(s.throughput_rps),
                _fmt(s.throughput_seq_s),
                "/".join(_fmt(s.latency_ms[p]) for p in ("p50", "p90", "p99")),
                split,
                _fmt(s.outside_ms["p99"]) if s.outside_ms else "-",
                f"{s.slo_attainment:.3f}",
                errors,
                _fmt(s.rows_per_step),
                "-" if s.busy_share is None else f"{s.busy_share:.0%}",
                "-" if s.cpu_share is None else f"{s.cpu_share:.0%}",
                _fmt(s.send_lag_p99_ms),
            ]
        )
    headers = [
        "scenario",
        "offered/s",
        "sent",
        "req/s",
        "seq/s",
        "p50/p90/p99 ms",
        "p99 queue/compute ms",
        "p99 outside ms",
        "in SLO",
        "errors",
        "rows/step",
        "busy",
        "on CPU",
        "lag p99 ms",
    ]
    return _table(headers, rows)


def _at_least(sweep: SweepSummary, slo_ms: float) -> str:
    """ ">=" where no rate of the sweep saturated: the best answered rate is then only a
    floor under saturation."""
    return "" if any(is_saturated(p, slo_ms / 1000) for p in sweep.points) else ">="


def headline_table(sweep_list: Sequence[SweepSummary], slo_ms: float) -> str:
    rows = [
        [
            s.scenario,
            s.target,
            s.corpus,
            s.num_adapters,
            s.popularity,
            _at_least(s, slo_ms) + _fmt(s.saturation_rps),
            _at_least(s, slo_ms) + _fmt(s.saturation_seq_s),
            _fmt(s.goodput_rps),
            f"{_fmt(s.low_load_p99_ms)} @ {_fmt(s.low_load_rps)}/s",
        ]
        for s in sweep_list
    ]
    headers = [
        "scenario",
        "target",
        "corpus",
        "adapters",
        "popularity",
        "sat req/s",
        "sat seq/s",
        f"goodput req/s (p99<{slo_ms:g}ms)",
        "p99 ms near 30% sat",
    ]
    return _table(headers, rows)


def comparisons_table(rows: Sequence[dict[str, Any]]) -> str:
    table = [
        [
            r["comparison"],
            r["scenario"],
            r["against"],
            f"{r.get('bound') or ''}{r['ratio']:.2f}x",
            "-" if r.get("probe_ratio") is None else f"{r['probe_ratio']:.2f}x",
            "-" if r["aim"] is None else f">= {r['aim']}x",
            {None: "-", True: "yes", False: "no"}[r["met"]],
        ]
        for r in rows
    ]
    headers = ["comparison", "scenario", "against", "ratio", "closed loop", "aim", "met"]
    return _table(headers, table)


def tenants_table(summary: RunSummary, top: int = 5) -> str:
    shares = list(summary.tenant_shares.items())
    rows = [[t, f"{v['offered']:.3f}", f"{v['served']:.3f}"] for t, v in shares[:top]]
    if len(shares) > top:
        rest = shares[top:]
        rows.append(
            [
                f"{len(rest)} others",
                f"{sum(v['offered'] for _, v in rest):.3f}",
                f"{sum(v['served'] for _, v in rest):.3f}",
            ]
        )
    return _table(["tenant", "offered share", "served share"], rows)


def print_report(
    summaries: Sequence[RunSummary], slo_ms: float, *, tenants: bool = True
) -> dict[str, Any]:
    """Print every table; return what was printed as data."""
    sweep_list = sweeps(summaries)
    compared = comparisons(sweep_list, slo_ms / 1000)
    print(runs_table(summaries))
    if tenants:
        for s in summaries:
            if len(s.tenant_shares) > 1 and s is max(
                (x for x in summaries if x.scenario == s.scenario), key=lambda x: x.offered_rps
            ):
                print(f"\nper-tenant shares at the highest rate of {s.scenario}:")
                print(tenants_table(s))
    print("\nheadline:")
    print(headline_table(sweep_list, slo_ms))
    if compared:
        print("\ntargets (saturation sequences/s, reported, not asserted):")
        print(comparisons_table(compared))
    return {
        "slo_ms": slo_ms,
        "runs": [asdict(s) for s in summaries],
        "sweeps": [{**asdict(s), "points": [p.path for p in s.points]} for s in sweep_list],
        "comparisons": compared,
    }


def runs_mixed(summaries: Sequence[RunSummary]) -> str | None:
    """Why these files cannot be reported together, if they cannot: a scenario found in
    two runs' directories would be one sweep of both, its saturation the better run's."""
    dirs: dict[str, set[str]] = {}
    for s in summaries:
        dirs.setdefault(s.scenario, set()).add(str(Path(s.path).parent))
    for scenario, found in dirs.items():
        if len(found) > 1:
            shown = ", ".join(sorted(found))
            return f"scenario {scenario} comes from several runs ({shown}): report one at a time"
    return None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from benchmarks.load_plots import plot_all

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description=__doc__.splitlines()[0]
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="FILE_OR_DIR")
    parser.add_argument("--slo-ms", type=float, default=DEFAULT_SLO_MS)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out/load")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.paths if not path.exists()]
    if missing:
        parser.error(f"no such file or directory: {', '.join(missing)}")
    files = expand(args.paths)
    if not files:
        parser.error("no JSONL files found")
    try:
        summaries = [summarize(read_run(path), args.slo_ms / 1000) for path in files]
    except (ValueError, KeyError) as exc:
        parser.error(f"not a load-test file: {exc}")
    if mixed := runs_mixed(summaries):
        parser.error(mixed)
    payload = print_report(summaries, args.slo_ms)
    args.out.mkdir(parents=True, exist_ok=True)
    payload["plots"] = [] if args.no_plots else plot_all(sweeps(summaries), args.out, args.slo_ms)
    (args.out / "report.json").write_text(json.dumps(payload, indent=2) + "\n")
    for plot in payload["plots"]:
        print(f"plot: {plot}")
    print(f"summary: {args.out / 'report.json'}")
    return payload


if __name__ == "__main__":
    main()
