"""Adapter cold start and rotation: registry on disk -> first answer, and many-adapter traffic.

    python -m benchmarks.cold_start [--loads 200] [--rotation 1,100,1000,5000] [--quick]
    python -m benchmarks.cold_start --device cuda   # page-in to GPU memory, with GB/s

1. Cold loads: for each of ``--loads`` rank-8 adapters (LoRA on every encoder linear, as
   ``graft train`` makes them), time the three stages separately on the engine's own code:
   read + verify + parse (registry files -> host tensors), host -> device (page-in to the
   pool), first step (one short text through the backbone with that adapter). Also the whole
   disk-to-answer path through ``Engine.classify``.
2. Neighbour delay: an unrelated warm tenant sends one request at a time while cold loads
   run; its latency is compared with the same requests without cold loads, and the loads'
   own time beside it is reported (``benchmarks/cold_neighbour.py``).
3. Rotation: closed-loop traffic (32 requests in flight) over 1, 100, 1000, 5000 adapters
   with Zipf(1.1) popularity, after a warm-up pass; throughput as a ratio to 1 adapter.

Outputs: a table on stdout and ``benchmarks/out/cold_start.json``.
"""

import argparse
import asyncio
import dataclasses
import itertools
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.cold_neighbour import SHORT_TEXT, describe, measure_neighbour_delay  # noqa: E402
from benchmarks.common import GcPauses, full_collection  # noqa: E402
from benchmarks.load_stats import percentile  # noqa: E402


