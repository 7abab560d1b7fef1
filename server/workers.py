"""Start and stop the front-end processes of ``graft serve --workers N`` (server/frontend.py)."""

import asyncio
import collections
import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator

from aiohttp import web

from engine import Engine
from server.frontend import SHUTDOWN_GRACE_S, FrontendConfig
from server.link import LinkServer, link_server
from server.train_routes import TRAINING

log = logging.getLogger(__name__)

_FOLDER_PREFIX = "graft-serve-"  # then the server's pid: its sockets' folder
_STALE_AFTER_S = 60.0  # a folder younger than this may be a server's still starting
START_TIMEOUT_S = 120.0  # each front end imports torch and transformers, then loads a tokenizer


@dataclasses.dataclass
class FrontEnds:
    address: tuple  # where the server listens: (host, port, ...) as the socket has it
    gave_up: "asyncio.Task[str] | None"  # ends, saying why, if front ends keep exiting
    link: LinkServer | None = None  # where they hand classify requests over


class FrontEndsFailed(RuntimeError):
    """The front-end processes did not all start listening."""


@contextlib.asynccontextmanager
async def front_ends(
    runner: web.AppRunner,
    engine: Engine,
    host: str,
    port: int,
    count: int,
    max_body_bytes: int,
) -> AsyncIterator[FrontEnds]:
    """``count`` front ends on ``host:port`` over the engine app of ``runner`` (set up, not yet
    listening), ready when yielded; on exit, they finish their open requests and stop."""
    if count < 1:
        raise ValueError(f"workers must be >= 1, got {count}")
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError(f"workers need SO_REUSEPORT, which {sys.platform} lacks: use workers=0")
    _remove_stale_folders(tempfile.gettempdir())
    prefix = f"{_FOLDER_PREFIX}{os.getpid()}-"
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:  # mode 0700: ours alone
        engine_path, link_path = f"{folder}/engine.sock", f"{folder}/link.sock"
        # front ends connect once per stream or proxied request: aiohttp's backlog of 128
        # refused bursts of them (EAGAIN), each a false 503
        await web.UnixSite(runner, engine_path, backlog=socket.SOMAXCONN).start()
        async with link_server(runner.app, link_path) as link:
            with _reserved_port(host, port) as bound:
                config = FrontendConfig(
                    host=host,
                    port=bound,
                    link_path=link_path,
                    engine_path=engine_path,
                    registry_dir=str(engine.config.registry_dir),
                    backbone_dir=str(engine.backbone.path),
                    max_input_tokens=engine.max_input_tokens,
                    max_inputs=engine.config.max_inputs_per_request,
                    max_body_bytes=max_body_bytes,
                    max_upload_bytes=_upload_cap(runner.app),
                    log_level=logging.getLogger().getEffectiveLevel(),
                )
                processes = await _spawn(config, count)
                exited = asyncio.create_task(_first_exit(processes))
                try:  # the holder keeps the port until every front end has bound it
                    await _until_ready(link, count, exited)
                except BaseException:
                    await _stop(processes)
                    raise
                finally:
                    exited.cancel()
            watch = asyncio.create_task(_replace_exited(config, processes, RestartBudget()))
            try:
                yield FrontEnds((host, bound), watch, link)
            finally:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
                await _stop(processes)


def _upload_cap(app: web.Application) -> int | None:
    """The engine app's POST /v1/train cap, for its front ends; None where it trains none."""
    training = app.get(TRAINING)
    return None if training is None else training.config.max_upload_bytes


