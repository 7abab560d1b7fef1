"""How the noisy-neighbour benchmark reaches the engine: in this process, or over HTTP.

Split out of ``benchmarks.noisy_neighbor`` so that the two transports sit behind one small
``Client`` protocol, and the load generators drive either without knowing which:
``EngineClient`` awaits the engine's jobs in this process, ``HttpClient`` posts to the aiohttp
server that ``serving`` starts in this event loop, and ``open_client`` picks one per mode.
"""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from benchmarks.neighbor_workload import MODELS, Workload
from engine import Engine, EngineConfig, EngineError, EngineOverloaded, TenantBusy
from server.app import run_server


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one request came to, whatever the transport."""

    status: str  # "ok", "429", "503", or the failure's name (HTTP status or exception type)
    num_inputs: int = 0  # predictions received: len(texts) when ok, else 0
    retry_after_s: float = 0.0  # the server's hint on 429/503, else 0
    queue_s: float | None = None  # when ok: admission to its first step (the engine's timing)
    compute_s: float | None = None  # when ok: its first step's start to its last step's end


class Client(Protocol):
    async def classify(self, tenant: str, texts: tuple[str, ...]) -> Outcome: ...


class EngineClient:
    """Submits to the engine in this process and awaits the job, keeping its timings."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def classify(self, tenant: str, texts: tuple[str, ...]) -> Outcome:
        try:
            job = await self._engine.submit(tenant, MODELS[tenant], texts)
            try:
                predictions = await job.results()
            except asyncio.CancelledError:
                job.cancel()  # as Engine.classify does: its queued rows never run
                raise
        except TenantBusy as exc:
            return Outcome("429", retry_after_s=exc.retry_after_s)
        except EngineOverloaded as exc:
            return Outcome("503", retry_after_s=exc.retry_after_s)
        except EngineError as exc:
            return Outcome(type(exc).__name__)
        timings = job.timings()
        return Outcome("ok", len(predictions), 0.0, timings.queue_s, timings.compute_s)


class HttpClient:
    """``POST /v1/classify`` over loopback; each distinct body is encoded once, so the flood's
    640 kB bodies cost the shared CPU the transfer and the server's parse, not our encoding."""

    def __init__(self, session: aiohttp.ClientSession, url: str, api_keys: dict[str, str]):
        self._session = session
        self._url = f"{url}/v1/classify"
        self._headers = {
            tenant: {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            for tenant, key in api_keys.items()
        }
        self._bodies: dict[tuple[str, tuple[str, ...]], bytes] = {}

    async def classify(self, tenant: str, texts: tuple[str, ...]) -> Outcome:
        body = self._bodies.get((tenant, texts))
        if body is None:
            payload = {"model": MODELS[tenant], "input": list(texts)}
            body = self._bodies[(tenant, texts)] = json.dumps(payload).encode()
        try:
            async with self._session.post(
                self._url, data=body, headers=self._headers[tenant]
            ) as response:
                raw = await response.read()
                if response.status == 200:
                    timings = _server_timing(response.headers.get("Server-Timing", ""))
                    num_inputs = len(json.loads(raw)["data"])
                    return Outcome(
                        "ok", num_inputs, 0.0, timings.get("queue"), timings.get("compute")
                    )
                retry_after_s = float(response.headers.get("Retry-After") or 0)
                return Outcome(str(response.status), retry_after_s=retry_after_s)
        except aiohttp.ClientError as exc:
            return Outcome(type(exc).__name__)


def _server_timing(header: str) -> dict[str, float]:
    """``queue;dur=1.5, compute;dur=9.0`` (milliseconds) -> {"queue": 0.0015, ...} seconds."""
    durations = {}
    for metric in header.split(","):
        name, _, params = metric.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur" and value:
                durations[name] = float(value) / 1000
    return durations


@contextlib.asynccontextmanager
async def serving(config: EngineConfig) -> AsyncIterator[tuple[str, Engine]]:
    """``run_server`` on 127.0.0.1, port 0, in this event loop; yields its URL and engine."""
    loop = asyncio.get_running_loop()
    listening: asyncio.Future[str] = loop.create_future()
    ready: asyncio.Future[Engine] = loop.create_future()

    async def on_listening(url: str) -> None:
        listening.set_result(url)

    async def on_ready(engine: Engine) -> None:
        ready.set_result(engine)

    server = asyncio.create_task(
        run_server(config, "127.0.0.1", 0, on_listening=on_listening, on_ready=on_ready)
    )
    try:
        await asyncio.wait([server, ready], return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            server.result()  # re-raises why it stopped
            raise RuntimeError("server stopped before it was ready")
        yield listening.result(), ready.result()
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server


@contextlib.asynccontextmanager
async def open_client(mode: str, config: EngineConfig, workload: Workload):
    if mode == "embedded":
        async with Engine(config) as engine:
            yield EngineClient(engine), engine
        return
    connector = aiohttp.TCPConnector(limit=0)  # open loop: no client-side queue
    async with serving(config) as (url, engine), aiohttp.ClientSession(connector=connector) as s:
        yield HttpClient(s, url, workload.api_keys), engine
