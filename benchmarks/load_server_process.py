"""An HTTP target's server (graft's ``run_server``, or the PEFT baseline) in a child process,
as servers are deployed, and graft's counters read back from its ``GET /metrics``.

A server in a thread of the load generator shares its interpreter lock: while the client
holds it, building requests and parsing answers, the server's model thread cannot take it
back between two operators, a cost that no real server pays for its clients (the two ways
side by side: benchmarks/RESULTS.md).
"""

import asyncio
import contextlib
import multiprocessing
import os
import signal
from multiprocessing.connection import Connection
from typing import Any

from benchmarks.load_fleet import Fleet
from benchmarks.load_targets import TargetOptions

_START_TIMEOUT_S = 300.0  # the PEFT baseline loads each adapter with PEFT: slow for 1,000
_STOP_TIMEOUT_S = 30.0

# graft_* samples of GET /metrics -> the keys the load reports read (load_stats.step_stats)
_STEP_COUNTERS = {
    "graft_steps_total": "steps",
    "graft_rows_total": "rows",
    "graft_step_busy_seconds_total": "busy_s",
    "graft_step_cpu_seconds_total": "cpu_s",
}


class ServerProcess:
    """``start`` spawns the server and returns its URL once it listens; ``stop`` ends it.
    Same interface as ``load_http.ServerThread``; both block, so call them off the loop."""

    def __init__(self, kind: str, fleet: Fleet, options: TargetOptions) -> None:
        self._args = (kind, fleet, options)
        self._process: multiprocessing.process.BaseProcess | None = None

    def start(self) -> str:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter, as deployed
        receiver, sender = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_child_main, args=(*self._args, sender), name="bench-server", daemon=True
        )
        self._process.start()
        sender.close()
        try:
            if not receiver.poll(_START_TIMEOUT_S):
                raise RuntimeError(f"the server process did not listen in {_START_TIMEOUT_S} s")
            status, detail = receiver.recv()
        except EOFError:
            status, detail = "error", f"the server process exited ({self._process.exitcode})"
        finally:
            receiver.close()
        if status != "listening":
            self.stop()
            raise RuntimeError(f"the server process did not start: {detail}")
        return detail

    @property
    def pid(self) -> int | None:
        """The server process's id once started (benchmarks.server_cpu reads its threads)."""
        return None if self._process is None else self._process.pid

    def stop(self) -> None:
        process = self._process
        if process is None or not process.is_alive():
            return
        process.terminate()  # SIGTERM: graft's server drains and closes its engine
        process.join(_STOP_TIMEOUT_S)
        if process.is_alive():
            process.kill()
            process.join()


async def read_metrics(session: Any, url: str) -> dict[str, Any]:
    """graft's step counters from its ``GET /metrics`` through an aiohttp ``session``; {}
    where the route answers anything but 200 (turned off, or guarded by a key)."""
    async with session.get(url.rstrip("/") + "/metrics") as response:
        if response.status != 200:
            return {}
        return counters_from_metrics(await response.text())


def counters_from_metrics(text: str) -> dict[str, Any]:
    """The engine counters a load report reads, from graft's Prometheus exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in _STEP_COUNTERS and not sample.labels:
                counts[_STEP_COUNTERS[sample.name]] = sample.value
    return counts


def _child_main(kind: str, fleet: Fleet, options: TargetOptions, sender: Connection) -> None:
    """In the child: run the server until SIGTERM, reporting its URL (or why it failed)."""
    from benchmarks.load_http import server_coroutine
    from benchmarks.load_targets import _set_threads

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _set_threads(options.threads)

    async def on_listening(url: str) -> None:
        sender.send(("listening", url))

    async def main() -> None:
        task = asyncio.ensure_future(server_coroutine(kind, fleet, options, on_listening))
        if kind != "serve":  # graft's run_server drains on SIGTERM by itself
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        try:
            import uvloop
        except ImportError:
            asyncio.run(main())
        else:
            uvloop.run(main())
    except BaseException as exc:
        with contextlib.suppress(OSError):
            sender.send(("error", repr(exc)))
        raise
    finally:
        sender.close()
