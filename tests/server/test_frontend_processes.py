"""``graft serve --workers``: the front-end processes' lives. Started, replaced when they
die, stopped with the server, refused a taken port or a bad count, and their socket folders
cleaned up after a killed server."""

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from engine import EngineConfig, packaged_backbone_dir
from server.app import run_server
from server.frontend import SHUTDOWN_GRACE_S, FrontendConfig
from server.workers import RestartBudget, _remove_stale_folders, _replace_exited, _spawn

from .conftest import MAX_BODY_BYTES, MAX_INPUT_TOKENS, until

pytestmark = pytest.mark.asyncio(loop_scope="module")

TIMEOUT = aiohttp.ClientTimeout(total=60)


async def test_run_server_replaces_a_front_end_that_dies(tmp_path) -> None:
    bound: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_listening(url: str) -> None:
        bound.set_result(url)

    config = EngineConfig(registry_dir=tmp_path / "registry")
    others = set(_front_end_pids())  # the module's own front ends
    server = asyncio.create_task(
        run_server(config, "127.0.0.1", 0, on_listening=on_listening, workers=1)
    )
    url = await asyncio.wait_for(bound, 120)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        (first,) = set(_front_end_pids()) - others
        os.kill(first, signal.SIGKILL)
        await until(lambda: len(set(_front_end_pids()) - others - {first}) == 1, 120)
        (second,) = set(_front_end_pids()) - others - {first}
        await _until_answers(session, f"{url}/ready")
        assert not server.done()
        server.cancel()
        with pytest.raises(asyncio.CancelledError):
            await server
    assert set(_front_end_pids()) == others  # the replacement stopped with the server
    assert second != first


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal handlers can only be installed from the main thread",
)
async def test_a_sigterm_while_front_ends_start_stops_them_too(tmp_path) -> None:
    """systemd or docker stopping a server still starting: no front end is left orphaned."""
    config = EngineConfig(registry_dir=tmp_path / "registry")
    others = set(_front_end_pids())  # the module's own front ends
    server = asyncio.create_task(run_server(config, "127.0.0.1", 0, workers=1))
    await until(lambda: bool(set(_front_end_pids()) - others), 120)  # spawned, not yet up
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(server, 60)  # returns: a normal stop
    await until(lambda: set(_front_end_pids()) == others, 30)


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal handlers can only be installed from the main thread",
)
async def test_a_sigterm_cuts_streams_the_front_ends_proxy_at_once(
    tmp_path, write_random_adapter, backbone
) -> None:
    """As one process does: the stream ends cut off, and the front end need not be killed
    after the grace period (a stream open there held its shutdown for 18 s)."""
    bound: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_listening(url: str) -> None:
        bound.set_result(url)

    config = EngineConfig(registry_dir=tmp_path / "registry", max_batch_rows=1)
    server = asyncio.create_task(
        run_server(config, "127.0.0.1", 0, on_listening=on_listening, workers=1)
    )
    url = await asyncio.wait_for(bound, 120)
    from registry import Registry

    write_random_adapter(backbone, tmp_path / "a", seed=0, rank=4, num_labels=2)
    with Registry(tmp_path / "registry") as registry:
        key = registry.create_tenant("acme")
        manifest = {"labels": ["a", "b"], "base_sha256": backbone.sha256, "rank": 4}
        registry.publish("acme", "spam", tmp_path / "a", manifest)
    body = {"model": "spam", "input": [f"row {i} " * 20 for i in range(200)], "stream": True}
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
        session.post(
            f"{url}/v1/classify", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as response,
    ):
        assert response.status == 200
        await response.content.readline()
        stopping = asyncio.get_running_loop().time()
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(aiohttp.ClientPayloadError):  # cut off, not a well-formed end
            async for _ in response.content:
                pass
        await asyncio.wait_for(server, 60)
    assert asyncio.get_running_loop().time() - stopping < SHUTDOWN_GRACE_S


async def test_a_negative_number_of_front_ends_is_refused_before_anything_starts(
    tmp_path,
) -> None:
    config = EngineConfig(registry_dir=tmp_path / "registry")
    with pytest.raises(ValueError, match="workers must be 0"):
        await run_server(config, "127.0.0.1", 0, workers=-1)
    with pytest.raises(ValueError, match="port must be from 0"):
        await run_server(config, "127.0.0.1", 99999)
    assert not (tmp_path / "registry").exists()  # the engine never opened its registry


