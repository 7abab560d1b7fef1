"""The benchmarks run end to end in their smoke configuration and write what they promise.

No timing is asserted: only that every method ran, produced positive throughput, and that the
methods computed the same function.
"""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason="peft is a dev dependency: pip install -e '.[dev]'")

from benchmarks import kernels, mixed_batch  # noqa: E402


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The CLIs set torch's thread count for the whole process; give it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_mixed_batch_quick(tmp_path: Path) -> None:
    payload = mixed_batch.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "mixed_batch.json").read_text())
    assert written["results"] == json.loads(json.dumps(payload["results"]))
    assert {"machine", "backbone", "settings", "results", "summary"} <= set(written)
    assert {r["method"] for r in written["results"]} == set(mixed_batch.METHODS)
    for r in written["results"]:
        assert {"batch", "seq_tokens", "num_adapters", "ranks", "median_s"} <= set(r)
        assert r["seq_per_s"] > 0 and r["median_s"] > 0
        if r["method"] not in ("base", "peft"):  # graft and merged against PEFT
            assert r["max_abs_diff"] is not None and r["max_abs_diff"] < 1e-4
    assert {(r["num_adapters"], r["ranks"]) for r in written["summary"]} == {
        (1, "r8"),
        (4, "r8"),
        (4, "r4-64"),
    }
    for row in written["summary"]:
        assert row["graft_vs_base"] > 0 and row["graft_vs_peft"] > 0
    if written["plot"]:  # None where matplotlib (the bench extra) is not installed
        assert Path(written["plot"]).stat().st_size > 0


def test_mixed_batch_random_backbone(tmp_path: Path) -> None:
    argv = ["--quick", "--threads", "1", "--hidden", "64", "--layers", "2"]
    payload = mixed_batch.main(
        [*argv, "--methods", "base,graft-gather,peft", "--out", str(tmp_path)]
    )
    assert "hidden 64, 2 layers" in payload["backbone"]
    assert {r["method"] for r in payload["results"]} == {"base", "graft-gather", "peft"}
    assert all(r["seq_per_s"] > 0 for r in payload["results"])


def test_kernels_quick(tmp_path: Path) -> None:
    payload = kernels.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "kernels.json").read_text())
    assert {"machine", "settings", "results"} <= set(written)
    methods = {r["method"] for r in written["results"]}
    assert methods == {"linear", "sgmv", "bgmv", "naive-loop", "padded-bmm"}  # no triton on CPU
    assert {r["pattern"] for r in written["results"]} >= {"one", "uniform-4", "zipf"}
    for r in written["results"]:
        assert {"hidden", "ranks", "num_segments", "median_s", "vs_linear"} <= set(r)
        assert r["median_s"] > 0 and r["vs_linear"] > 0
        if r["method"] != "linear":
            assert r["max_abs_diff"] < 1e-4
    assert len(payload["results"]) == len(written["results"])


def test_packed_steps_times_three_ways_that_answer_alike() -> None:
    from benchmarks import packed_steps

    argv = ["--rows", "2,8", "--bursts", "1", "--repeats", "1", "--adapters", "2"]
    table = packed_steps.main([*argv, "--threads", "1"])
    assert [row[0] for row in table] == [2, 8]
    for row in table:
        assert all(float(ms) > 0 for ms in row[2:5])  # padded, masked, apart
        assert float(row[-1]) < 1e-4  # float32: the same answers, to rounding
