"""Which part of a cold adapter load slows a warm step that runs beside it (issue 5).

    python -m benchmarks.cold_interference [--steps 150] [--modes idle,read,parse,pack,...]

One thread runs a warm tenant's one-row step back to back, as the model thread does; another
repeats one phase of a cold load (or a control) with a 4 ms pause between repetitions, so
most steps overlap one. Reported per mode: the step's p50 / p90 / p99 and how many times the
phase ran. Modes:

- ``idle``: the other thread only sleeps (the baseline);
- ``read``: the registry's read + SHA-256 verification of one adapter's files;
- ``parse``: tensors viewed out of already-verified bytes (``parse_adapter``);
- ``pack``: parse, then lay out as pool rows in a fresh host buffer (``AdapterMemory.pack``);
- ``full``: the whole load a cold request starts (``AdapterStore.read``);
- ``python``: a 1 ms pure-Python loop, holding the interpreter lock throughout (control);
- ``memcpy``: four 1.3 MB tensor copies, which release the lock (control).

The files stay in the page cache here: the disk's own stalls are ``benchmarks.cold_start``'s.
"""

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.cold_start import SHORT_TEXT, _publish_adapters
from benchmarks.load_stats import percentile

MODES = ("idle", "read", "parse", "pack", "full", "python", "memcpy")
_PAUSE_S = 0.004  # between two repetitions of a phase
_ADAPTERS = 40
_ENCODER = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


def _phases(engine, records) -> dict[str, Callable[[int], None]]:
    import torch

    from engine.adapters import parse_adapter

    model = engine._loaded  # benchmark instrumentation: the engine's own loader and pool
    verified = [engine.registry.read_verified(r) for r in records[:8]]
    src = torch.randn(332_000)  # about one rank-8 adapter on every MiniLM Linear
    dst = torch.empty_like(src)

    def parse(i: int):
        files = verified[i % len(verified)].files
        config, tensors = files["adapter_config.json"], files["adapter_model.safetensors"]
        return parse_adapter(config, tensors, ("ham", "spam"), "mean", model.backbone)

    def python(_: int) -> None:
        end = time.perf_counter() + 0.001
        while time.perf_counter() < end:
            pass

    def memcpy(_: int) -> None:
        for _ in range(4):
            dst.copy_(src)

    return {
        "idle": lambda _: None,
        "read": lambda i: engine.registry.read_verified(records[i % len(records)]),
        "parse": parse,
        "pack": lambda i: model.memory.pack(parse(i)),
        "full": lambda i: model.store.read(records[i % len(records)]),
        "python": python,
        "memcpy": memcpy,
    }


def _steps(engine, key: str, count: int) -> list[float]:
    from scheduler import Batch

    model = engine._loaded
    ids = model.backbone.tokenizer(SHORT_TEXT)["input_ids"]
    out = []
    for _ in range(count):
        model.memory.acquire(key, lambda: model.store._host.get(key))
        started = time.perf_counter()
        model.runner.step(Batch.of([key], [len(ids)], "warm"), [ids])
        out.append(time.perf_counter() - started)
        model.memory.release(key)
    return out


def _measure(engine, key: str, phase: Callable[[int], None], steps: int) -> dict:
    stop, runs = threading.Event(), [0]

    def beside() -> None:
        while not stop.is_set():
            phase(runs[0])
            runs[0] += 1
            time.sleep(_PAUSE_S)

    thread = threading.Thread(target=beside, name="interference")
    thread.start()
    try:
        times = sorted(_steps(engine, key, steps))
    finally:
        stop.set()
        thread.join()
    pick = lambda q: round(percentile(times, q) * 1000, 2)  # noqa: E731
    return {
        "phase_runs": runs[0],
        "step_p50_ms": round(statistics.median(times) * 1000, 2),
        "step_p90_ms": pick(90),
        "step_p99_ms": pick(99),
    }


async def run(modes: list[str], steps: int, threads: int, quantize: str) -> dict:
    from engine import Engine, EngineConfig, load_backbone
    from registry import Registry

    with tempfile.TemporaryDirectory(prefix="graft-interference-") as tmp:
        work = Path(tmp)
        backbone = load_backbone()
        with Registry(work / "registry") as registry:
            for tenant in ("cold", "warm"):
                registry.create_tenant(tenant)
            _publish_adapters(registry, backbone, "cold", _ADAPTERS, _ENCODER, work, "cold")
            _publish_adapters(registry, backbone, "warm", 1, _ENCODER, work, "hot")
        config = EngineConfig(
            registry_dir=work / "registry", num_threads=threads, quantize=quantize
        )
        async with Engine(config) as engine:
            key = await engine._loaded.store.pin(engine.registry.list_adapters("warm")[0])
            phases = _phases(engine, engine.registry.list_adapters("cold"))
            _steps(engine, key, 20)  # warm-up
            return {mode: _measure(engine, key, phases[mode], steps) for mode in modes}


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.common import serial_torch_here

    serial_torch_here()  # the engine's model thread keeps the only OpenMP team
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="warm steps timed per mode")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the steps")
    parser.add_argument("--quantize", default="none", help="none or int8")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    import torch

    torch.set_num_threads(args.threads)
    results = asyncio.run(run(modes, args.steps, args.threads, args.quantize))
    idle = results.get("idle", {}).get("step_p50_ms")
    print(f"{'mode':8s} {'runs':>5s} {'p50':>7s} {'p90':>7s} {'p99':>7s}  p50 added (ms)")
    for mode, row in results.items():
        added = "" if idle is None else f"{row['step_p50_ms'] - idle:+.2f}"
        print(
            f"{mode:8s} {row['phase_runs']:5d} {row['step_p50_ms']:7.2f} "
            f"{row['step_p90_ms']:7.2f} {row['step_p99_ms']:7.2f}  {added}"
        )
    return results


if __name__ == "__main__":
    from benchmarks.common import exit_on_sigterm

    exit_on_sigterm()
    main()
