"""The upload-stall benchmark runs end to end against a real `graft serve`; no timing asserted."""

import re

from benchmarks import upload_stall


def test_a_small_upload_is_accepted_and_both_phases_are_probed(capsys) -> None:
    assert upload_stall.main(["--rows", "2000", "--baseline-s", "0.5"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"upload: [\d.]+ MB, 2000 rows, HTTP 202", out), out
    for phase in ("before", "during"):
        assert re.search(rf"GET /health {phase}: \d+ probes, p50 [\d.]+ ms", out), out
    assert "p99 during / before:" in out
