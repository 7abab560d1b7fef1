"""The quality benchmark runs end to end in its quick configuration and writes its table.

No score or timing is asserted beyond sanity: the sizes are tiny. What must hold: every mode
ran on the fixed test set, head and lora were scored through the engine exactly as the trainer
measured them, and head models carry no LoRA bytes.
"""

import json
from pathlib import Path

import pytest
import torch

from benchmarks import quality


@pytest.fixture(autouse=True)
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_run_writes_the_table(tmp_path: Path) -> None:
    payload = quality.main(
        ["--quick", "--datasets", "sms", "--ranks", "4", "--threads", "1", "--out", str(tmp_path)]
    )
    written = json.loads((tmp_path / "quality.json").read_text())
    assert written["table"] == json.loads(json.dumps(payload["table"]))
    (report,) = written["reports"]
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"head", "lora-r4", "full"}
    for r in rows.values():
        assert r["test_rows"] == 40 and 0.0 <= r["metrics"]["macro_f1"] <= 1.0
        assert r["file_bytes"] > 0 and r["train_seconds"] > 0
    assert rows["head"]["lora_bytes"] == 0 and rows["lora-r4"]["lora_bytes"] > 0
    assert rows["head"]["served_equals_trainer"] and rows["lora-r4"]["served_equals_trainer"]
    assert rows["full"]["served_metrics"] is None and rows["full"]["lora_bytes"] is None
    assert rows["full"]["file_bytes"] > rows["lora-r4"]["file_bytes"]
    assert any("full - lora-r4" in c["check"] for c in report["targets"])
    # every mode scored on the same tokens: full cuts at max_length, and so do the others
    assert {r["eval_max_tokens"] for r in rows.values()} == {rows["full"]["max_length"]}
