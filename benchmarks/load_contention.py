"""A cold adapter's load on a loader thread, alone and beside a thread that keeps running
Python (as a busy event loop does), per interpreter switch interval.

    python -m benchmarks.load_contention [--adapters 60] [--switch-ms 5,0.5,0.1] [--qv]

Each torch op, file read and large hash gives the interpreter lock up; beside a thread that
runs Python, the loader then waits up to a switch interval to take it back, so a load that
gives the lock up 40 times can take 40 intervals. Files are read from the page cache (read
once before timing): this measures the hand-offs, not the disk. Also prints how much of its
rate alone the busy thread kept while the loads ran.
"""

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.cold_start import _publish_adapters

ENCODER = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


def _spin_rate(seconds: float, stop: Callable[[], bool] = lambda: False) -> float:
    """Rounds of pure Python a second, for ``seconds`` or until ``stop()``."""
    rounds, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds and not stop():
        for _ in range(1000):
            pass
        rounds += 1
    return rounds / (time.perf_counter() - start)


def _loads_ms(read: Callable[[], None], count: int) -> list[float]:
    """``count`` calls of ``read`` on a thread of their own, each timed."""
    out: list[float] = []

    def run() -> None:
        for _ in range(count):
            start = time.perf_counter()
            read()
            out.append((time.perf_counter() - start) * 1e3)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return out


def _beside_busy_python(read: Callable[[], None], count: int) -> tuple[list[float], float]:
    """The loads' times while this thread runs Python, and the share of its rate kept."""
    alone = _spin_rate(0.5)
    out: list[float] = []
    done = threading.Event()

    def run() -> None:
        out.extend(_loads_ms(read, count))
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    busy = _spin_rate(600.0, done.is_set)
    thread.join()
    return out, busy / alone


async def measure(args: argparse.Namespace, work: Path) -> list[dict]:
    from engine import Engine, EngineConfig, load_backbone
    from registry import Registry

    backbone = load_backbone()
    registry = Registry(work / "registry", durable=False)
    registry.create_tenant("t")
    targets = ("query", "value") if args.qv else ENCODER
    _publish_adapters(registry, backbone, "t", args.adapters, targets, work, "a", "float16")
    registry.close()
    # None: the engine leaves the interval alone; each row below sets its own
    config = EngineConfig(registry_dir=work / "registry", switch_interval_ms=None, num_threads=1)
    rows = []
    async with Engine(config) as engine:
        store = engine._loaded.store
        records = engine.registry.list_adapters("t")
        turn = iter(range(10**9))

        def read() -> None:
            store.read(records[next(turn) % len(records)])

        _loads_ms(read, len(records))  # into the page cache
        saved = sys.getswitchinterval()
        try:
            for switch_ms in args.switch_ms:
                sys.setswitchinterval(switch_ms / 1000)
                alone = _loads_ms(read, len(records))
                busy, kept = _beside_busy_python(read, len(records))
                rows.append(
                    {
                        "switch_ms": switch_ms,
                        "alone_p50_ms": round(statistics.median(alone), 2),
                        "busy_p50_ms": round(statistics.median(busy), 2),
                        "busy_max_ms": round(max(busy), 2),
                        "busy_thread_kept": round(kept, 2),
                    }
                )
        finally:
            sys.setswitchinterval(saved)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    from benchmarks.common import serial_torch_here

    serial_torch_here()  # loads run on one thread, as on loader threads
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=60, help="rank-8 adapters loaded")
    parser.add_argument(
        "--switch-ms",
        default="5,0.5,0.1",
        type=lambda text: [float(x) for x in text.split(",")],
        help="switch intervals in ms, comma-separated (Python's default is 5)",
    )
    parser.add_argument(
        "--qv", action="store_true", help="adapters on query and value only (compact on host)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="graft-load-contention-") as tmp:
        rows = asyncio.run(measure(args, Path(tmp)))
    kind = "query/value" if args.qv else "every encoder Linear"
    print(f"{args.adapters} rank-8 adapters on {kind}, float16 files, page cache warm:")
    for row in rows:
        print(
            f"  switch {row['switch_ms']:g} ms: load p50 {row['alone_p50_ms']:.2f} ms alone, "
            f"{row['busy_p50_ms']:.2f} ms beside busy Python (max {row['busy_max_ms']:.2f}); "
            f"the busy thread kept {row['busy_thread_kept']:.2f}x of its rate"
        )
    return rows


if __name__ == "__main__":
    main()
