"""``benchmarks.cold_start`` runs end to end in its quick configuration; no timing is asserted."""

import json
from pathlib import Path

import pytest
import torch

from benchmarks import cold_start


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The engine sets torch's thread count for the whole process; give it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cold_start_quick(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(cold_start, "_drop_page_cache", lambda: False)  # not the CI's cache
    results = cold_start.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "cold_start.json").read_text()) == json.loads(json.dumps(results))
    stages = results["stages"]
    assert stages["page_cache_dropped"] is False
    assert stages["adapter_bytes"] > 1_000_000  # rank 8 on all 36 Linears of MiniLM: 1.3 MB
    for stage in ("read_verify_parse", "host_to_device", "first_step", "load_total"):
        assert stages[stage]["n"] == 5 and 0 < stages[stage]["p50_ms"] <= stages[stage]["p99_ms"]
    e2e = results["engine_cold_classify"]  # each call paid a disk read and a page-in: the
    assert e2e["n"] == 3 and e2e["disk_loads"] == e2e["device_loads"] == 3  # stages read none
    assert results["neighbour"]["cold_loads_meanwhile"] == 3
    cold_load = results["neighbour"]["cold_load"]  # each load's own time beside the warm tenant
    assert cold_load["n"] == 3 and 0 < cold_load["p50_ms"] <= cold_load["p99_ms"]
    first, four = results["rotation"]
    assert (first["adapters"], four["adapters"]) == (1, 4)
    assert first["ratio_vs_first"] == 1.0
    assert four["cold"]["disk_loads"] == 4  # a fresh engine: each loaded once, when first asked
    assert four["disk_loads"] == 0  # steady state: all four stay in the host tier
    for row in (first, four, first["cold"], four["cold"]):
        assert row["requests_per_s"] > 0
        assert row["gc_pause_ms"] >= row["gc_longest_ms"] >= 0 and row["gc_full_passes"] >= 0
    assert four["gc_tracked"] > 0 and four["gc_full_pass_ms"] >= 0


def test_cold_interference_runs_each_phase_beside_the_steps(capsys) -> None:
    from benchmarks import cold_interference

    results = cold_interference.main(["--steps", "4", "--modes", "idle,full,python"])
    assert list(results) == ["idle", "full", "python"]
    for row in results.values():
        assert 0 < row["step_p50_ms"] <= row["step_p90_ms"] <= row["step_p99_ms"]
    assert results["full"]["phase_runs"] >= 1  # cold loads really ran beside the steps
    assert "full" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cold_interference.main(["--modes", "idle,teleport"])
