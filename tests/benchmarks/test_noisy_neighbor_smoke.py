"""The noisy-neighbour benchmark runs end to end in its quick configuration, in both transports.

No timing is asserted (the machine may be shared): only that the JSON has what the table is
built from, and that tenant B got answers in every phase it could.
"""

import json
from pathlib import Path

import pytest
import torch

from benchmarks import noisy_neighbor

PHASE_KEYS = {"b", "elapsed_s", "engine", "tenants"}
LATENCY_KEYS = {"num_sent", "num_ok", "success_pct", "p50_ms", "p99_ms", "statuses", "timeline"}


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """The engine may set torch's thread count for the whole process; put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", ["embedded", "http"])
def test_quick_run_writes_the_table(tmp_path: Path, mode: str) -> None:
    payload = noisy_neighbor.main(["--quick", "--mode", mode, "--out", str(tmp_path)])
    written = json.loads((tmp_path / "noisy_neighbor.json").read_text())
    assert written == json.loads(json.dumps(payload))
    assert {"machine", "config", "settings", "results", "table"} <= set(written)
    assert {"cores", "torch_threads"} <= set(written["machine"])
    assert {"max_batch_tokens", "contended_batch_tokens", "tenant_max_queued_rows"} <= set(
        written["config"]
    )
    result = written["results"][mode]
    assert result["capacity"]["requests_per_s"] > 0 and result["b_rate_per_s"] > 0
    assert [p["kind"] for p in result["step_probes"]][0] == "short"
    for scheduler in ("fair", "fifo"):
        solo, contended = result[scheduler]["solo"], result[scheduler]["contended"]
        assert set(solo) >= PHASE_KEYS and set(contended) >= PHASE_KEYS | {"a"}
        assert set(solo["b"]) >= LATENCY_KEYS and set(contended["b"]) >= LATENCY_KEYS
        assert solo["b"]["num_ok"] > 0  # B alone is answered, with the engine's timings
        assert solo["b"]["queue_p50_ms"] is not None and solo["b"]["compute_p50_ms"] > 0
        assert set(contended["a"]) >= {"inputs_served_per_s", "inputs_answered", "statuses"}
        assert contended["b"]["num_sent"] > 0  # under the flood, answers depend on the machine
    assert len(written["table"]["rows"]) == 2
