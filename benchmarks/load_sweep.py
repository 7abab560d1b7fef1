"""A sweep: one scenario against one opened target, one open-loop run (and file) per rate.

Before the first rate: every adapter of the scenario is touched once (disk -> host cache), then
half a second of the scenario's own traffic warms the kernels' shapes. ``auto`` rates come from
a closed-loop probe of capacity C (64 requests in flight): 0.3, 0.6, 0.9, 1.2 x C, then
1.3x more until the server saturates, then 1.3x more while the answered rate still rises by
5% over the best saturated point: past the knee longer queues make bigger steps, so a target
whose probe read low, or whose tail crossed the limit early, would otherwise be credited with
less than it sustains. Saturation is the most any rate answered. Explicit rates stop at the
first saturated one. A low rate sends for longer (up to twice the duration) to
collect ``min_requests`` samples for its p99.
"""

import os
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.arrivals import DEFAULT_MAX_CHARS, TrafficConfig, load_corpus, schedule
from benchmarks.common import GcPauses
from benchmarks.load_stats import RunSummary, is_saturated, summarize
from benchmarks.load_targets import HttpTarget, Target, TargetOptions
from benchmarks.open_loop import closed_loop, drive, write_jsonl
from benchmarks.report import read_run

AUTO_FRACTIONS = (0.3, 0.6, 0.9, 1.2)
AUTO_GROWTH = 1.3
PLATEAU_GAIN = 1.05  # past saturation, auto rates go on while answers rise this much
MAX_POINTS = 9


@dataclass(frozen=True, slots=True)
class Scenario:
    """One workload against one target; a sweep runs it at several rates."""

    name: str
    target: str  # one of load_targets.TARGET_KINDS
    corpus: str  # one of arrivals.CORPORA
    num_adapters: int  # 0: every model the target has
    popularity: str = "zipf"
    arrival: str = "poisson"
    cv: float = 1.0
    inputs_per_request: int = 1
    zipf_s: float = 1.1


@dataclass(frozen=True, slots=True)
class SweepPlan:
    """How each scenario is swept."""

    rates_rps: tuple[float, ...] | None  # None: auto
    duration_s: float  # sending time per rate
    max_requests: int  # per rate
    drain_s: float  # wait for answers after the last send
    probe_s: float  # closed-loop capacity probe (auto)
    slo_s: float
    max_points: int = MAX_POINTS  # rates per sweep at most
    min_requests: int = 100  # stretch a low rate's duration (up to 2x) to send this many


class RateProgression:
    """The rates of one sweep, in order. Explicit rates (``grows`` False) stop at the first
    saturated one. Auto rates grow 1.3x past the last until one saturates, then keep growing
    1.3x while the answered rate still rises by ``PLATEAU_GAIN`` over the best so far: past the
    knee longer queues make bigger steps, so a target offered too little reads low."""

    def __init__(self, rates: list[float], *, grows: bool) -> None:
        self._rates, self._grows = list(rates), grows
        self._last: float | None = None
        self._best_saturated = 0.0  # the most answered at a saturated rate
        self._done = False

    def next(self) -> float | None:
        if self._done:
            return None
        if not self._rates:
            if not self._grows or self._last is None:
                return None
            self._rates.append(_round_rate(self._last * AUTO_GROWTH))
        self._last = self._rates.pop(0)
        return self._last

    def record(self, saturated: bool, answered_rps: float) -> None:
        """How the rate ``next`` returned last went: saturated or not, and the rate answered."""
        if not saturated:
            return
        if not self._grows or answered_rps < self._best_saturated * PLATEAU_GAIN:
            self._done = True
            return
        self._best_saturated = max(self._best_saturated, answered_rps)
        self._rates = []  # the next rate is 1.3x this one, whatever the initial list held