def _summary_ms(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {
        "p50_ms": round(percentile(ms, 50), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "n": len(ms),
    }


def _publish_adapters(
    registry,
    backbone,
    tenant: str,
    count: int,
    targets: tuple[str, ...],
    work: Path,
    prefix: str,
    dtype: str = "float32",
) -> None:
    """``count`` distinct random rank-8 adapters stored as ``dtype``, published in bulk where
    the registry can."""
    import torch

    from engine.peft_io import write_peft_adapter

    names = [
        n
        for n in backbone.linear_names
        if not n.startswith("pooler") and any(n.endswith(t) for t in targets)
    ]
    gen = torch.Generator().manual_seed(0)
    manifest = {
        "labels": ["ham", "spam"],
        "base_sha256": backbone.sha256,
        "rank": 8,
        "pooling": "mean",
        "metrics": {},
    }
    batch = []
    for i in range(count):
        src = work / f"{prefix}{i}"
        modules = {
            n: (
                torch.randn(8, backbone.linears[n].in_features, generator=gen) * 0.02,
                torch.randn(backbone.linears[n].out_features, 8, generator=gen) * 0.02,
            )
            for n in names
        }
        write_peft_adapter(
            src,
            backbone,
            modules,
            rank=8,
            alpha=16,
            head_weight=torch.randn(2, backbone.hidden_size, generator=gen),
            head_bias=torch.zeros(2),
            dtype=getattr(torch, dtype),
        )
        batch.append((tenant, f"{prefix}{i}", src, manifest))
        if len(batch) == 500 or i == count - 1:
            _publish_batch(registry, batch)
            batch = []


def _publish_batch(registry, batch) -> None:
    import shutil

    try:
        from registry import PublishItem
    except ImportError:  # older registry without bulk publish
        for tenant, name, src, manifest in batch:
            registry.publish(tenant, name, src, manifest)
    else:
        registry.publish_many([PublishItem(t, n, s, m) for t, n, s, m in batch])
    for _, _, src, _ in batch:
        shutil.rmtree(src, ignore_errors=True)


def _drop_page_cache() -> bool:
    """Ask the kernel to forget cached file pages, so reads really hit the disk (root only)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measure_stages(engine, tenant: str, count: int) -> dict:
    """Time read+verify, host->device and first step of ``count`` cold adapters, one by one."""
    from scheduler import Batch

    model = engine._loaded
    store, memory, runner = model.store, model.memory, model.runner
    from benchmarks.common import synchronizer

    sync = synchronizer(engine.config.device)  # page-in copies are async on CUDA
    ids = model.backbone.tokenizer(SHORT_TEXT)["input_ids"]
    read_s, page_in_s, step_s, sizes, file_sizes = [], [], [], [], []
    # cold0..cold{count-1} exactly: the catalog lists names in string order (cold0, cold1,
    # cold10...), and taking its first ``count`` read the adapters the later phases time
    wanted = {f"cold{i}": i for i in range(count)}
    records = sorted(
        (r for r in engine.registry.list_adapters(tenant) if r.name in wanted),
        key=lambda r: wanted[r.name],
    )
    dropped = _drop_page_cache()

    def page_in_and_step(key: str, weights) -> tuple[float, float, float]:
        t1 = time.perf_counter()
        memory.acquire(key, lambda: weights)
        sync()
        t2 = time.perf_counter()
        runner.step(Batch.of([key], [len(ids)], tenant), [ids])
        sync()
        t3 = time.perf_counter()
        memory.release(key)
        return t1, t2, t3

    for record in records:
        key = f"{record.full_name}@{record.version}"
        read_before = store.disk_bytes_read
        t0 = time.perf_counter()
        weights = store.read(record)  # here, serially, as on a loader thread
        read_s.append(time.perf_counter() - t0)
        file_sizes.append(store.disk_bytes_read - read_before)
        # page-in and step on the model thread, as served (and with its intra-op threads)
        t1, t2, t3 = engine._executor.submit(page_in_and_step, key, weights).result()
        sizes.append(weights.num_bytes)
        page_in_s.append(t2 - t1)
        step_s.append(t3 - t2)
    load_s = [a + b for a, b in zip(read_s, page_in_s, strict=True)]
    page_in_gbps = sorted(n / t / 1e9 for n, t in zip(sizes, page_in_s, strict=True) if t > 0)
    return {
        "page_cache_dropped": dropped,
        "adapter_bytes": statistics.median(sizes) if sizes else 0,  # packed, pool dtype
        "adapter_file_bytes": statistics.median(file_sizes) if file_sizes else 0,
        "host_to_device_gb_per_s_p50": round(statistics.median(page_in_gbps), 3)
        if page_in_gbps
        else None,
        "read_verify_parse": _summary_ms(read_s),
        "host_to_device": _summary_ms(page_in_s),
        "first_step": _summary_ms(step_s),
        "load_total": _summary_ms(load_s),
        "disk_to_answer": _summary_ms([a + b for a, b in zip(load_s, step_s, strict=True)]),
    }


async def measure_end_to_end(engine, tenant: str, names: list[str]) -> dict:
    """Cold ``Engine.classify`` latency: registry on disk to first answer, through the loop."""
    latencies, before = [], engine.stats()
    for name in names:
        t0 = time.perf_counter()
        await engine.classify(tenant, name, [SHORT_TEXT])
        latencies.append(time.perf_counter() - t0)
    after = engine.stats()
    return {  # the loads each call paid: one of each, or the adapter was not cold
        **_summary_ms(latencies),
        "disk_loads": after["adapter_disk_loads"] - before["adapter_disk_loads"],
        "device_loads": after["adapter_device_loads"] - before["adapter_device_loads"],
    }


async def measure_rotation(
    engine, tenant: str, num_adapters: int, duration_s: float, in_flight: int = 32
) -> dict:
    """Closed-loop throughput with Zipf(1.1) popularity over ``num_adapters`` adapters.

    Twice: first with every adapter cold (the engine fresh and, where the process may, the
    page cache dropped: each first touch is a disk load, the transient after a restart), then
    in steady state once every adapter has been loaded one time (the host tier holds them
    all; the device pool still evicts and pages in as popularity says).
    """
    rng = random.Random(num_adapters)
    # cumulative once: rng.choices rebuilt them per request, 118 us at 5,000 adapters, on
    # the engine's event loop, a harness cost counted as the engine's loss
    cum_weights = list(
        itertools.accumulate(1.0 / (rank**1.1) for rank in range(1, num_adapters + 1))
    )
    names = [f"r{i}" for i in range(num_adapters)]

    async def loop(duration: float) -> dict:
        async def worker(deadline: float, done: list[int]) -> None:
            while time.perf_counter() < deadline:
                name = rng.choices(names, cum_weights=cum_weights)[0]
                await engine.classify(tenant, name, [SHORT_TEXT])
                done[0] += 1

        before, done = engine.stats(), [0]
        t0 = time.perf_counter()
        with GcPauses() as pauses:
            await asyncio.gather(*(worker(t0 + duration, done) for _ in range(in_flight)))
        elapsed = time.perf_counter() - t0
        after = engine.stats()
        steps = after["steps"] - before["steps"]
        return {
            "requests_per_s": round(done[0] / elapsed, 1),
            "rows_per_step": round((after["rows"] - before["rows"]) / max(1, steps), 1),
            "disk_loads": after["adapter_disk_loads"] - before["adapter_disk_loads"],
            "device_loads": after["adapter_device_loads"] - before["adapter_device_loads"],
            **pauses.summary(),
        }

    cold = await loop(duration_s)
    queue = list(names)

    async def toucher() -> None:
        while queue:
            await engine.classify(tenant, queue.pop(), [SHORT_TEXT])

    await asyncio.gather(*(toucher() for _ in range(in_flight)))
    await loop(duration_s / 2)  # the device pool settles into the popularity's working set
    steady = await loop(duration_s)
    return {"adapters": num_adapters, **steady, "cold": cold, **full_collection()}


async def run(args: argparse.Namespace, work: Path) -> dict:
    from engine import Engine, EngineConfig, load_backbone
    from registry import Registry

    backbone = load_backbone()
    registry_dir = work / "registry"
    try:
        registry = Registry(registry_dir, durable=False)
    except TypeError:
        registry = Registry(registry_dir)
    encoder = (
        "query",
        "key",
        "value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    )
    for tenant in ("cold", "warm", "rot"):
        registry.create_tenant(tenant)
    cold = args.loads + args.e2e + args.neighbour
    dtype = args.weights_dtype
    _publish_adapters(registry, backbone, "cold", cold, encoder, work, "cold", dtype)
    _publish_adapters(registry, backbone, "warm", 1, encoder, work, "hot", dtype)
    rotation = max(args.rotation)
    _publish_adapters(registry, backbone, "rot", rotation, ("query", "value"), work, "r", dtype)
    registry.close()
    results: dict = {}
    config = EngineConfig(
        registry_dir=registry_dir,
        adapter_pages=args.pages,
        num_threads=args.threads,
        device=args.device,
        quantize=args.quantize,
    )
    if args.loads_in_flight is not None:
        config = dataclasses.replace(config, max_loads_in_flight=args.loads_in_flight)
    async with Engine(config) as engine:
        results["stages"] = measure_stages(engine, "cold", args.loads)
        e2e = [f"cold{i}" for i in range(args.loads, args.loads + args.e2e)]
        results["e2e_page_cache_dropped"] = _drop_page_cache()
        results["engine_cold_classify"] = await measure_end_to_end(engine, "cold", e2e)
        neighbour = [
            f"cold{i}" for i in range(args.loads + args.e2e, args.loads + args.e2e + args.neighbour)
        ]
        results["neighbour_page_cache_dropped"] = _drop_page_cache()
        results["neighbour"] = await measure_neighbour_delay(
            engine, neighbour, args.neighbour, _summary_ms
        )
    rotation = []
    for n in args.rotation:  # each size on a fresh engine: an earlier size's adapters, the
        # popular ones (r0, r1...), stayed loaded and made the "cold" pass mostly warm
        async with Engine(config) as engine:
            _drop_page_cache()
            rotation.append(await measure_rotation(engine, "rot", n, args.duration))
    if rotation:
        base = rotation[0]["requests_per_s"]
    for row in rotation:
        row["ratio_vs_first"] = round(row["requests_per_s"] / base, 3)
        row["cold"]["ratio_vs_first"] = round(row["cold"]["requests_per_s"] / base, 3)
    results["rotation"] = rotation
    return results


def _print(results: dict, machine: dict) -> None:
    print(f"machine: {machine}")
    stages = results["stages"]
    print(
        f"cold loads (page cache dropped first: {stages['page_cache_dropped']}; per adapter "
        f"{stages['adapter_file_bytes'] / 1e6:.2f} MB of files, "
        f"{stages['adapter_bytes'] / 1e6:.2f} MB packed in the pool's dtype; host->device p50 "
        f"{stages['host_to_device_gb_per_s_p50']} GB/s)"
    )
    for name in (
        "read_verify_parse",
        "host_to_device",
        "load_total",
        "first_step",
        "disk_to_answer",
    ):
        s = stages[name]
        print(f"  {name:<18} p50 {s['p50_ms']:8.3f} ms   p99 {s['p99_ms']:8.3f} ms   n={s['n']}")
    e = results["engine_cold_classify"]
    print(
        f"  Engine.classify cold  p50 {e['p50_ms']:8.3f} ms   p99 {e['p99_ms']:8.3f} ms   "
        f"n={e['n']} (page cache dropped first: {results['e2e_page_cache_dropped']})"
    )
    print(describe(results["neighbour"]))
    print("rotation (Zipf 1.1, 32 in flight), steady state | first pass over cold adapters:")
    for r in results["rotation"]:
        c = r["cold"]
        print(
            f"  {r['adapters']:>5} adapters  {r['requests_per_s']:7.1f} req/s "
            f"x{r['ratio_vs_first']:.3f}  {r['rows_per_step']:4.1f} rows/step  "
            f"disk {r['disk_loads']:>4}  page-ins {r['device_loads']:>4} | "
            f"{c['requests_per_s']:7.1f} req/s x{c['ratio_vs_first']:.3f}  "
            f"{c['rows_per_step']:4.1f} rows/step  disk {c['disk_loads']:>4}\n"
            f"{'':>8}gc: paused {r['gc_pause_ms']} ms (longest {r['gc_longest_ms']}, "
            f"{r['gc_full_passes']} full) | {c['gc_pause_ms']} ms ({c['gc_longest_ms']}, "
            f"{c['gc_full_passes']} full); one full pass after: {r['gc_full_pass_ms']} ms over "
            f"{r['gc_tracked']} objects"
        )


def main(argv: list[str] | None = None) -> dict:
    import torch

    from benchmarks.common import serial_torch_here

    serial_torch_here()  # loads run serially, as on loader threads; the model thread's team only
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=200, help="cold loads timed by stage")
    parser.add_argument("--e2e", type=int, default=50, help="cold Engine.classify calls")
    parser.add_argument("--neighbour", type=int, default=50, help="warm requests per phase")
    parser.add_argument("--rotation", default="1,100,1000,5000")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per rotation run")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--pages", type=int, default=1024, help="device pool pages")
    parser.add_argument(
        "--loads-in-flight",
        type=int,
        default=None,
        help="EngineConfig.max_loads_in_flight: concurrent disk loads (default: the engine's)",
    )
    parser.add_argument("--device", default="cpu", help="engine device: cpu or cuda[:n]")
    parser.add_argument("--quantize", default="none", help="none or int8 (backbone Linears, CPU)")
    parser.add_argument(
        "--weights-dtype",
        choices=("float16", "float32"),
        default="float16",
        help="how the adapters are stored (float16: what graft train writes)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--quick", action="store_true", help="tiny configuration for tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.loads, args.e2e, args.neighbour, args.duration = 5, 3, 3, 0.5
        args.rotation = "1,4"
    args.rotation = [int(x) for x in str(args.rotation).split(",")]
    with tempfile.TemporaryDirectory(prefix="graft-cold-") as tmp:
        results = asyncio.run(run(args, Path(tmp)))
    from engine import EngineConfig

    machine = {
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        # the model thread's intra-op threads (this thread runs serially)
        "threads": EngineConfig(device=args.device, num_threads=args.threads).intra_op_threads,
        "device": args.device,
        "quantize": args.quantize,
        "weights_dtype": args.weights_dtype,
        "loads_in_flight": args.loads_in_flight or EngineConfig().max_loads_in_flight,
    }
    if args.device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    results["machine"] = machine
    _print(results, machine)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cold_start.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    from benchmarks.common import exit_on_sigterm

    exit_on_sigterm()
    main()
