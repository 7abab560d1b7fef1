"""The load report's arithmetic on synthetic records, and its files end to end."""

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import report
from benchmarks.load_stats import (
    Run,
    comparisons,
    error_counts,
    goodput_rps,
    percentile,
    slo_attainment,
    summarize,
    sweeps,
    tenant_shares,
    throughput,
)
from benchmarks.load_targets import server_timing

SLO_S = 0.05


def rec(t_send: float, latency_s: float | None, status=200, tenant="t0", n_inputs=1, **extra):
    return {
        "t_send": t_send,
        "send_lag_s": 0.0,
        "latency_s": latency_s,
        "first_s": None,
        "queue_s": None,
        "compute_s": None,
        "status": status,
        "tenant": tenant,
        "model": "a0",
        "n_inputs": n_inputs,
        "tokens": 10 if status == 200 else None,
        "error": None if status == 200 else "x",
        **extra,
    }


def header(name: str, target: str, rate: float, adapters: int = 1, corpus: str = "sms", **arrival):
    scenario = {
        "name": name,
        "target": target,
        "corpus": corpus,
        "num_adapters": adapters,
        "popularity": "zipf",
        **arrival,
    }
    return {"scenario": scenario, "rate_rps": rate}


def test_percentiles_interpolate_like_numpy() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None
    rng = np.random.default_rng(0).exponential(size=1001)
    assert percentile(list(rng), 90) == pytest.approx(np.percentile(rng, 90))


def test_slo_attainment_counts_errors_and_late_answers_as_misses() -> None:
    records = [rec(0, 0.01), rec(0, 0.049), rec(0, 0.05), rec(0, 0.2), rec(0, None, "error")]
    records.append(rec(0, 0.001, 429))
    assert slo_attainment(records, SLO_S) == pytest.approx(3 / 6)
    assert slo_attainment([], SLO_S) == 0.0


def test_throughput_counts_answered_requests_and_inputs_over_the_span() -> None:
    records = [rec(t * 0.1, 0.05, n_inputs=2) for t in range(10)]  # last answer at 0.95 s
    records.append(rec(0.5, 0.01, 503))
    rps, seq_s = throughput(records)
    assert rps == pytest.approx(10 / 0.95)
    assert seq_s == pytest.approx(20 / 0.95)
    assert throughput([rec(0, None, "error")]) == (0.0, 0.0)
    # the window opens at the schedule's start, not at its first arrival: one request sent
    # 0.8 s in and answered in 4 ms is 1.2 req/s over 0.804 s, not 250 req/s over 4 ms
    assert throughput([rec(0.8, 0.004)])[0] == pytest.approx(1 / 0.804)


def test_error_counts_by_status() -> None:
    records = [rec(0, 0.01), rec(0, 0.01, 429), rec(0, 0.01, 429), rec(0, 0.01, 503)]
    records += [rec(0, None, "error"), rec(0, 2.0, 504)]
    assert error_counts(records) == {"429": 2, "503": 1, "504": 1, "error": 1}


def test_tenant_shares_offered_and_served() -> None:
    records = [rec(0, 0.01, tenant="a")] * 6 + [rec(0, 0.01, tenant="b")] * 2
    records += [rec(0, 0.01, 429, tenant="b")] * 2
    shares = tenant_shares(records)
    assert list(shares) == ["a", "b"]
    assert shares["a"] == {"offered": 0.6, "served": 0.75}
    assert shares["b"] == {"offered": 0.4, "served": 0.25}


def test_goodput_is_the_highest_rate_below_which_every_rate_met_the_slo() -> None:
    sweep = [(40.0, 0.999), (5.0, 1.0), (10.0, 0.995), (20.0, 0.97)]
    assert goodput_rps(sweep) == 10.0  # 40 passed again, but after 20 failed: not counted
    assert goodput_rps([(5.0, 0.98)]) is None
    assert goodput_rps([(5.0, 0.99), (10.0, 0.991)]) == 10.0


def _run(name: str, target: str, rate: float, latency_s: float, n: int = 100, **kw) -> Run:
    records = [rec(i / rate, latency_s) for i in range(n)]
    return Run(Path(f"{name}-{rate}.jsonl"), header(name, target, rate, **kw), records, {})


def test_sweep_summary_saturation_goodput_and_low_load_point() -> None:
    runs = [
        _run("e", "embedded", 10, 0.01),
        _run("e", "embedded", 30, 0.02),
        _run("e", "embedded", 60, 0.08),
        _run("e", "embedded", 100, 0.5),
    ]
    (sweep,) = sweeps([summarize(r, SLO_S) for r in runs])
    assert [p.offered_rps for p in sweep.points] == [10, 30, 60, 100]
    assert sweep.goodput_rps == 30
    assert sweep.saturation_rps == pytest.approx(max(p.throughput_rps for p in sweep.points))
    assert sweep.low_load_rps == 30  # closest to 0.3 x ~92 req/s
    assert sweep.low_load_p99_ms == pytest.approx(20.0)


