"""run_server: a real socket on an ephemeral port, hooks, and clean shutdown."""

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading

import aiohttp
import pytest
import torch

from engine import Engine, EngineConfig
from engine.peft_io import write_peft_adapter
from server.app import run_server

pytestmark = pytest.mark.asyncio(loop_scope="module")

TIMEOUT = aiohttp.ClientTimeout(total=30)


class Started:
    """What the hooks report: the bound URL, then the running engine."""

    def __init__(self) -> None:
        self.url: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.engine: asyncio.Future[Engine] = asyncio.get_running_loop().create_future()

    async def on_listening(self, url: str) -> None:
        self.url.set_result(url)

    async def on_ready(self, engine: Engine) -> None:
        self.engine.set_result(engine)


def start(tmp_path, started: Started) -> asyncio.Task[None]:
    config = EngineConfig(registry_dir=tmp_path / "registry", max_batch_rows=1)
    return asyncio.create_task(
        run_server(
            config, "127.0.0.1", 0, on_ready=started.on_ready, on_listening=started.on_listening
        )
    )


async def test_serves_until_cancelled_then_closes_everything(tmp_path) -> None:
    started = Started()
    server = start(tmp_path, started)
    url = await asyncio.wait_for(started.url, 30)
    engine = await asyncio.wait_for(started.engine, 30)
    assert not url.endswith(":0")
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async with session.get(f"{url}/health") as response:
            assert response.status == 200 and await response.json() == {"status": "ok"}
        async with session.get(f"{url}/ready") as response:
            assert (await response.json())["backbone_sha256"] == engine.backbone.sha256

        server.cancel()
        with pytest.raises(asyncio.CancelledError):
            await server
        assert not engine.ready
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"{url}/health")


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal handlers can only be installed from the main thread",
)
async def test_sigterm_stops_the_server_and_cuts_open_streams(tmp_path) -> None:
    server, url, engine, key = await _serving_a_model(tmp_path)
    body = {"model": "tiny", "input": [f"row {i}" for i in range(200)], "stream": True}
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
        session.post(f"{url}/v1/classify", json=body, headers=headers) as response,
    ):
        assert response.status == 200
        json.loads(await response.content.readline())
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(server, 30)  # returns: a signal is a normal stop
        lines = []
        with pytest.raises(aiohttp.ClientPayloadError):
            async for line in response.content:
                lines.append(json.loads(line))
    assert len(lines) < 199 and not any("done" in line for line in lines)
    assert not engine.ready and engine.stats()["requests_in_flight"] == 0


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal handlers can only be installed from the main thread",
)
@pytest.mark.parametrize(("grace_s", "signals"), [(1.0, 1), (30.0, 2)])
async def test_a_request_still_running_when_the_grace_ends_gets_503(
    tmp_path, monkeypatch, grace_s, signals
) -> None:
    """aiohttp waited its shutdown timeout, cancelled the handler, then waited as long again,
    and a handler whose job still ran outlived the cancel: twice the promised grace. A second
    signal ends the grace at once."""
    from server import app as app_module

    monkeypatch.setattr(app_module, "SHUTDOWN_GRACE_S", grace_s)
    server, url, engine, key = await _serving_a_model(tmp_path)
    gate = threading.Event()
    engine._executor.submit(gate.wait, 60)  # the model thread busy past the grace
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            body = {"model": "tiny", "input": ["a row"]}
            headers = {"Authorization": f"Bearer {key}"}
            asking = asyncio.create_task(
                session.post(f"{url}/v1/classify", json=body, headers=headers)
            )
            while engine.stats()["requests_in_flight"] == 0:
                await asyncio.sleep(0.01)
            stopping = asyncio.get_running_loop().time()
            os.kill(os.getpid(), signal.SIGTERM)
            if signals == 2:
                await asyncio.sleep(0.2)
                os.kill(os.getpid(), signal.SIGINT)
            response = await asyncio.wait_for(asking, 10)
            waited = asyncio.get_running_loop().time() - stopping
            assert response.status == 503 and response.headers["Retry-After"] == "1"
            assert (0.9 if signals == 1 else 0.1) < waited < 3, waited
    finally:
        gate.set()
    await asyncio.wait_for(server, 30)
    assert not engine.ready


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal handlers can only be installed from the main thread",
)
async def test_a_sigterm_while_starting_stops_the_start(tmp_path) -> None:
    """A supervisor stopping a server that is still loading: it undoes the start and returns
    (killed there, a server with front ends left them orphaned)."""
    started = Started()
    server = start(tmp_path, started)
    await asyncio.sleep(0.2)  # loading the backbone
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(server, 60)  # returns: a normal stop
    assert not started.url.done() and not started.engine.done()


