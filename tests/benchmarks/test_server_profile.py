"""``benchmarks.server_profile``: the split of py-spy's raw stacks, and one short real run."""

import pytest

from benchmarks import server_profile
from benchmarks.server_profile import OTHER, PARTS, parse_raw, report

_MAIN = (
    "<module> (<string>:1);_child_main (benchmarks/load_server_process.py:123);"
    "run (uvloop/__init__.py:92)"
)
_ROUTE = (
    "RequestHandler._handle_request (aiohttp/web_protocol.py:602);classify (server/routes.py:140)"
)
_THREAD = "Thread._bootstrap (threading.py:995);_worker (concurrent/futures/thread.py:83)"

RAW = [
    f"{_MAIN};{_ROUTE};submit (server/routes.py:166);"
    "EngineRequests.submit (engine/requests.py:80);"
    "EngineRequests._tokenize (engine/requests.py:270);TextEncoder.inline (engine/inputs.py:50) 6",
    f"{_MAIN};{_ROUTE};authenticate (server/routes.py:230) 3",
    f"{_MAIN};StepLoop.run (engine/step_loop.py:120) 1",
    f"{_MAIN} 10",
    f"{_THREAD};StepLoop._timed_step (engine/step_loop.py:212);"
    "ModelRunner.step (engine/runner.py:99) 20",
    "not a stack line",
    "",
]


def test_samples_split_into_threads_and_request_parts() -> None:
    profile = parse_raw(RAW, top=3)
    assert (profile.num_samples, profile.event_loop, profile.model) == (40, 20, 20)
    parts = profile.parts
    assert list(parts) == [*(label for label, _ in PARTS), OTHER]
    assert parts["HTTP request, whole (aiohttp)"] == 9
    assert parts["  classify route"] == 9
    assert parts["    Engine.submit"] == 6 and parts["      tokenize"] == 6
    assert parts["    authenticate (registry)"] == 3
    assert parts["      resolve (registry)"] == 0
    assert parts["step loop: plan, hand off, deliver"] == 1
    assert parts[OTHER] == 10  # the event loop's own frames only
    # line numbers are dropped, so one function is one frame; model-thread frames stay out
    assert {frame for frame, samples in profile.top if samples == 20} <= {
        "<module> (<string>)",
        "_child_main (benchmarks/load_server_process.py)",
        "run (uvloop/__init__.py)",
    }
    assert [samples for _, samples in profile.top] == [20, 20, 20]
    assert all("ModelRunner" not in frame for frame, _ in profile.top)
    # below the step itself, the model thread's frames are counted apart
    assert profile.model_top == [("ModelRunner.step (engine/runner.py)", 20)]


def test_report_gives_shares_of_the_event_loop() -> None:
    text = report(parse_raw(RAW))
    assert "samples: 20 of the event loop, 20 in model steps" in text
    assert "  classify route" in text and "45.0%" in text  # 9 of 20 event-loop samples
    assert "<module> (<string>)" in text
    assert "model steps, frames by inclusive samples" in text
    assert "100.0%  ModelRunner.step (engine/runner.py)" in text


def test_layers_need_hidden() -> None:
    with pytest.raises(SystemExit):
        server_profile.parse_args(["--layers", "2"])


def test_a_short_run_samples_the_server_process(tmp_path) -> None:
    profile = server_profile.main(
        [
            "--hidden", "32", "--layers", "1", "--adapters", "4", "--tenants", "2",
            "--requests", "300", "--warmup", "20", "--threads", "1", "--top", "5",
            "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert (tmp_path / "server_profile.txt").stat().st_size > 0
    assert profile.event_loop > 0 and profile.parts["HTTP request, whole (aiohttp)"] > 0
