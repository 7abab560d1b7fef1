"""graft's Triton kernels compile for a Hopper GPU here, where none exists: the interpreter
tests check what the kernels compute, this checks that the compiler accepts them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the Triton kernels need triton installed")

ROOT = Path(__file__).resolve().parents[2]


def test_every_kernel_compiles_to_cubin_for_sm90_in_every_dtype(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.kernels.cuda_compile"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(lines) == 9 and all(" ok: " in line for line in lines), done.stdout