async def test_front_ends_that_keep_crashing_stop_the_server_as_a_failure(
    tmp_path, monkeypatch
) -> None:
    """Not a stop anyone asked for: FrontEndsFailed (exit status 2 from the CLI), not 0."""
    from server import app as app_module
    from server.workers import FrontEnds, FrontEndsFailed

    @contextlib.asynccontextmanager
    async def crashing(runner, engine, **_):
        async def give_up() -> str:
            return "front-end process 7 exited (-9): 6 exits within 60 s"

        yield FrontEnds(("127.0.0.1", 1), asyncio.create_task(give_up()))

    monkeypatch.setattr(app_module, "_listening", crashing)
    config = EngineConfig(registry_dir=tmp_path / "registry")
    with pytest.raises(FrontEndsFailed, match="6 exits within 60 s"):
        await asyncio.wait_for(run_server(config, "127.0.0.1", 0, workers=1), 60)


async def test_a_failing_on_ready_stops_the_server_and_is_raised(tmp_path) -> None:
    async def on_ready(engine: Engine) -> None:
        raise RuntimeError("demo failed")

    config = EngineConfig(registry_dir=tmp_path / "registry")
    with pytest.raises(RuntimeError, match="demo failed"):
        await asyncio.wait_for(run_server(config, "127.0.0.1", 0, on_ready=on_ready), 30)


async def _serving_a_model(tmp_path) -> tuple[asyncio.Task[None], str, Engine, str]:
    """A started server whose tenant acme has the model "tiny": its task, URL, engine, key."""
    started = Started()
    server = start(tmp_path, started)
    url = await asyncio.wait_for(started.url, 30)
    engine = await asyncio.wait_for(started.engine, 30)
    key = engine.registry.create_tenant("acme")
    _publish(engine, tmp_path)
    return server, url, engine, key


def _publish(engine: Engine, tmp_path) -> None:
    backbone = engine.backbone
    out = tmp_path / "tiny"
    name = backbone.linear_names[0]
    linear = backbone.linears[name]
    modules = {name: (torch.zeros(1, linear.in_features), torch.zeros(linear.out_features, 1))}
    write_peft_adapter(
        out,
        backbone,
        modules,
        rank=1,
        alpha=1.0,
        head_weight=torch.zeros(2, backbone.hidden_size),
        head_bias=torch.zeros(2),
    )
    engine.registry.publish(
        "acme",
        "tiny",
        out,
        {"labels": ["a", "b"], "rank": 1, "base_sha256": backbone.sha256, "metrics": {}},
    )


async def test_the_server_raises_its_open_files_limit_to_the_hard_one() -> None:
    """Each connection holds a descriptor: a soft limit of 1,024 under a higher hard one
    would refuse connections a machine could hold (run in a child, whose limits are its own)."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 256 if hard == resource.RLIM_INFINITY else min(256, hard - 1)
    script = (
        "import resource; from server.app import raise_open_files_limit; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({low}, {hard})); "
        "print(raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    assert out == [str(hard), str(hard)], out


async def test_a_host_that_cannot_be_listened_on_is_named_before_the_backbone_loads(
    tmp_path,
) -> None:
    config = EngineConfig(registry_dir=tmp_path / "registry")
    for workers in (0, 1):
        with pytest.raises(ValueError, match="host 'no-such-host.invalid' cannot be listened on"):
            await asyncio.wait_for(
                run_server(config, "no-such-host.invalid", 0, workers=workers), 5
            )
    assert not (tmp_path / "registry").exists()  # nothing opened, nothing loaded
