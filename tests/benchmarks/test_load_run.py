"""A tiny real load test (embedded engine, 2 adapters) whose JSONL the report reads.

No timing is asserted: only that requests were sent on schedule, answered, recorded with the
promised fields, and that the report understands the file.
"""

import dataclasses
import json
import multiprocessing
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import load, report
from benchmarks.load import NO_FLEET
from benchmarks.load_server_process import counters_from_metrics
from benchmarks.load_targets import TargetOptions, engine_config


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_records(argv: list[str]) -> tuple[Path, list[dict]]:
    """Run ``benchmarks.load`` with ``argv`` (one rate); its JSONL file and parsed lines."""
    payload = load.main(argv)
    (path,) = Path(payload["run_dir"]).glob("*.jsonl")
    return path, [json.loads(line) for line in path.read_text().splitlines()]


def test_quick_embedded_run_writes_records_the_report_reads(tmp_path: Path) -> None:
    argv = ["--embedded", "--quick", "--rate", "8", "--duration", "1", "--no-progress"]
    path, lines = run_records([*argv, "--out", str(tmp_path)])
    head, records, foot = lines[0], lines[1:-1], lines[-1]
    assert head["kind"] == "header" and foot["kind"] == "footer"
    assert head["scenario"]["target"] == "embedded" and head["scenario"]["num_adapters"] == 2
    assert head["rate_rps"] == 8 and head["git"].keys() == {"commit", "dirty"}
    assert {"cpu", "cores", "torch"} <= head["machine"].keys()
    assert records and all(r["kind"] == "request" for r in records)
    fields = {"t_send", "latency_s", "queue_s", "compute_s", "status", "tenant", "model"}
    assert fields | {"n_inputs", "tokens"} <= records[0].keys()
    answered = [r for r in records if r["status"] == 200]
    assert answered, records
    for r in answered:
        assert r["latency_s"] > 0 and r["tokens"] > 2 and r["n_inputs"] == 1
        assert r["model"] in ("a0", "a1") and r["tenant"] in ("t0", "t1")
        if r["queue_s"] is not None:  # the step clock saw the request's step
            assert r["queue_s"] + r["compute_s"] <= r["latency_s"] + 1e-6
    assert foot["counters_after"]["steps"] > foot["counters_before"]["steps"]
    gc_pauses = foot["gc"]  # the collector's pauses in this process during the run
    assert gc_pauses["gc_pause_ms"] >= gc_pauses["gc_longest_ms"] >= 0
    assert gc_pauses["gc_full_passes"] >= 0

    summary = report.main([str(path), "--out", str(tmp_path / "report"), "--no-plots"])
    (run,) = summary["runs"]
    assert run["num_sent"] == len(records) and run["num_ok"] == len(answered)
    assert run["throughput_rps"] > 0
    assert summary["sweeps"][0]["scenario"] == "embedded-sms-2a-zipf"


def test_quantized_bare_backbone_run_answers_and_records_the_setting(tmp_path: Path) -> None:
    argv = ["--baseline", "backbone", "--quick", "--rate", "8", "--duration", "1"]
    _, lines = run_records([*argv, "--quantize", "int8", "--no-progress", "--out", str(tmp_path)])
    assert lines[0]["target_options"]["quantize"] == "int8"
    assert any(r.get("status") == 200 for r in lines[1:-1])


