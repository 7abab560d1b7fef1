"""A benchmark stopped by SIGTERM (``timeout``, a process manager) unwinds its ``with`` blocks."""

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import tempfile, time
from benchmarks.common import exit_on_sigterm
exit_on_sigterm()
with tempfile.TemporaryDirectory() as scratch:
    print(scratch, flush=True)
    time.sleep(60)
"""


def test_sigterm_removes_the_scratch_directory_and_exits_143() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        scratch = Path(child.stdout.readline().strip())
        assert scratch.is_dir()
        time.sleep(0.2)
        child.terminate()
        assert child.wait(timeout=30) == 143  # 128 + SIGTERM
        assert not scratch.exists()
    finally:
        child.kill()
        child.stdout.close()
