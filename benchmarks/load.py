"""Load test: open-loop, many tenants, real texts, against graft embedded or over HTTP.

    python -m benchmarks.load [--embedded | --serve | --url URL --key KEY... | --baseline KIND]
        [--corpus sms|tweets|news] [--adapters N] [--tenants M] [--popularity zipf|uniform]
        [--arrival poisson|gamma --cv CV] [--rate R | --sweep 5,10,20 | --sweep auto]
        [--duration S] [--probe-seconds S] [--requests N] [--slo-ms 50] [--quick]
    python -m benchmarks.load --scenarios [--quick]      # the standard set (about 10 minutes)

Targets: ``--embedded`` (default) builds a scratch registry of ``--adapters`` random rank-8
adapters for ``--tenants`` tenants and drives an in-process ``Engine``; ``--serve`` serves that
registry over HTTP from a child process, as ``graft serve`` would (127.0.0.1, port 0;
``--server-thread``: from a thread of this process instead);
``--url`` drives a running server whose models the ``--key`` tenants already have;
``--baseline backbone`` is the bare backbone (the ceiling), ``--baseline peft`` a PEFT server
over the same adapters (``benchmarks/peft_server.py``).

Each offered rate writes one JSONL file (a header with machine, git commit and configuration;
one line per request; a footer with server counters) under ``benchmarks/out/load/<run>/``;
``python -m benchmarks.report`` reads them. ``--sweep auto`` first measures closed-loop
capacity C, then offers 0.3, 0.6, 0.9 and 1.2 x C and keeps raising by 1.3x until the
server saturates (it answers < 85% of what was offered, p99 passes 20x the SLO, or > 5% fail).
An auto sweep goes on past saturation while the answered rate still rises by 5% (explicit
rates stop at the first saturated one). The targets table sets the probes' ratios beside
the sweeps' (``--probe-seconds`` makes the probe longer). The load generator
shares the machine with the server (and, for the embedded engine, the bare backbone and
``--server-thread``, the process and its interpreter lock): on a small CPU it costs the server.
"""

import argparse
import asyncio
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks import report  # noqa: E402
from benchmarks.common import random_backbone_dir, serial_torch_here  # noqa: E402
from benchmarks.load_args import parse_args  # noqa: E402
from benchmarks.load_fleet import Fleet, build_fleet  # noqa: E402
from benchmarks.load_stats import RunSummary, sweeps  # noqa: E402
from benchmarks.load_sweep import MAX_POINTS, Scenario, ScenarioRunner, SweepPlan  # noqa: E402
from benchmarks.load_targets import TargetOptions, open_target  # noqa: E402


def _s(name, target, corpus, adapters, popularity="zipf", **kw) -> Scenario:
    return Scenario(name, target, corpus, adapters, popularity, **kw)


STANDARD_SCENARIOS = (
    _s("embedded-sms-1a", "embedded", "sms", 1, "uniform"),
    _s("embedded-sms-100a-zipf", "embedded", "sms", 100),
    _s("embedded-sms-1000a-zipf", "embedded", "sms", 1000),
    _s("embedded-sms-1000a-uniform", "embedded", "sms", 1000, "uniform"),
    _s("embedded-sms-1000a-zipf-bursty", "embedded", "sms", 1000, arrival="gamma", cv=3.0),
    _s("embedded-tweets-1000a-zipf", "embedded", "tweets", 1000),
    _s("embedded-news-1000a-zipf", "embedded", "news", 1000),
    _s("backbone-sms", "backbone", "sms", 1, "uniform"),
    _s("backbone-news", "backbone", "news", 1, "uniform"),
    _s("backbone-sms-bursty", "backbone", "sms", 1, "uniform", arrival="gamma", cv=3.0),
    _s("serve-sms-1a", "serve", "sms", 1, "uniform"),
    _s("serve-sms-100a-zipf", "serve", "sms", 100),
    _s("serve-sms-1000a-zipf", "serve", "sms", 1000),
    _s("peft-sms-1a", "peft", "sms", 1, "uniform"),
    _s("peft-sms-100a-zipf", "peft", "sms", 100),
)
QUICK_SCENARIOS = (
    _s("embedded-sms-1a", "embedded", "sms", 1, "uniform"),
    _s("embedded-sms-2a-zipf", "embedded", "sms", 2),
    _s("backbone-sms", "backbone", "sms", 1, "uniform"),
    _s("serve-sms-2a-zipf", "serve", "sms", 2),
    _s("peft-sms-2a-zipf", "peft", "sms", 2),
)


