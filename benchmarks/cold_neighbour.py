"""The neighbour phase of ``benchmarks.cold_start``: what cold loads cost a warm tenant, and
what the warm tenant's steps cost the cold loads.

An unrelated warm tenant sends one request at a time, first alone, then while another
tenant's adapters load back to back from disk. Each load's own time (disk to a verified,
packed host copy) is kept too: on two cores shared with a step on both, what the loads do
not take from the warm tenant they wait for themselves.
"""

import asyncio
import time

SHORT_TEXT = "Your parcel is waiting, confirm delivery at the link"


async def measure_neighbour_delay(engine, cold_names: list[str], requests: int, summary) -> dict:
    """Warm tenant latency alone, then with cold loads of another tenant running meanwhile.
    ``summary`` turns a list of seconds into the caller's percentile summary."""

    async def warm_latencies() -> list[float]:
        out = []
        for i in range(requests):
            t0 = time.perf_counter()
            await engine.classify("warm", "hot0", [f"{SHORT_TEXT} {i}"])
            out.append(time.perf_counter() - t0)
        return out

    await engine.classify("warm", "hot0", [SHORT_TEXT])
    alone = await warm_latencies()

    store = engine._loaded.store
    records = {r.name: r for r in engine.registry.list_adapters("cold")}
    load_s: list[float] = []

    async def cold_traffic() -> None:
        # the loads alone (disk -> verified host copy), as a cold request starts them; the
        # cold request's own step would share the model with the warm tenant, which is
        # scheduling, not loading
        for name in cold_names:
            t0 = time.perf_counter()
            key = await store.pin(records[name])
            load_s.append(time.perf_counter() - t0)
            store.unpin(key)

    loads_before = engine.stats()["adapter_disk_loads"]
    cold_task = asyncio.create_task(cold_traffic())
    contended = await warm_latencies()
    await cold_task
    alone_s, contended_s = summary(alone), summary(contended)
    return {
        "warm_alone": alone_s,
        "warm_during_cold_loads": contended_s,
        "cold_loads_meanwhile": engine.stats()["adapter_disk_loads"] - loads_before,
        "cold_load": summary(load_s),
        "added_p50_ms": round(contended_s["p50_ms"] - alone_s["p50_ms"], 3),
        "added_p99_ms": round(contended_s["p99_ms"] - alone_s["p99_ms"], 3),
    }


def describe(n: dict) -> str:
    """One line per phase, for cold_start's table."""
    return (
        f"warm neighbour: alone p50 {n['warm_alone']['p50_ms']} / p99 "
        f"{n['warm_alone']['p99_ms']} ms; during {n['cold_loads_meanwhile']} cold loads p50 "
        f"{n['warm_during_cold_loads']['p50_ms']} / p99 {n['warm_during_cold_loads']['p99_ms']}"
        f" ms; added p50 {n['added_p50_ms']} ms, p99 {n['added_p99_ms']} ms\n"
        f"  those cold loads beside it: p50 {n['cold_load']['p50_ms']} / p99 "
        f"{n['cold_load']['p99_ms']} ms (disk to a verified host copy)"
    )
