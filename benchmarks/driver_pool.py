"""Open-loop driving from several processes, for HTTP targets faster than one driver.

One process sends, reads and records every request. An aiohttp client costs a few hundred
microseconds of CPU a request, so on a GPU host one driver fell behind its schedule past
about 2,500 req/s (``send_lag_s`` of 0.4-1.1 s, RESULTS "Front-end processes"), and the
sweep measured the driver, not the server. ``--driver-processes N`` deals each rate's
schedule round-robin to N processes that send their shares against one shared start time.
The arrivals are those one process would send, and the records come back in schedule order.
"""

import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from benchmarks.arrivals import Arrival
from benchmarks.load_targets import HttpTarget, Target
from benchmarks.open_loop import DrivenRun, drive

_LEAD_S = 0.25  # between dealing the shares and the first send: every process has its share
_READY_TIMEOUT_S = 120.0  # a spawned driver imports aiohttp and the benchmarks: seconds
_READY = "ready"
_STOP_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class HttpSpec:
    """What a driver process needs to open its own session to the same target."""

    kind: str
    url: str
    models: tuple[tuple[str, str], ...]
    keys: dict[str, str]
    timeout_s: float | None
    connections: int


class DriverPool:
    """``processes`` driver processes, started once and reused by every rate of a sweep."""

    def __init__(self, spec: HttpSpec, processes: int) -> None:
        if processes < 2:
            raise ValueError(f"a driver pool needs 2 or more processes, got {processes}")
        context = multiprocessing.get_context("spawn")
        self._connections: list[Connection] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        share = max(1, spec.connections // processes)
        for index in range(processes):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_child_main,
                args=(dataclasses.replace(spec, connections=share), theirs),
                name=f"bench-driver-{index}",
                daemon=True,
            )
            process.start()
            theirs.close()
            self._connections.append(ours)
            self._processes.append(process)
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> None:
        """Return once every process can send. A spawned driver spends seconds importing;
        a first rate dealt before that was sent late by as much (a send lag of 3.9-4.7 s, and
        a broken first rate in every HTTP sweep with --driver-processes, session 24)."""
        deadline = time.monotonic() + _READY_TIMEOUT_S
        for index, connection in enumerate(self._connections):
            if not connection.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"driver process {index} not ready in {_READY_TIMEOUT_S:.0f} s")
            try:
                message = connection.recv()
            except EOFError:
                message = "exited before it was ready"
            if message != _READY:
                raise RuntimeError(f"driver process {index} failed: {message}")

    async def drive(self, target: Target, arrivals: Sequence[Arrival], *, drain_s: float):
        """``open_loop.drive``'s run, sent from every process; counters read here."""
        before = await target.counters()
        count = len(self._connections)
        start_at = time.monotonic() + _LEAD_S
        for index, connection in enumerate(self._connections):
            connection.send((list(arrivals[index::count]), start_at, drain_s))
        parts = await asyncio.gather(*(asyncio.to_thread(c.recv) for c in self._connections))
        records: list[Any] = [None] * len(arrivals)
        for index, part in enumerate(parts):
            if isinstance(part, str):
                raise RuntimeError(f"driver process {index} failed: {part}")
            records[index::count] = part[0]
        after = await target.counters()
        send_window_s = max(part[1] for part in parts)
        wall_s = max(part[2] for part in parts)
        return DrivenRun(records, send_window_s, wall_s, before, after)

    def close(self) -> None:
        for connection in self._connections:
            with contextlib.suppress(OSError):  # a process gone already
                connection.send(None)
        for process in self._processes:
            process.join(_STOP_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join()


def http_spec(target: Target, connections: int) -> HttpSpec:
    if not isinstance(target, HttpTarget):
        raise ValueError(f"--driver-processes drives HTTP targets; {target.kind!r} is not one")
    return target.spec(connections)


def _child_main(spec: HttpSpec, connection: Connection) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(spec, connection))
    else:
        uvloop.run(_serve(spec, connection))


async def _serve(spec: HttpSpec, connection: Connection) -> None:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=spec.connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        target = HttpTarget(spec.kind, session, spec.url, spec.models, spec.keys, spec.timeout_s)
        connection.send(_READY)
        while (job := await asyncio.to_thread(connection.recv)) is not None:
            arrivals, start_at, drain_s = job
            try:
                run = await drive(
                    target, arrivals, drain_s=drain_s, progress=False, start_at=start_at
                )
            except Exception as exc:  # told to the parent, which stops the sweep
                connection.send(f"{type(exc).__name__}: {exc}")
                continue
            if len(run.records) != len(arrivals):
                connection.send(f"{len(arrivals) - len(run.records)} requests left no record")
                continue
            connection.send((run.records, run.send_window_s, run.wall_s))