def scenarios_from(args: argparse.Namespace) -> tuple[Scenario, ...]:
    if args.scenarios:
        chosen = QUICK_SCENARIOS if args.quick else STANDARD_SCENARIOS
        if not args.only:
            return chosen
        names = list(dict.fromkeys(n.strip() for n in args.only.split(",") if n.strip()))
        by_name = {s.name: s for s in chosen}
        unknown = sorted(set(names) - set(by_name))
        if unknown:
            raise ValueError(f"unknown scenarios {unknown}; known: {list(by_name)}")
        # in the order given: two targets compared on a VM whose speed drifts are run A-B,
        # then B-A, so that the drift cancels in the mean of their ratios
        return tuple(by_name[name] for name in names)
    target = _target_kind(args)
    # a url target serves what its keys list: all of it unless --adapters says fewer
    adapters = args.adapters or (0 if target == "url" else 2 if args.quick else 100)
    name = args.name or f"{target}-{args.corpus}-{adapters or 'all'}a-{args.popularity}"
    if args.arrival == "gamma":
        name += f"-cv{args.cv:g}"
    scenario = Scenario(
        name,
        target,
        args.corpus,
        adapters,
        popularity=args.popularity,
        arrival=args.arrival,
        cv=args.cv,
        inputs_per_request=args.inputs,
        zipf_s=args.zipf_s,
    )
    return (scenario,)


def _target_kind(args: argparse.Namespace) -> str:
    if args.serve:
        return "serve"
    if args.url:
        return "url"
    return args.baseline or "embedded"


def sweep_plan(args: argparse.Namespace) -> SweepPlan:
    if args.sweep in (None, "") and not args.scenarios:
        rates: tuple[float, ...] | None = (args.rate,)
    elif args.sweep in (None, "", "auto"):
        rates = None
    else:
        rates = tuple(sorted(float(r) for r in args.sweep.split(",") if r.strip()))
        if not rates or min(rates) <= 0:
            raise ValueError(f"--sweep needs positive rates, got {args.sweep!r}")
    duration = args.duration or (1.5 if args.quick else 4.0 if args.scenarios else 10.0)
    return SweepPlan(
        rates_rps=rates,
        duration_s=duration,
        max_requests=args.requests,
        drain_s=args.timeout + 10.0,
        probe_s=args.probe_seconds or (1.0 if args.quick else 2.0),
        slo_s=args.slo_ms / 1000,
        max_points=2 if args.quick else MAX_POINTS,
        # an explicit --duration is taken as is; the defaults stretch for a usable p99
        min_requests=0 if args.duration else 10 if args.quick else 100,
    )