class ScenarioRunner:
    """Runs scenarios against one opened target, writing a JSONL file per rate."""

    def __init__(
        self,
        target: Target,
        options: TargetOptions,
        plan: SweepPlan,
        run_dir: Path,
        texts: dict[str, list[str]],
        *,
        seed: int,
        progress: bool,
        command: str,
    ) -> None:
        self.target, self.options, self.plan, self.run_dir = target, options, plan, run_dir
        self._texts = texts  # corpus name -> texts, shared by every scenario of the run
        self._seed, self._progress, self._command = seed, progress, command
        self._num_warm_adapters = 0
        self._pool: Any = None  # driver_pool.DriverPool, started on the first rate
        self._frozen = False  # this process's start-up objects, out of the collector's passes

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._frozen:
            from engine.collector import release_startup_objects

            release_startup_objects()
            self._frozen = False

    def _freeze(self) -> None:
        """Freeze this process's objects as an engine freezes its own (engine/collector.py).
        Driving a server in another process, this one still holds torch and transformers: a
        full collection of them stopped the driver for 250-390 ms at the first saturated rate
        of every HTTP sweep, and its sends fell behind by as much."""
        if not self._frozen:
            from engine.collector import freeze_startup_objects

            freeze_startup_objects()
            self._frozen = True

    @property
    def _driver_processes(self) -> int:
        """In-process targets (embedded, backbone) are driven from this process alone."""
        return self.options.driver_processes if isinstance(self.target, HttpTarget) else 1

    async def _drive(self, arrivals: list, label: str):
        if self._driver_processes < 2:
            return await drive(
                self.target,
                arrivals,
                drain_s=self.plan.drain_s,
                progress=self._progress,
                label=label,
            )
        if self._pool is None:
            from benchmarks.driver_pool import DriverPool, http_spec

            spec = http_spec(self.target, self.options.connections)
            self._pool = DriverPool(spec, self.options.driver_processes)
        return await self._pool.drive(self.target, arrivals, drain_s=self.plan.drain_s)

    def texts(self, corpus: str) -> list[str]:
        if corpus not in self._texts:
            self._texts[corpus] = load_corpus(corpus, DEFAULT_MAX_CHARS[corpus])
        return self._texts[corpus]

    async def run(self, scenario: Scenario, index: int) -> list[RunSummary]:
        """Warm up, probe capacity (auto), then one open-loop run per rate until saturated."""
        if scenario.num_adapters == 0:  # every model the target has
            scenario = replace(scenario, num_adapters=len(self.target.models))
        if len(self.target.models) < scenario.num_adapters:
            raise ValueError(
                f"{scenario.name}: the target has {len(self.target.models)} models, "
                f"the scenario needs {scenario.num_adapters}"
            )
        texts = self.texts(scenario.corpus)
        rng = np.random.default_rng([self._seed, index])
        # requests drawn as the scenario draws them; their times do not matter here
        sample = [(a.adapter, a.texts) for a in schedule(self._traffic(scenario), texts, rng)]
        await self._warm_up(scenario, texts, sample)
        self._freeze()
        capacity, rates = None, list(self.plan.rates_rps or ())
        if not rates:
            ok, elapsed = await closed_loop(
                self.target, sample, concurrency=64, duration_s=self.plan.probe_s
            )
            capacity = max(ok / elapsed, 1.0)
            rates = [_round_rate(f * capacity) for f in AUTO_FRACTIONS]
            print(f"{scenario.name}: closed-loop capacity ~{capacity:.1f} req/s", flush=True)
        summaries: list[RunSummary] = []
        progression = RateProgression(rates, grows=self.plan.rates_rps is None)
        while len(summaries) < self.plan.max_points and (rate := progression.next()) is not None:
            summaries.append(await self._point(scenario, index, rate, texts, capacity))
            last = summaries[-1]
            progression.record(is_saturated(last, self.plan.slo_s), last.throughput_rps)
        return summaries

    def _traffic(self, scenario: Scenario, rate: float = 1000.0) -> TrafficConfig:
        return TrafficConfig(
            rate_rps=rate,
            arrival=scenario.arrival,
            cv=scenario.cv,
            popularity=scenario.popularity,
            zipf_s=scenario.zipf_s,
            num_adapters=scenario.num_adapters,
            inputs_per_request=scenario.inputs_per_request,
            max_requests=self.plan.max_requests,
            duration_s=min(
                max(self.plan.duration_s, self.plan.min_requests / rate),
                2 * self.plan.duration_s,
            ),
        )

    async def _warm_up(self, scenario: Scenario, texts: list[str], sample) -> None:
        """Touch every adapter once (disk -> host cache), then half a second of traffic."""
        if scenario.num_adapters > self._num_warm_adapters:
            first = [(i, (texts[i % len(texts)],)) for i in range(scenario.num_adapters)]
            await closed_loop(self.target, first, concurrency=32)
            self._num_warm_adapters = scenario.num_adapters
        await closed_loop(self.target, sample, concurrency=16, duration_s=0.5)

    async def _point(
        self, scenario: Scenario, index: int, rate: float, texts: list[str], capacity
    ) -> RunSummary:
        traffic = self._traffic(scenario, rate)
        arrivals = schedule(
            traffic, texts, np.random.default_rng([self._seed, index, int(rate * 1000)])
        )
        with GcPauses() as pauses:  # this process's: the target's too, unless it is a --url
            run = await self._drive(arrivals, f"{scenario.name} @ {rate:g}/s")
        path = self.run_dir / f"{scenario.name}-r{rate:g}.jsonl"
        footer = {
            "send_window_s": round(run.send_window_s, 4),
            "wall_s": round(run.wall_s, 4),
            "num_sent": len(run.records),
            "counters_before": run.counters_before,
            "counters_after": run.counters_after,
            "load_average_1m_end": round(os.getloadavg()[0], 2),
            "gc": pauses.summary(),
        }
        write_jsonl(path, self._header(scenario, traffic, capacity), run, footer)
        summary = summarize(read_run(path), self.plan.slo_s)
        print(_point_line(summary), flush=True)
        return summary

    def _header(self, scenario: Scenario, traffic: TrafficConfig, capacity) -> dict[str, Any]:
        from benchmarks.common import machine_info

        options = asdict(self.options)
        options.pop("keys")  # API keys stay out of files
        options["driver_processes"] = self._driver_processes
        return {
            "benchmark": "load",
            "scenario": asdict(scenario),
            "rate_rps": traffic.rate_rps,
            "traffic": asdict(traffic),
            "target_options": options,
            "num_tenants": len({t for t, _ in self.target.models[: scenario.num_adapters]}),
            "probe_capacity_rps": capacity,
            "slo_ms": self.plan.slo_s * 1000,
            "seed": self._seed,
            "machine": machine_info(self.options.device),
            "git": git_state(),
            "command": self._command,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


def _round_rate(rate: float) -> float:
    """Two significant digits: readable file names, and rates that repeat between runs."""
    return float(f"{max(rate, 0.1):.2g}")


def _point_line(s: RunSummary) -> str:
    errors = ",".join(f"{k}:{v}" for k, v in s.errors.items()) or "none"
    lat = "/".join(
        "-" if s.latency_ms[p] is None else f"{s.latency_ms[p]:.1f}" for p in ("p50", "p99")
    )
    return (
        f"  {s.scenario} @ {s.offered_rps:g}/s: sent {s.num_sent}, {s.throughput_rps:.1f} req/s, "
        f"{s.throughput_seq_s:.1f} seq/s, p50/p99 {lat} ms, in SLO {s.slo_attainment:.3f}, "
        f"errors {errors}"
    )


def git_state() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(dirty)}
