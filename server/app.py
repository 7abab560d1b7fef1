"""The aiohttp application over an Engine, and the serve loop the ``graft serve`` CLI runs."""

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

from aiohttp import web

from engine import Engine, EngineConfig
from server.adapter_routes import add_adapter_routes
from server.errors import error_middleware
from server.frontend import SHUTDOWN_GRACE_S
from server.metrics import add_metrics, timing_middleware
from server.quiet_log import quiet_malformed_requests
from server.request_ids import add_request_id
from server.routes import ENGINE, MAX_BODY_BYTES, STREAMS, add_routes, cancel_streams
from server.train_routes import TrainServiceConfig, add_train_routes
from server.workers import FrontEnds, FrontEndsFailed, front_ends

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024

OnReady = Callable[[Engine], Awaitable[None]]
METRICS_KEY_ENV = "GRAFT_METRICS_KEY"  # in the environment, not argv, where ps shows it


def create_app(
    engine: Engine,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    training: TrainServiceConfig | None = None,
    metrics: bool = True,
    metrics_key: str | None = None,
) -> web.Application:
    """The HTTP API over ``engine``; the caller starts and closes the engine. Training jobs
    (``training``, default settings when None) start and stop with the app. ``metrics``
    serves ``GET /metrics`` (Prometheus): to anyone, without per-tenant series, or with
    ``metrics_key`` only to scrapes that send it as a bearer key, with them."""
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    # the timing middleware is outermost, so it sees the status the error middleware chose
    middlewares = [timing_middleware, error_middleware] if metrics else [error_middleware]
    app = web.Application(client_max_size=max_body_bytes, middlewares=middlewares)
    app[ENGINE] = engine
    app[MAX_BODY_BYTES] = max_body_bytes
    app[STREAMS] = set()
    add_routes(app)
    add_adapter_routes(app)
    add_train_routes(app, training or TrainServiceConfig())
    if metrics:
        add_metrics(app, metrics_key)
    app.on_response_prepare.append(add_request_id)
    app.on_shutdown.append(cancel_streams)
    quiet_malformed_requests()
    return app


def raise_open_files_limit() -> int | None:
    """Raise this process's soft limit on open descriptors to its hard limit; returns the
    soft limit now (None where the OS has no such limit). Every client connection holds a
    descriptor, and distributions often leave the soft limit at 1,024 under a far higher
    hard one: past it, the server stops accepting connections. Front ends inherit it."""
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # e.g. macOS caps the soft limit below an infinite hard
        log.info("open files limit stays at %d (raising it to %d failed: %s)", soft, hard, exc)
        return soft
    log.info("open files limit raised from %d to %d", soft, hard)
    return hard


def metrics_key_from_env() -> str | None:
    """The bearer key ``GET /metrics`` asks for, from ``$GRAFT_METRICS_KEY``; None: open."""
    return os.environ.get(METRICS_KEY_ENV) or None


async def run_server(
    config: EngineConfig,
    host: str,
    port: int,
    *,
    on_ready: OnReady | None = None,
    on_listening: Callable[[str], Awaitable[None]] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    training: TrainServiceConfig | None = None,
    metrics: bool = True,
    metrics_key: str | None = None,
    workers: int = 0,
) -> None:
    """Start the engine, serve HTTP on ``host:port`` until SIGINT/SIGTERM or cancellation.

    ``workers`` > 0 serves the port from that many front-end processes (server/frontend.py),
    which authenticate, check and tokenize classify requests and hand them to this process
    as token ids; 0 serves everything from this process.

    ``on_listening(url)`` is awaited once the socket is bound (``url`` carries the real port
    when ``port`` is 0); then ``on_ready(engine)`` runs as a task beside the server, so it
    may send requests to it. Returns after SIGINT/SIGTERM; re-raises CancelledError when
    cancelled, and an exception of ``on_ready`` after stopping; raises FrontEndsFailed when
    front ends kept crashing. Either way it first stops accepting connections, cancels open
    streams (their jobs with them), gives other requests ``SHUTDOWN_GRACE_S`` to finish (a
    503 after it), and closes the engine. A signal before it serves undoes the start
    (KeyboardInterrupt for SIGINT, as Ctrl-C there always was).
    """
    if workers < 0:  # before the backbone loads, not after
        raise ValueError(f"workers must be 0 (one process) or more, got {workers}")
    if not 0 <= port <= 65535:  # the OS would bind port % 65536, or fail obscurely
        raise ValueError(f"port must be from 0 (any free port) to 65535, got {port}")
    try:  # a mistyped host is named now, before the backbone loads
        socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"host {host!r} cannot be listened on: {exc.strerror}") from None
    raise_open_files_limit()
    shutdown = _Shutdown()
    with _on_signals(shutdown):
        try:
            make_app = functools.partial(
                create_app,
                max_body_bytes=max_body_bytes,
                training=training,
                metrics=metrics,
                metrics_key=metrics_key,
            )
            listen = functools.partial(
                _listening, host=host, port=port, workers=workers, max_body_bytes=max_body_bytes
            )
            await _serve(config, make_app, listen, shutdown, on_ready, on_listening)
        except asyncio.CancelledError:
            if shutdown.caught is None:  # the caller cancelled it
                raise
            if shutdown.caught == signal.SIGINT:
                raise KeyboardInterrupt from None
    log.info("graft server stopped")