def test_quantize_refuses_the_peft_server_before_anything_runs(tmp_path: Path) -> None:
    argv = ["--baseline", "peft", "--quick", "--rate", "8", "--duration", "1", "--no-progress"]
    with pytest.raises(ValueError, match="no int8 path"):
        load.main([*argv, "--quantize", "int8", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # no run directory, no records


def test_a_random_bert_backbone_serves_every_target_kind_its_fleet(tmp_path: Path) -> None:
    argv = ["--baseline", "peft", "--quick", "--rate", "8", "--duration", "1", "--no-progress"]
    _, lines = run_records([*argv, "--hidden", "64", "--layers", "1", "--out", str(tmp_path)])
    backbone_dir = lines[0]["target_options"]["backbone_dir"]
    assert backbone_dir and backbone_dir.endswith("backbone")  # the PEFT server loaded it
    assert any(r.get("status") == 200 for r in lines[1:-1])  # adapters fit its 64-wide layers
    options = TargetOptions(backbone_dir=backbone_dir)
    assert engine_config(NO_FLEET, options).backbone_dir == backbone_dir  # graft's targets too


def test_quick_http_run_against_a_server_process_reads_its_metrics(tmp_path: Path) -> None:
    argv = ["--serve", "--quick", "--rate", "8", "--duration", "1", "--no-progress"]
    path, lines = run_records([*argv, "--out", str(tmp_path)])
    head, records, foot = lines[0], lines[1:-1], lines[-1]
    assert head["scenario"]["target"] == "serve" and head["target_options"]["server_process"]
    answered = [r for r in records if r["status"] == 200]
    assert answered, records
    for r in answered:  # the server's own split, from its Server-Timing header
        assert r["server_queue_s"] >= 0 and r["compute_s"] > 0
        assert r["server_queue_s"] + r["compute_s"] < r["latency_s"]
    before, after = foot["counters_before"], foot["counters_after"]  # from GET /metrics
    assert after["steps"] > before["steps"] and after["rows"] >= after["steps"]
    assert after["busy_s"] > before["busy_s"]
    assert 0 < after["cpu_s"] - before["cpu_s"] <= 1.05 * (after["busy_s"] - before["busy_s"])
    assert not multiprocessing.active_children()  # the server process is gone


def test_counters_from_metrics_reads_the_engine_totals_only() -> None:
    text = (
        "# TYPE graft_steps counter\ngraft_steps_total 12.0\n"
        "# TYPE graft_rows counter\ngraft_rows_total 30.0\n"
        "# TYPE graft_step_busy_seconds counter\ngraft_step_busy_seconds_total 0.25\n"
        "# TYPE graft_step_cpu_seconds counter\ngraft_step_cpu_seconds_total 0.2\n"
        '# TYPE graft_tenant_run_rows counter\ngraft_tenant_run_rows_total{tenant="a"} 30.0\n'
    )
    assert counters_from_metrics(text) == {
        "steps": 12.0,
        "rows": 30.0,
        "busy_s": 0.25,
        "cpu_s": 0.2,
    }


def test_contended_tokens_reach_graft_and_bad_values_are_refused(capsys) -> None:
    assert load.parse_args(["--contended-tokens", "none"]).contended_tokens is None
    assert load.parse_args([]).contended_tokens == "auto"
    options = TargetOptions(contended_tokens=256)
    assert engine_config(NO_FLEET, options).contended_batch_tokens == 256
    for bad in ("0", "many"):
        with pytest.raises(SystemExit):
            load.parse_args(["--contended-tokens", bad])
        assert "--contended-tokens" in capsys.readouterr().err


def test_driver_processes_share_the_schedule_of_an_http_run(tmp_path: Path) -> None:
    argv = ["--serve", "--quick", "--rate", "16", "--duration", "1", "--no-progress"]
    argv += ["--driver-processes", "2", "--server-workers", "1", "--out", str(tmp_path)]
    _, lines = run_records(argv)
    head, records, foot = lines[0], lines[1:-1], lines[-1]
    options = head["target_options"]
    assert (options["driver_processes"], options["server_workers"]) == (2, 1)
    assert len(records) == foot["num_sent"] >= 8
    times = [r["t_send"] for r in records]
    assert times == sorted(times)  # both shares, merged back in schedule order
    # the first rate waits for the spawned drivers: not sent seconds late while they import
    assert max(r["send_lag_s"] for r in records) < 0.5, [r["send_lag_s"] for r in records]
    assert sum(r["status"] == 200 for r in records) >= len(records) - 1, records
    assert foot["counters_after"]["rows"] > foot["counters_before"]["rows"]
    assert not multiprocessing.active_children()  # drivers and server are gone


def test_driver_processes_refuse_an_in_process_target(tmp_path: Path) -> None:
    argv = ["--embedded", "--quick", "--rate", "8", "--duration", "1", "--no-progress"]
    with pytest.raises(ValueError, match="drives HTTP targets"):
        load.main([*argv, "--driver-processes", "2", "--out", str(tmp_path)])


def test_only_runs_the_scenarios_named_in_the_order_given() -> None:
    """B-A after A-B is how two targets are compared on a machine whose speed drifts."""
    from benchmarks.load_args import parse_args

    argv = [
        "--scenarios",
        "--only",
        "serve-sms-100a-zipf,embedded-sms-100a-zipf,serve-sms-100a-zipf",
    ]
    names = [s.name for s in load.scenarios_from(parse_args(argv))]
    assert names == ["serve-sms-100a-zipf", "embedded-sms-100a-zipf"]
    with pytest.raises(ValueError, match="unknown scenarios \\['nope'\\]"):
        load.scenarios_from(parse_args(["--scenarios", "--only", "embedded-sms-1a,nope"]))


class _InstantTarget:
    """Answers every request at once: the sweep's bookkeeping without a model."""

    kind = "embedded"
    models = (("t0", "a0"),)

    async def send(self, tenant: str, model: str, texts) -> Any:
        from benchmarks.load_targets import Outcome

        return Outcome(200, time.perf_counter(), None, None, 3)

    async def counters(self) -> dict[str, Any]:
        return {}


def test_a_sweep_freezes_its_process_start_up_objects_until_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Driving a server in another process, the driver's own torch and transformers objects
    made a 250-390 ms full collection at the first saturated rate of every HTTP sweep."""
    import asyncio

    from benchmarks.load_sweep import Scenario, ScenarioRunner, SweepPlan
    from benchmarks.load_targets import TargetOptions
    from engine import collector

    calls: list[str] = []
    monkeypatch.setattr(collector, "freeze_startup_objects", lambda: calls.append("freeze"))
    monkeypatch.setattr(collector, "release_startup_objects", lambda: calls.append("release"))
    plan = SweepPlan(
        rates_rps=(40.0,), duration_s=0.2, max_requests=10, drain_s=1.0, probe_s=0.1, slo_s=0.05
    )
    runner = ScenarioRunner(
        _InstantTarget(),
        TargetOptions(),
        plan,
        tmp_path,
        {"sms": ["hello there", "free prize"]},
        seed=0,
        progress=False,
        command="test",
    )
    scenario = Scenario("instant", "embedded", "sms", 1)
    (summary,) = asyncio.run(runner.run(scenario, 0))
    assert summary.num_ok == summary.num_sent > 0
    asyncio.run(runner.run(scenario, 1))
    assert calls == ["freeze"]  # once, after the first warm-up, before the first rate
    runner.close()
    runner.close()
    assert calls == ["freeze", "release"]


def test_a_request_whose_target_raises_is_recorded_as_an_error_not_left_out() -> None:
    """Only cancellation was caught: any other exception left the request without a record,
    so it counted neither against the SLO nor among the errors."""
    import asyncio

    from benchmarks.arrivals import Arrival
    from benchmarks.load_stats import error_counts, slo_attainment
    from benchmarks.load_targets import Outcome
    from benchmarks.open_loop import drive

    class Flaky:
        kind = "embedded"
        models = (("acme", "spam"),)

        def __init__(self) -> None:
            self.calls = 0

        async def send(self, tenant, model, texts) -> Outcome:
            self.calls += 1
            if self.calls % 2 == 0:
                raise RuntimeError("tokenizer broke")
            return Outcome(200, time.perf_counter(), tokens=3)

        async def counters(self) -> dict[str, Any]:
            return {}

    arrivals = [Arrival(t_s=i * 0.001, adapter=0, texts=("hi",)) for i in range(10)]
    run = asyncio.run(drive(Flaky(), arrivals, drain_s=1.0, progress=False))
    records = [dataclasses.asdict(record) for record in run.records]
    assert len(records) == 10
    assert error_counts(records) == {"error": 5}
    assert [r["error"] for r in records if r["status"] != 200] == ["RuntimeError"] * 5
    assert slo_attainment(records, 0.05) == 0.5


def test_a_cv_without_gamma_arrivals_is_refused(capsys) -> None:
    """--cv 3 with Poisson arrivals ran Poisson traffic under a header that claimed CV 3."""
    for argv in (["--cv", "3"], ["--arrival", "gamma", "--cv", "0"]):
        with pytest.raises(SystemExit):
            load.parse_args(argv)
    assert "--arrival gamma" in capsys.readouterr().err
    assert load.parse_args(["--arrival", "gamma", "--cv", "3"]).cv == 3.0