def test_comparisons_pair_http_with_embedded_and_embedded_with_the_backbone() -> None:
    summaries = [
        summarize(_run("emb", "embedded", 50, 0.01, adapters=100), SLO_S),
        summarize(_run("http", "serve", 50, 0.01, n=90, adapters=100), SLO_S),
        summarize(_run("bare", "backbone", 50, 0.01), SLO_S),
        summarize(_run("other", "serve", 50, 0.01, adapters=7), SLO_S),
    ]
    rows = {(r["comparison"], r["scenario"]): r for r in comparisons(sweeps(summaries))}
    http = rows[("http / embedded", "http")]
    assert http["against"] == "emb" and http["aim"] == 0.85
    assert http["ratio"] == pytest.approx(
        summaries[1].throughput_seq_s / summaries[0].throughput_seq_s, abs=1e-3
    )
    assert rows[("embedded / bare backbone", "emb")]["against"] == "bare"
    assert ("http / embedded", "other") not in rows  # no embedded run with 7 adapters
    assert http["probe_ratio"] is None  # explicit rates: no probe on either side


def test_comparisons_set_the_closed_loop_probes_side_by_side() -> None:
    """The probe ratio is each side's probe, whatever the sweeps' best rates were."""
    emb = _run("emb", "embedded", 50, 0.01, adapters=100)
    http = _run("http", "serve", 60, 0.01, n=90, adapters=100)
    bare = _run("bare", "backbone", 50, 0.01)
    emb.header["probe_capacity_rps"], http.header["probe_capacity_rps"] = 200.0, 170.0
    summaries = [summarize(run, SLO_S) for run in (emb, http, bare)]
    rows = {(r["comparison"], r["scenario"]): r for r in comparisons(sweeps(summaries))}
    assert rows[("http / embedded", "http")]["probe_ratio"] == pytest.approx(0.85)
    assert rows[("embedded / bare backbone", "emb")]["probe_ratio"] is None  # bare: no probe
    table = report.comparisons_table(list(rows.values()))
    assert "closed loop" in table.splitlines()[0] and "0.85x" in table


def test_comparisons_hold_bursty_graft_to_a_bursty_backbone() -> None:
    bursty = {"arrival": "gamma", "cv": 3.0}
    summaries = [
        summarize(_run("emb-bursty", "embedded", 40, 0.01, **bursty), SLO_S),
        summarize(_run("bare", "backbone", 50, 0.01), SLO_S),
        summarize(_run("bare-bursty", "backbone", 50, 0.01, **bursty), SLO_S),
    ]
    (row,) = [r for r in comparisons(sweeps(summaries)) if r["scenario"] == "emb-bursty"]
    assert row["against"] == "bare-bursty"
    assert row["ratio"] == pytest.approx(
        summaries[0].throughput_seq_s / summaries[2].throughput_seq_s, abs=1e-3
    )
    assert row["ratio"] < 0.9 and not row["met"]
    alone = [s for s in summaries if s.scenario != "bare-bursty"]
    assert not comparisons(sweeps(alone))  # a Poisson backbone is no yardstick for bursts


def test_queue_and_compute_split_where_recorded() -> None:
    records = [rec(i * 0.1, 0.03, queue_s=0.01, compute_s=0.02) for i in range(20)]
    records.append(rec(3.0, 0.03))  # an HTTP-style record without the split
    s = summarize(Run(Path("x"), header("s", "embedded", 10), records, {}), SLO_S)
    assert s.queue_ms == {"p50": 10.0, "p90": 10.0, "p99": 10.0}
    assert s.compute_ms["p99"] == pytest.approx(20.0)
    http = summarize(Run(Path("y"), header("h", "serve", 10), [rec(0, 0.03)], {}), SLO_S)
    assert http.queue_ms is None and http.compute_ms is None


def test_http_records_split_by_the_servers_own_timings() -> None:
    records = [rec(i * 0.1, 0.03, server_queue_s=0.005, compute_s=0.02) for i in range(20)]
    records.append(rec(3.0, 0.03))  # a server without Server-Timing (the PEFT baseline)
    s = summarize(Run(Path("h"), header("h", "serve", 10), records, {}), SLO_S)
    assert s.queue_ms["p99"] == pytest.approx(5.0) and s.compute_ms["p99"] == pytest.approx(20.0)
    assert s.outside_ms["p50"] == pytest.approx(5.0)  # 30 ms less 5 queued and 20 computing
    embedded = [rec(0, 0.03, queue_s=0.01, compute_s=0.02)]
    assert (
        summarize(Run(Path("e"), header("e", "embedded", 10), embedded, {}), SLO_S).outside_ms
        is None
    )


