"""``graft bench load|report``: run the load-test harness of a source checkout.

The harness lives in ``benchmarks/``, which is not part of the installed ``graft``
distribution, and ``server`` may not import ``benchmarks`` (STYLE.md's layering; a dynamic
import would only hide the dependency from ``tests/test_layering.py``). So this command is a
launcher, as ``make`` is: it runs ``python -m benchmarks.load`` (or ``.report``) in a child
process with the checkout on ``PYTHONPATH``, passes every argument through untouched, keeps
the caller's working directory (relative paths mean what the caller means) and returns the
child's exit status. Without a checkout next to this package it says so and stops.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

ACTIONS = {
    "load": ("benchmarks.load", "open-loop load test (python -m benchmarks.load --help)"),
    "report": ("benchmarks.report", "tables and plots from load-test JSONL files"),
}
# a prefix no argument starts with: every option (--help included) goes to the harness as is
_PASS_THROUGH_PREFIX = "\x00"


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``graft bench load ARGS...`` and ``graft bench report ARGS...``."""
    bench = sub.add_parser(
        "bench", help="load-test harness (needs a source checkout; see benchmarks/load.py)"
    )
    actions = bench.add_subparsers(dest="action", required=True)
    for action, (module, help_text) in ACTIONS.items():
        p = actions.add_parser(
            action, help=help_text, add_help=False, prefix_chars=_PASS_THROUGH_PREFIX
        )
        p.add_argument("args", nargs=argparse.REMAINDER)
        p.set_defaults(handler=_run_module, module=module)


def checkout_root() -> Path:
    """The source checkout this package was loaded from; ValueError when there is none."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "load.py").is_file():
        raise ValueError(
            "graft bench needs a source checkout: the benchmarks/ folder is not installed "
            f"with the package (looked in {root}); run it from a git clone installed with "
            "'pip install -e .'"
        )
    return root


def _run_module(args: argparse.Namespace) -> int:
    root = checkout_root()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", args.module, *args.args]
    return subprocess.run(command, env=env, check=False).returncode
