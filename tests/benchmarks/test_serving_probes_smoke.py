"""The serving-path probes run end to end and report what they promise; no timing is asserted."""

import re

import pytest


def test_tokenize_contention_prints_both_ways(capsys) -> None:
    from benchmarks import tokenize_contention

    tokenize_contention.main(["--calls", "20", "--busy", "0,1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(row[0], " ".join(row[1:-3])) for row in rows] == [
        ("0", "hugging face call"),
        ("0", "TextEncoder.inline"),
        ("1", "hugging face call"),
        ("1", "TextEncoder.inline"),
    ]
    for row in rows:
        p50, p99, most = (float(v) for v in row[-3:])
        assert 0 < p50 <= p99 <= most


def test_long_inputs_checks_the_served_ids_and_prints_a_row_per_size(capsys) -> None:
    from benchmarks import long_inputs

    long_inputs.main(["--sizes", "1000,20000", "--calls", "1"])  # asserts ids equal inside
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[0] for row in rows] == ["1,000", "20,000"]
    assert int(rows[1][1].replace(",", "")) > 512  # past what the model reads: cut


def test_server_cpu_splits_the_server_process_by_thread() -> None:
    from benchmarks import server_cpu

    result = server_cpu.main(
        ["--requests", "40", "--warmup", "5", "--concurrency", "4", "--adapters", "4"]
    )
    assert result["requests_per_s"] > 0 and result["rows_per_step"] >= 1
    assert result["event_loop_us"] > 0 and result["model_thread_us"] > 0


def test_server_cpu_counts_front_end_processes_apart() -> None:
    from benchmarks import server_cpu

    argv = ["--requests", "40", "--warmup", "5", "--concurrency", "4", "--adapters", "4"]
    result = server_cpu.main([*argv, "--server-workers", "1"])
    assert result["requests_per_s"] > 0 and result["front_ends_us"] > 0
    assert result["event_loop_us"] > 0 and result["model_thread_us"] > 0


def test_server_cpu_measures_the_embedded_engine_too() -> None:
    from benchmarks import server_cpu

    argv = ["--requests", "40", "--warmup", "5", "--concurrency", "4", "--adapters", "4"]
    result = server_cpu.main([*argv, "--embedded"])
    assert result["requests_per_s"] > 0 and result["rows_per_step"] >= 1
    assert result["event_loop_us"] > 0 and result["model_thread_us"] > 0


def test_forward_dtypes_times_every_dtype_and_attention_kernel(capsys) -> None:
    from benchmarks import forward_dtypes

    argv = ["--hidden", "64", "--layers", "1", "--rows", "2", "--tokens", "8", "--budget-s", "0.01"]
    results = forward_dtypes.main(argv)
    assert set(results) == {
        f"{d}/{a}" for d in forward_dtypes.DTYPES for a in forward_dtypes.ATTENTION
    }
    assert all(ms > 0 for ms in results.values())
    assert capsys.readouterr().out.count(" on cpu: ") == len(results)


def test_profile_step_times_each_step_shape_asked_for(capsys) -> None:
    from benchmarks import profile_step

    profile_step.main(["--rows", "1,2", "--adapters", "1,2", "--repeats", "1", "--top", "0"])
    lines = [line for line in capsys.readouterr().out.splitlines() if " rows x " in line]
    segments = [line.split(" tokens, ")[1].split(" adapters")[0] for line in lines]
    assert segments == list("1112")  # a one-row step holds one adapter however many are asked
    assert [line.split(" rows x ")[0] for line in lines] == list("1122")


def test_profile_step_lists_the_ops_a_step_adds_on_a_random_bert(capsys) -> None:
    from benchmarks import profile_step

    argv = ["--rows", "2", "--adapters", "1", "--repeats", "1", "--top", "0", "--ops", "10"]
    profile_step.main([*argv, "--hidden", "32", "--layers", "1"])
    out = capsys.readouterr().out
    added = [line.split() for line in out.splitlines() if "aten::" in line]
    assert len(added) == 10 and all(float(n) > 0 for n, _ in added)
    assert "aten::mm" in out or "aten::addmm_" in out  # the LoRA shrink and expand


@pytest.mark.parametrize("layout", ["bert", "distilbert"])
def test_profile_step_compares_the_lean_forward_with_the_models_own(layout, capsys) -> None:
    from benchmarks import profile_step

    argv = ["--rows", "1", "--adapters", "1", "--repeats", "1", "--top", "0", "--layout", layout]
    profile_step.main([*argv, "--hidden", "32", "--layers", "1", "--compare-forward"])
    line = next(x for x in capsys.readouterr().out.splitlines() if "lean forward" in x)
    lean_ms, own_ms, ratio = (float(x) for x in re.findall(r"(\d+\.\d+)(?: ms|x)", line))
    assert lean_ms > 0 and own_ms > 0
    # the times are printed to 0.005 ms, the ratio (of the unrounded times) to 0.0005
    low, high = (lean_ms - 0.005) / (own_ms + 0.005), (lean_ms + 0.005) / (own_ms - 0.005)
    assert low - 0.0005 <= ratio <= high + 0.0005


def test_plan_cost_times_every_shape() -> None:
    from benchmarks import plan_cost

    results = plan_cost.main(["--plans", "3", "--sms", "300"])
    plans, sms = results[:4], results[4:]
    assert [(r["tenants"], r["lookahead"]) for r in plans] == [
        (100, 0),
        (100, 64),
        (10, 0),
        (10, 64),
    ]
    assert all(0 < r["p50_ms"] <= r["max_ms"] and r["rows_per_plan"] > 0 for r in plans)
    assert [r["lookahead"] for r in sms] == [0, 64]
    assert sms[1]["steps"] < sms[0]["steps"] <= 300  # looking past the head fills steps


def test_load_contention_times_loads_per_switch_interval_and_restores_it() -> None:
    import sys

    from benchmarks import load_contention

    before = sys.getswitchinterval()
    rows = load_contention.main(["--adapters", "3", "--switch-ms", "2,0.2", "--qv"])
    assert [row["switch_ms"] for row in rows] == [2.0, 0.2]
    for row in rows:
        assert row["alone_p50_ms"] > 0 and 0 < row["busy_p50_ms"] <= row["busy_max_ms"]
        assert row["busy_thread_kept"] > 0
    assert sys.getswitchinterval() == before
