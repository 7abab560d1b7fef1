"""HTTP targets: graft's server or the PEFT baseline, or a server already running at a URL.

The servers started here run in a child process each (``load_server_process``), as they are
deployed, so they share only the machine's cores with the load generator. With
``server_process=False`` they run in a thread of this process instead, with their own event
loop (uvloop where installed): one process to profile, but one interpreter lock for client
and server.
"""

import asyncio
import contextlib
import functools
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any

import msgspec

from benchmarks.load_fleet import Fleet
from benchmarks.load_server_process import ServerProcess, read_metrics
from benchmarks.load_targets import (
    HttpTarget,
    StepClock,
    Target,
    TargetOptions,
    engine_config,
    engine_counters,
)

_STOP_TIMEOUT_S = 60.0


@contextlib.asynccontextmanager
async def open_http_target(
    kind: str, fleet: Fleet, options: TargetOptions
) -> AsyncIterator[Target]:
    import aiohttp

    client_timeout = aiohttp.ClientTimeout(total=(options.timeout_s or 60.0) + 60.0)
    connector = aiohttp.TCPConnector(limit=options.connections)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session,
        _http_server(kind, fleet, options) as (url, models, keys, counters),
    ):
        if kind == "url":
            models, keys = await discover_models(session, url, options.keys)
        if kind == "peft":

            async def counters() -> dict[str, Any]:
                async with session.get(url + "/stats") as response:
                    return msgspec.json.decode(await response.read())

        elif counters is None:  # graft in another process: its /metrics (none: {})
            counters = functools.partial(read_metrics, session, url)

        yield HttpTarget(kind, session, url, models, keys, options.timeout_s, counters)


@contextlib.asynccontextmanager
async def _http_server(kind: str, fleet: Fleet, options: TargetOptions):
    """(url, models, keys, counters) of the server to drive; started here unless ``url``."""
    if kind == "url":
        if not options.url:
            raise ValueError("--url is required for an external server")
        yield options.url, (), {}, None
        return
    if kind == "peft" and options.quantize != "none":
        raise ValueError("the PEFT server has no int8 path: run peft scenarios without --quantize")
    if options.server_process:  # counters: graft's /metrics, the PEFT server's /stats
        thread, counters = ServerProcess(kind, fleet, options), None
    elif kind == "serve":
        thread, counters = _graft_server(fleet, options)
    else:
        thread, counters = ServerThread(_serving(kind, fleet, options)), None
    # graft resolves a bare name in the key's tenant; the PEFT server has no auth, so its
    # model names carry their tenants
    peft_names = tuple((t, f"{t}/{n}") for t, n in fleet.models)
    models = fleet.models if kind == "serve" else peft_names
    loop = asyncio.get_running_loop()
    url = await loop.run_in_executor(None, thread.start)
    try:
        yield url, models, fleet.keys, counters
    finally:
        await loop.run_in_executor(None, thread.stop)


def server_coroutine(
    kind: str,
    fleet: Fleet,
    options: TargetOptions,
    on_listening: Callable[[str], Awaitable[None]],
    on_ready: Callable[[Any], Awaitable[None]] | None = None,
) -> Coroutine:
    """The server of ``kind`` ("serve": graft's, "peft": the baseline) over ``fleet``, to run
    until cancelled (graft's also until SIGTERM); here or in a child process."""
    if kind == "serve":
        from server.app import run_server

        config = engine_config(fleet, options)
        return run_server(
            config,
            "127.0.0.1",
            0,
            on_listening=on_listening,
            on_ready=on_ready,
            workers=options.server_workers,
        )
    from benchmarks.peft_server import run_peft_server

    return run_peft_server(
        fleet.models,
        fleet.adapter_dirs,
        "127.0.0.1",
        0,
        on_listening=on_listening,
        max_wait_s=options.peft_max_wait_s,
        device=options.device,
        dtype=options.dtype,
        backbone_dir=options.backbone_dir,
        num_threads=engine_config(fleet, options).intra_op_threads,
    )


def _serving(kind: str, fleet: Fleet, options: TargetOptions, on_ready=None):
    def serve(on_listening: Callable[[str], Awaitable[None]]) -> Coroutine:
        return server_coroutine(kind, fleet, options, on_listening, on_ready)

    return serve


def _graft_server(fleet: Fleet, options: TargetOptions):
    """graft's own ``run_server`` in a thread, and how to read its engine's counters."""
    clock = StepClock(keeps_spans=False)
    engines: list[Any] = []

    async def on_ready(engine: Any) -> None:
        engines.append(engine)
        clock.install(engine)

    thread = ServerThread(_serving("serve", fleet, options, on_ready))

    async def snapshot() -> dict[str, Any]:
        return engine_counters(engines[0], clock)

    async def counters() -> dict[str, Any]:
        return await thread.call(snapshot()) if engines else {}

    return thread, counters


async def discover_models(
    session: Any, url: str, keys: Sequence[str]
) -> tuple[tuple[tuple[str, str], ...], dict[str, str]]:
    """Every model the keys see (``GET /v1/adapters``), in listing order, and tenant -> key."""
    if not keys:
        raise ValueError("--key is required with --url (repeat it for several tenants)")
    models: list[tuple[str, str]] = []
    tenant_keys: dict[str, str] = {}
    for key in keys:
        headers = {"Authorization": f"Bearer {key}"}
        async with session.get(url.rstrip("/") + "/v1/adapters", headers=headers) as response:
            if response.status != 200:
                raise ValueError(f"GET /v1/adapters answered {response.status} for a --key")
            listing = msgspec.json.decode(await response.read())["data"]
        for info in listing:
            tenant = info["model"].split("/", 1)[0]
            tenant_keys.setdefault(tenant, key)
            if (tenant, info["name"]) not in models:  # a server may show every key everything
                models.append((tenant, info["name"]))
    if not models:
        raise ValueError(f"no models behind {url} for the given keys")
    return tuple(models), tenant_keys


class ServerThread:
    """Runs a server coroutine in its own thread and event loop (uvloop where installed)."""

    def __init__(self, serve: Callable[[Callable[[str], Awaitable[None]]], Coroutine]) -> None:
        self._serve = serve
        self._listening = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._url: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="bench-server", daemon=True)

    def start(self) -> str:
        """Start serving; the server's URL once its socket is bound."""
        self._thread.start()
        while not self._listening.wait(0.1):
            if not self._thread.is_alive() or self._error is not None:
                break
        if self._url is None:
            raise RuntimeError(f"the in-process server did not start: {self._error!r}")
        return self._url

    def stop(self) -> None:
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(_STOP_TIMEOUT_S)

    async def call(self, coro: Coroutine) -> Any:
        """Await ``coro`` on the server's loop (engine state is only read from its own loop)."""
        if self._loop is None:
            raise RuntimeError("the server thread has not started")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def _main(self) -> None:
        try:
            import uvloop

            self._loop = uvloop.new_event_loop()
        except ImportError:
            self._loop = asyncio.new_event_loop()

        async def on_listening(url: str) -> None:
            self._url = url
            self._listening.set()

        self._task = self._loop.create_task(self._serve(on_listening))
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # reported by start(); a stopped server has no one to tell
            self._error = exc
        finally:
            self._loop.close()