def test_server_timing_header_parses_graft_s_and_nothing_else() -> None:
    assert server_timing("queue;dur=1.50, compute;dur=12.25") == (0.0015, 0.01225)
    assert server_timing("compute;dur=2,queue;dur=0") == (0.0, 0.002)
    for other in (None, "", "queue;dur=1.5", "queue;dur=x, compute;dur=1", "cache;desc=hit"):
        assert server_timing(other) is None


def test_report_reads_files_and_directories(tmp_path: Path, capsys) -> None:
    for rate in (10, 20):
        lines = [{"kind": "header", **header("e", "embedded", rate)}]
        lines += [{"kind": "request", **rec(i / rate, 0.01 * rate / 10)} for i in range(50)]
        lines.append({"kind": "footer", "send_window_s": 50 / rate})
        path = tmp_path / "runs" / f"e-r{rate}.jsonl"
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    payload = report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--no-plots"])
    assert [r["offered_rps"] for r in payload["runs"]] == [10, 20]
    assert payload["sweeps"][0]["goodput_rps"] == 20
    assert json.loads((tmp_path / "out" / "report.json").read_text())["slo_ms"] == 50.0
    assert "headline" in capsys.readouterr().out


def test_report_refuses_a_file_without_header(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"kind": "request", **rec(0, 0.01)}) + "\n")
    with pytest.raises(ValueError, match="no header"):
        report.read_run(path)


def test_step_stats_from_the_footer_counters() -> None:
    footer = {
        "wall_s": 2.0,
        "counters_before": {
            "steps": 5,
            "step_busy_us": 1_000_000,
            "step_cpu_us": 900_000,
            "step_clock": {"steps": 10, "rows": 40, "busy_s": 1.0},
        },
        "counters_after": {
            "steps": 9,
            "step_busy_us": 2_500_000,
            "step_cpu_us": 2_100_000,
            "step_clock": {"steps": 30, "rows": 200, "busy_s": 2.5},
        },
    }
    s = summarize(Run(Path("x"), header("s", "embedded", 10), [rec(0, 0.01)], footer), SLO_S)
    assert s.rows_per_step == pytest.approx(8.0) and s.busy_share == pytest.approx(0.75)
    assert s.cpu_share == pytest.approx(1.2 / 1.5)
    served = {
        "wall_s": 1.0,
        "counters_before": {"steps": 0, "rows": 0, "busy_s": 0.0, "cpu_s": 0.0},
        "counters_after": {"steps": 4, "rows": 10, "busy_s": 0.5, "cpu_s": 0.3},
    }
    s = summarize(Run(Path("v"), header("v", "serve", 10), [rec(0, 0.01)], served), SLO_S)
    assert s.cpu_share == pytest.approx(0.6)  # a server process, through GET /metrics
    baseline = {"wall_s": 1.0, "counters_before": {"steps": 0, "rows": 0, "busy_s": 0.0}}
    baseline["counters_after"] = {"steps": 4, "rows": 10, "busy_s": 0.5}
    s = summarize(Run(Path("y"), header("b", "backbone", 10), [rec(0, 0.01)], baseline), SLO_S)
    assert s.rows_per_step == pytest.approx(2.5) and s.busy_share == pytest.approx(0.5)
    assert s.cpu_share is None  # the bare backbone's batcher does not count CPU time
    s = summarize(Run(Path("z"), header("p", "peft", 10), [rec(0, 0.01)], {}), SLO_S)
    assert s.rows_per_step is None and s.busy_share is None and s.cpu_share is None


def test_the_adapters_plot_keeps_bursty_traffic_apart_from_poisson() -> None:
    """One series per target, corpus and popularity took the bursty 1,000-adapter run's
    saturation in place of the Poisson one's (it comes later in the standard set)."""
    from types import SimpleNamespace

    from benchmarks.load_plots import adapter_series

    def sweep(adapters: int, seq_s: float, arrival: str = "poisson", cv: float = 1.0):
        return SimpleNamespace(
            target="embedded",
            corpus="sms",
            popularity="zipf",
            num_adapters=adapters,
            arrival=arrival,
            cv=cv,
            saturation_seq_s=seq_s,
        )

    series = adapter_series(
        [sweep(1, 190.0), sweep(100, 180.0), sweep(1000, 170.0), sweep(1000, 82.6, "gamma", 3.0)]
    )
    assert series[("embedded", "sms", "zipf", "poisson")] == {1: 190.0, 100: 180.0, 1000: 170.0}
    assert series[("embedded", "sms", "zipf", "gamma cv 3")] == {1000: 82.6}