async def test_a_port_another_program_listens_on_is_refused_by_name(tmp_path) -> None:
    """Front ends bind with SO_REUSEPORT: without this check a second graft server would
    have shared the first one's port, and a plain listener made them exit unexplained."""
    config = EngineConfig(registry_dir=tmp_path / "registry")
    for reuse_port in (False, True):
        with socket.socket() as other:
            if reuse_port:
                other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            other.bind(("127.0.0.1", 0))
            other.listen()
            port = other.getsockname()[1]
            with pytest.raises(OSError, match=f"127.0.0.1:{port} is already in use"):
                await run_server(config, "127.0.0.1", port, workers=1)


async def _until_answers(session: aiohttp.ClientSession, url: str) -> None:
    """Until ``url`` answers 200: a replaced front end takes seconds to listen again."""
    deadline = asyncio.get_running_loop().time() + 120
    while True:
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        assert asyncio.get_running_loop().time() < deadline, f"{url} never answered"
        await asyncio.sleep(0.1)


async def test_front_ends_that_keep_exiting_exhaust_the_restart_budget(tmp_path) -> None:
    budget = RestartBudget(max_restarts=3, window_s=10.0)
    assert [budget.allow(t) for t in (0.0, 1.0, 2.0)] == [True, True, True]
    assert not budget.allow(3.0)  # a fourth exit within 10 s: a crash loop
    assert budget.allow(10.5)  # the first has left the window

    # front ends that cannot reach the engine exit as they start: replaced once, then given up
    config = FrontendConfig(
        host="127.0.0.1",
        port=0,
        link_path=str(tmp_path / "no-link.sock"),
        engine_path=str(tmp_path / "no-engine.sock"),
        registry_dir=str(tmp_path / "registry"),
        backbone_dir=str(packaged_backbone_dir()),
        max_input_tokens=MAX_INPUT_TOKENS,
        max_inputs=8,
        max_body_bytes=MAX_BODY_BYTES,
        log_level=logging.CRITICAL,
    )
    processes = await _spawn(config, 1)
    why = await asyncio.wait_for(_replace_exited(config, processes, RestartBudget(1, 60.0)), 120)
    assert "2 exits within 60 s" in why and processes == []


def _front_end_pids() -> list[int]:
    """This process's children running server.frontend."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and b"server.frontend" in command:
            found.append(int(stat.parent.name))
    return found


async def test_socket_folders_of_dead_servers_are_removed_at_start(tmp_path: Path) -> None:
    """A SIGKILLed server's folder stayed in the temp directory for good."""
    ended = await asyncio.create_subprocess_exec("true")
    await ended.wait()  # its pid now names no process (reuse within the test is unlikely)
    dead = tmp_path / f"graft-serve-{ended.pid}-a1b2c3"
    (dead / "inner").mkdir(parents=True)
    (dead / "engine.sock").touch()  # a socket nobody listens on any more
    listening = tmp_path / f"graft-serve-{ended.pid}-g7h8i9"  # another PID namespace's server
    listening.mkdir()
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(listening / "engine.sock"))
    live.listen()
    busy = tmp_path / f"graft-serve-{ended.pid}-m4n5o6"  # the same, its backlog full
    busy.mkdir()
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.bind(str(busy / "engine.sock"))
    stalled.listen(0)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    filler.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        filler.connect(str(busy / "engine.sock"))
    kept = [
        listening,
        busy,
        tmp_path / f"graft-serve-{os.getpid()}-d4e5f6",  # a live server's
        tmp_path / "graft-serve-k7w3q9xz",  # an older graft's: no pid to check
        tmp_path / "graft-serve-12345678",  # the same, though its name is all digits
        tmp_path / "other-program",
    ]
    for folder in kept[2:]:
        folder.mkdir()
    young = tmp_path / f"graft-serve-{ended.pid}-j1k2l3"  # a server's still starting
    young.mkdir()
    link = tmp_path / f"graft-serve-{ended.pid}-link"
    link.symlink_to(tmp_path / "other-program")
    for folder in (dead, *kept):
        os.utime(folder, (time.time() - 120, time.time() - 120))
    try:
        _remove_stale_folders(str(tmp_path))
    finally:
        for sock in (live, stalled, filler):
            sock.close()
    assert not dead.exists()
    assert all(folder.is_dir() for folder in (*kept, young)) and link.is_symlink()