async def run_all(args: argparse.Namespace, run_dir: Path, work: Path) -> list[RunSummary]:
    """Build the scratch registry once, then run each group of same-target scenarios
    against one target opened for the group."""
    chosen, plan = scenarios_from(args), sweep_plan(args)
    peft = [s.name for s in chosen if s.target == "peft"]
    if args.quantize != "none" and peft:  # refused before anything runs, not mid-sweep
        raise ValueError(
            f"--quantize {args.quantize}: the PEFT server has no int8 path; leave out {peft} "
            "(--only) or drop --quantize"
        )
    if args.driver_processes > 1 and all(s.target in IN_PROCESS for s in chosen):
        raise ValueError(
            "--driver-processes drives HTTP targets; "
            f"{sorted({s.target for s in chosen})} run in this process"
        )
    backbone_dir = await asyncio.to_thread(_backbone_dir, args, work)
    fleet = await _fleet(args, chosen, work, backbone_dir)
    options = TargetOptions(
        timeout_s=args.timeout,
        threads=args.threads,
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
        backbone_dir=backbone_dir,
        interlude_tokens=args.interlude_tokens,
        switch_interval_ms=args.switch_interval_ms,
        lookahead_rows=args.lookahead_rows,
        contended_tokens=args.contended_tokens,
        # the engine's default made explicit, so each record's header says which ran
        cuda_graphs=(
            args.cuda_graphs if args.cuda_graphs is not None else args.device.startswith("cuda")
        ),
        plan_ahead=args.plan_ahead,
        adapter_pages=args.adapter_pages,
        url=args.url,
        keys=tuple(args.key),
        server_process=not args.server_thread,
        server_workers=args.server_workers,
        driver_processes=args.driver_processes,
    )
    texts: dict[str, list[str]] = {}
    summaries: list[RunSummary] = []
    index = 0
    for kind, members in itertools.groupby(chosen, key=lambda s: s.target):
        group = list(members)
        needed = max(s.num_adapters for s in group)
        async with open_target(
            kind, fleet.subset(needed) if fleet else NO_FLEET, options
        ) as target:
            runner = ScenarioRunner(
                target,
                options,
                plan,
                run_dir,
                texts,
                seed=args.seed,
                progress=not args.no_progress,
                command=" ".join(["python -m benchmarks.load", *args.argv]),
            )
            try:
                for scenario in group:
                    summaries.extend(await runner.run(scenario, index))
                    index += 1
            finally:
                runner.close()
    return summaries


def _backbone_dir(args: argparse.Namespace, work: Path) -> str | None:
    """``--backbone``, or a random-weight BERT built for ``--hidden``; None: the packaged one."""
    if args.hidden is None:
        return args.backbone
    started = time.perf_counter()
    path = random_backbone_dir(work, args.hidden, args.layers, default_layers=12)
    print(
        f"random-weight BERT backbone: hidden {args.hidden}, {args.layers or 12} layers, "
        f"built in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    return path


async def _fleet(
    args: argparse.Namespace, chosen: Sequence[Scenario], work: Path, backbone_dir: str | None
) -> Fleet | None:
    """The scratch registry every target but ``url`` serves from; None when none needs it."""
    needed = [s.num_adapters for s in chosen if s.target != "url"]
    if not needed:
        return None
    tenants = args.tenants or (2 if args.quick else 100)
    started = time.perf_counter()
    fleet = await asyncio.to_thread(
        build_fleet, work, max(needed), tenants, seed=args.seed, backbone_dir=backbone_dir
    )
    print(
        f"scratch registry: {max(needed)} adapters, {len(fleet.keys)} tenants, "
        f"built in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    return fleet


IN_PROCESS = ("embedded", "backbone")  # targets driven from this process only
NO_FLEET = Fleet(Path("."), (), {}, ())  # what a url target gets: it discovers its models


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_libraries()
    serial_torch_here()
    run_dir = args.out / time.strftime("%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory(prefix="graft-load-") as tmp:
        summaries = _run(run_all(args, run_dir, Path(tmp)))
    print(f"\nrecords: {run_dir}")
    payload = report.print_report(summaries, args.slo_ms, tenants=False)
    if len(summaries) > 1:
        from benchmarks.load_plots import plot_all

        payload["plots"] = plot_all(sweeps(summaries), run_dir, args.slo_ms)
        for plot in payload["plots"]:
            print(f"plot: {plot}")
    payload["run_dir"] = str(run_dir)
    return payload


def _run(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _quiet_libraries() -> None:
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.basicConfig(level=logging.WARNING)


if __name__ == "__main__":
    from benchmarks.common import exit_on_sigterm

    exit_on_sigterm()
    main()
