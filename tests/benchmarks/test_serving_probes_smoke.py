"""The serving-path probes run end to end and report what they promise; no timing is asserted."""


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


def test_server_cpu_splits_the_server_process_by_thread() -> None:
    from benchmarks import server_cpu

    result = server_cpu.main(
        ["--requests", "40", "--warmup", "5", "--concurrency", "4", "--adapters", "4"]
    )
    assert result["requests_per_s"] > 0 and result["rows_per_step"] >= 1
    assert result["event_loop_us"] > 0 and result["model_thread_us"] > 0