def _remove_stale_folders(parent: str) -> None:
    """Remove the socket folders of servers of this user that died without cleaning up
    (SIGKILL, OOM): each would otherwise stay in the temp directory for good."""
    for entry in os.scandir(parent):
        pid, dash, _ = entry.name.removeprefix(_FOLDER_PREFIX).partition("-")
        if entry.name[: len(_FOLDER_PREFIX)] != _FOLDER_PREFIX or not dash or not pid.isdigit():
            continue
        if _is_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):  # another server may be removing it too
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            # a pid of another PID namespace (containers sharing /tmp) is no process here:
            # a live server still answers on its socket, and a new one has just made its folder
            if time.time() - info.st_mtime > _STALE_AFTER_S and not _answers(entry.path):
                shutil.rmtree(entry.path)


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _answers(folder: str) -> bool:
    """Whether a server still listens on the engine socket in ``folder``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)  # a full backlog (a stopped server's) may block a connect
        try:
            probe.connect(f"{folder}/engine.sock")
        except (TimeoutError, BlockingIOError):  # someone listens, its backlog full (EAGAIN)
            return True
        except OSError:  # refused (its server is gone) or no socket at all
            return False
    return True


async def _spawn(config: FrontendConfig, count: int) -> list[asyncio.subprocess.Process]:
    processes = []
    try:
        for _ in range(count):
            processes.append(await _spawn_one(config))
    except BaseException:
        await _stop(processes)
        raise
    return processes


async def _spawn_one(config: FrontendConfig) -> asyncio.subprocess.Process:
    argument = json.dumps(dataclasses.asdict(config))
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "server.frontend", argument)


class RestartBudget:
    """How often exited front ends are replaced: up to ``max_restarts`` within ``window_s``.
    Past that they are crashing as they start, and the server stops rather than spin."""

    def __init__(self, max_restarts: int = 5, window_s: float = 60.0) -> None:
        self.max_restarts, self.window_s = max_restarts, window_s
        self._times: collections.deque[float] = collections.deque()

    def allow(self, now_s: float) -> bool:
        while self._times and self._times[0] <= now_s - self.window_s:
            self._times.popleft()
        if len(self._times) >= self.max_restarts:
            return False
        self._times.append(now_s)
        return True


async def _replace_exited(
    config: FrontendConfig, processes: list[asyncio.subprocess.Process], budget: RestartBudget
) -> str:
    """Replace each front end that exits, in ``processes`` itself (the port stays served by
    the others meanwhile); return why it stopped doing so."""
    while True:
        pid = await _first_exit(processes)
        (gone,) = [p for p in processes if p.pid == pid]
        processes.remove(gone)
        if not budget.allow(time.monotonic()):
            return (
                f"front-end process {pid} exited ({gone.returncode}): "
                f"{budget.max_restarts + 1} exits within {budget.window_s:.0f} s"
            )
        log.error("front-end process %d exited (%s); starting another", pid, gone.returncode)
        processes.append(await _spawn_one(config))


async def _first_exit(processes: list[asyncio.subprocess.Process]) -> int:
    waits = {asyncio.create_task(p.wait()): p.pid for p in processes}
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
    return waits[next(iter(done))]


async def _until_ready(link: LinkServer, count: int, exited: "asyncio.Task[int]") -> None:
    ready = asyncio.create_task(link.wait_ready(count))
    try:
        done, _ = await asyncio.wait(
            [ready, exited], timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        ready.cancel()
    if exited in done:
        raise FrontEndsFailed(
            f"front-end process {exited.result()} exited before it listened (its error is "
            "printed above)"
        )
    if ready not in done:
        raise FrontEndsFailed(
            f"{count - len(link.ready)} front ends not listening after {START_TIMEOUT_S:.0f} s"
        )


async def _stop(processes: list[asyncio.subprocess.Process]) -> None:
    """SIGTERM: each stops listening and finishes its open requests; then SIGKILL."""
    running = [p for p in processes if p.returncode is None]
    for process in running:
        process.terminate()
    if not running:
        return
    waits = [asyncio.create_task(p.wait()) for p in running]
    _, late = await asyncio.wait(waits, timeout=SHUTDOWN_GRACE_S + 5)
    for process in running:
        if process.returncode is None:
            log.warning("front-end process %d did not stop; killing it", process.pid)
            process.kill()
    if late:
        await asyncio.wait(late)


def _refuse_if_taken(host: str, port: int) -> None:
    """Raise OSError when another socket listens on ``host:port``. The front ends bind with
    SO_REUSEPORT, which lets them share a port already served by another program's
    SO_REUSEPORT sockets (a second graft server, say) and split its traffic with it; a
    program without it made every front end exit, reported as that alone."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None,
        port,
        type=socket.SOCK_STREAM,
        flags=socket.AI_PASSIVE,  # "": every one
    )[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            message = f"{host}:{port} is already in use (another server?)"
            raise OSError(exc.errno, message) from None


@contextlib.contextmanager
def _reserved_port(host: str, port: int) -> Iterator[int]:
    """The port the front ends share. Port 0 picks one: a socket of ours binds it with
    SO_REUSEPORT, without listening, so that no other program takes it before they do."""
    if port != 0:
        _refuse_if_taken(host, port)
        yield port
        return
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(address)
        yield holder.getsockname()[1]