async def _serve(
    config: EngineConfig,
    make_app: Callable[[Engine], web.Application],
    listen: Callable[..., contextlib.AbstractAsyncContextManager[FrontEnds]],
    shutdown: "_Shutdown",
    on_ready: OnReady | None,
    on_listening: Callable[[str], Awaitable[None]] | None,
) -> None:
    async with Engine(config) as engine:
        runner = web.AppRunner(
            make_app(engine),
            handler_cancellation=True,  # a client that goes away cancels its handler and job
            shutdown_timeout=SHUTDOWN_GRACE_S,
        )
        await runner.setup()
        grace = _Grace(engine)
        shutdown.hurry = grace.end_now
        gave_up: list[str] = []
        try:
            async with listen(runner, engine) as ends:
                url = _base_url(ends.address)
                log.info("graft serving on %s", url)
                if on_listening is not None:
                    await on_listening(url)
                stop = shutdown.stop
                if ends.gave_up is not None:  # front ends crash as they start: stop
                    ends.gave_up.add_done_callback(lambda t: _front_ends_gone(t, stop, gave_up))
                shutdown.is_serving = True
                try:
                    await _serve_until(stop, on_ready, engine)
                finally:  # the streams front ends proxy end here first, so they stop at once
                    await cancel_streams(runner.app)
                    grace.start()
        finally:
            await runner.cleanup()
            await grace.finish()
        if gave_up:  # a failure, for the exit status: not a stop anyone asked for
            raise FrontEndsFailed(gave_up[0])


class _Grace:
    """Once a stop begins, requests still unanswered after ``SHUTDOWN_GRACE_S`` fail (503,
    the engine closed) rather than run on. aiohttp's own shutdown waits its timeout for a
    handler, then cancels it and waits as long again, and a handler whose job still runs
    outlives the cancel: requests ran twice the grace, and behind front ends, which are
    killed 5 s past it, the client saw its connection dropped."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._timer: asyncio.TimerHandle | None = None
        self._closing: asyncio.Task[None] | None = None
        self._hurried = False

    def start(self) -> None:
        if self._timer is None:
            delay = 0.0 if self._hurried else SHUTDOWN_GRACE_S
            self._timer = asyncio.get_running_loop().call_later(delay, self._end)

    def end_now(self) -> None:
        """A second signal: what still runs fails now, not at the grace's end."""
        self._hurried = True
        if self._timer is not None and self._closing is None:
            self._timer.cancel()
            self._end()

    def _end(self) -> None:
        if self._closing is None:
            log.warning("requests still running as the stop ends its grace fail now")
            self._closing = asyncio.create_task(self._engine.close(), name="graft-grace-ended")

    async def finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._closing is not None:
            await self._closing


@contextlib.asynccontextmanager
async def _listening(
    runner: web.AppRunner,
    engine: Engine,
    *,
    host: str,
    port: int,
    workers: int,
    max_body_bytes: int,
) -> AsyncIterator[FrontEnds]:
    """This process on ``host:port``, or ``workers`` front-end processes there."""
    if workers == 0:
        await web.TCPSite(runner, host, port).start()
        yield FrontEnds(runner.addresses[0], None)
        return
    async with front_ends(runner, engine, host, port, workers, max_body_bytes) as ends:
        yield ends


def _front_ends_gone(task: "asyncio.Task[str]", stop: asyncio.Event, gave_up: list[str]) -> None:
    if task.cancelled() or stop.is_set():
        return
    error = task.exception()  # e.g. a replacement that could not be started
    reason = str(error) if error is not None else task.result()
    log.error("%s; stopping the server", reason)
    gave_up.append(reason)
    stop.set()


async def _serve_until(stop: asyncio.Event, on_ready: OnReady | None, engine: Engine) -> None:
    """Wait for ``stop``; run ``on_ready`` meanwhile, stopping early if it fails."""
    hook = None
    if on_ready is not None:
        hook = asyncio.create_task(on_ready(engine), name="graft-on-ready")
        hook.add_done_callback(lambda task: _stop_if_failed(task, stop))
    try:
        await stop.wait()
    finally:
        if hook is not None:
            hook.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await hook  # re-raises the hook's own failure


def _stop_if_failed(task: "asyncio.Task[None]", stop: asyncio.Event) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("on_ready hook failed; stopping the server")
        stop.set()


class _Shutdown:
    """SIGINT/SIGTERM. While serving: set ``stop``, so open requests finish first (a second
    signal fails those still running at once). While still starting (the backbone loading,
    front ends spawning): cancel the start, which undoes what started, child processes
    included; killed there, this process orphaned them."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.is_serving = False
        self.caught: int | None = None
        self.hurry: Callable[[], None] | None = None  # a second signal while stopping
        self._task = asyncio.current_task()

    def __call__(self, sig: int) -> None:
        self.caught = self.caught or sig
        if self.is_serving:
            if self.stop.is_set() and self.hurry is not None:
                self.hurry()
            self.stop.set()
        elif self._task is not None:
            self._task.cancel()


@contextlib.contextmanager
def _on_signals(shutdown: _Shutdown) -> Iterator[None]:
    """Route SIGINT/SIGTERM to ``shutdown`` (where the platform and thread allow)."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, shutdown, sig)
        except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not main thread
            continue
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _base_url(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = address[0] or "0.0.0.0", address[1]  # "": every interface
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
