"""``graft bench``: arguments pass through untouched to the harness in a child process."""

import subprocess
import sys
from pathlib import Path

import pytest

from server import bench_cli, cli


def test_bench_passes_every_argument_through() -> None:
    args = cli._parser().parse_args(["bench", "load", "--rate", "5", "--help", "-v", "x"])
    assert args.module == "benchmarks.load"
    assert args.args == ["--rate", "5", "--help", "-v", "x"]
    args = cli._parser().parse_args(["bench", "report", "a.jsonl", "--slo-ms", "20"])
    assert (args.module, args.args) == ("benchmarks.report", ["a.jsonl", "--slo-ms", "20"])


def test_bench_runs_the_module_from_the_checkout_keeping_the_callers_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = {}

    def fake_run(command, env, check):
        seen.update(command=command, pythonpath=env["PYTHONPATH"])
        return subprocess.CompletedProcess(command, 3)

    monkeypatch.setattr(bench_cli.subprocess, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "report", "runs/", "--no-plots"]) == 3
    assert seen["command"] == [sys.executable, "-m", "benchmarks.report", "runs/", "--no-plots"]
    root = bench_cli.checkout_root()
    assert (root / "benchmarks" / "load.py").is_file()
    assert seen["pythonpath"].split(":")[0] == str(root)


def test_bench_report_help_really_runs(capfd: pytest.CaptureFixture[str]) -> None:
    args = cli._parser().parse_args(["bench", "report", "--help"])
    assert bench_cli._run_module(args) == 0
    assert "python -m benchmarks.report" in capfd.readouterr().out