def test_a_scenario_from_two_runs_is_refused_not_merged() -> None:
    from types import SimpleNamespace

    def point(path: str):
        return SimpleNamespace(scenario="embedded-sms-1a", path=path)

    one_run = [point("out/a/embedded-sms-1a-r40.jsonl"), point("out/a/embedded-sms-1a-r80.jsonl")]
    assert report.runs_mixed(one_run) is None
    two_runs = [*one_run, point("out/b/embedded-sms-1a-r40.jsonl")]
    assert "comes from several runs (out/a, out/b)" in report.runs_mixed(two_runs)


def test_a_sweep_that_never_saturated_shows_its_best_rate_as_a_floor() -> None:
    from types import SimpleNamespace

    def point(offered: float, answered: float):
        return SimpleNamespace(
            num_sent=100,
            num_ok=100,
            latency_ms={"p99": 20.0},
            throughput_rps=answered,
            sent_rps=offered,
        )

    def sweep(points):
        return SimpleNamespace(
            scenario="s",
            target="embedded",
            corpus="sms",
            num_adapters=1,
            popularity="zipf",
            saturation_rps=51.6,
            saturation_seq_s=51.6,
            goodput_rps=40.0,
            low_load_p99_ms=9.0,
            low_load_rps=20.0,
            points=points,
        )

    kept_up = report.headline_table([sweep([point(20, 20), point(40, 40)])], 50.0)
    assert ">=51.6" in kept_up
    fell_behind = report.headline_table([sweep([point(20, 20), point(80, 51.6)])], 50.0)
    assert ">=" not in fell_behind and "51.6" in fell_behind


def _saturated(name: str, target: str, rate: float) -> Run:
    """Answers that fall behind the offer: half the rate served, latencies growing."""
    records = [rec(i / rate, 0.01 + i * 0.02) for i in range(100)]
    return Run(Path(f"{name}-{rate}.jsonl"), header(name, target, rate), records, {})


def test_a_ratio_against_a_sweep_that_never_saturated_says_which_way_it_may_lie() -> None:
    """The headline marks such a sweep's best rate ">=", a floor; its ratios were printed
    bare, and judged met or not as if both sides had saturated."""
    emb, bare = _saturated("emb", "embedded", 100), _run("bare", "backbone", 30, 0.01)
    rows = comparisons(sweeps([summarize(r, SLO_S) for r in (emb, bare)]), SLO_S)
    (row,) = rows
    assert row["bound"] == "<=" and row["met"] is (False if row["ratio"] < 0.9 else None)
    assert "<=" in report.comparisons_table(rows)
    emb, bare = _run("emb", "embedded", 30, 0.01), _saturated("bare", "backbone", 100)
    (row,) = comparisons(sweeps([summarize(r, SLO_S) for r in (emb, bare)]), SLO_S)
    assert row["bound"] == ">=" and row["met"] is (True if row["ratio"] >= 0.9 else None)
    (row,) = comparisons(
        sweeps(
            [
                summarize(_saturated(*a), SLO_S)
                for a in (("emb", "embedded", 100), ("bare", "backbone", 100))
            ]
        ),
        SLO_S,
    )
    assert row["bound"] == "" and row["met"] is (row["ratio"] >= 0.9)


def test_goodput_passes_over_a_rate_that_sent_nothing() -> None:
    empty = Run(Path("e-0.5.jsonl"), header("e", "embedded", 0.5), [], {})
    runs = [empty, _run("e", "embedded", 10, 0.01), _run("e", "embedded", 20, 0.01)]
    (sweep,) = sweeps([summarize(r, SLO_S) for r in runs])
    assert sweep.goodput_rps == 20


def test_throughput_runs_to_the_schedules_end_unless_the_cap_cut_it() -> None:
    """Ended at the last answer, a schedule of N requests read high by about 1/N: the gap
    after the last send went uncounted."""
    records = [rec(i * 0.1, 0.001) for i in range(10)]  # sent over 0.9 s of a 1 s schedule
    assert throughput(records)[0] == pytest.approx(10 / 0.901)
    assert throughput(records, 1.0)[0] == pytest.approx(10.0)
    run = Run(
        Path("x"), {**header("s", "embedded", 10), "traffic": {"duration_s": 1.0}}, records, {}
    )
    assert summarize(run, SLO_S).throughput_rps == pytest.approx(10.0)
    capped = {**header("s", "embedded", 10), "traffic": {"duration_s": 5.0, "max_requests": 10}}
    assert summarize(Run(Path("x"), capped, records, {}), SLO_S).throughput_rps == pytest.approx(
        10 / 0.901
    )
