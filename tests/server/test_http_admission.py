"""Admission control, deadlines and disconnects over HTTP: 429, 503, 504, nothing left behind."""

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from engine import Engine, EngineConfig

pytestmark = pytest.mark.asyncio(loop_scope="module")

TENANT_QUEUE = 8
SERVER_QUEUE = 12


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Engine]:
    """Small queues and one row per step, so floods and refusals are cheap to provoke."""
    config = EngineConfig(
        registry_dir=Path(tmp_path_factory.mktemp("registry")),
        max_batch_rows=1,
        max_input_tokens=32,
        tenant_max_queued_rows=TENANT_QUEUE,
        max_queued_rows=SERVER_QUEUE,
    )
    async with Engine(config) as started:
        yield started


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _stall_model(engine: Engine) -> threading.Event:
    """Park the model thread until the returned event is set: queues then fill predictably."""
    gate = threading.Event()
    engine._executor.submit(gate.wait, 30)
    return gate


async def _settle(engine: Engine) -> None:
    for _ in range(200):
        stats = engine.stats()
        if stats["requests_in_flight"] == 0 and stats["waiting_rows"] == 0:
            return
        await asyncio.sleep(0.01)


async def test_a_tenant_over_its_queue_gets_429_with_retry_after(client, engine, tenants) -> None:
    gate = _stall_model(engine)
    flood = {"model": "spam", "input": [f"flood {i}" for i in range(TENANT_QUEUE)]}
    first = asyncio.create_task(
        client.post("/v1/classify", json=flood, headers=_auth(tenants.acme))
    )
    try:
        await asyncio.sleep(0.05)  # acme's rows wait: at most one sits in the stalled step
        more = {"model": "spam", "input": ["one more", "and another"]}
        response = await client.post("/v1/classify", json=more, headers=_auth(tenants.acme))
    finally:
        gate.set()
    assert response.status == 429
    assert int(response.headers["Retry-After"]) >= 1
    error = (await response.json())["error"]
    assert error["type"] == "rate_limited" and "acme" in error["message"]
    assert engine.tenant_stats()["acme"]["rejected_requests"] >= 1
    assert (await first).status == 200
    ok = await client.post(
        "/v1/classify", json={"model": "secret", "input": "hi"}, headers=_auth(tenants.bob)
    )
    assert ok.status == 200  # the neighbour is unaffected
    await _settle(engine)


async def test_a_request_that_could_never_fit_its_tenants_queue_is_422(client, tenants) -> None:
    """Not a 429: retrying it would never succeed."""
    body = {"model": "spam", "input": [f"text {i}" for i in range(TENANT_QUEUE + 1)]}
    response = await client.post("/v1/classify", json=body, headers=_auth(tenants.acme))
    assert response.status == 422 and "Retry-After" not in response.headers
    error = (await response.json())["error"]
    assert error["field"] == "input" and f"more than the {TENANT_QUEUE}" in error["message"]


async def test_a_full_server_gets_503_with_retry_after(client, engine, tenants) -> None:
    gate = _stall_model(engine)
    flood = {"model": "spam", "input": [f"flood {i}" for i in range(TENANT_QUEUE)]}
    first = asyncio.create_task(
        client.post("/v1/classify", json=flood, headers=_auth(tenants.acme))
    )
    await asyncio.sleep(0.05)  # acme's rows wait: at most one sits in the stalled step
    queued = engine.stats()["waiting_rows"]
    assert queued >= TENANT_QUEUE - 1
    more = [f"more {i}" for i in range(SERVER_QUEUE - queued + 1)]
    response = await client.post(
        "/v1/classify", json={"model": "secret", "input": more}, headers=_auth(tenants.bob)
    )
    gate.set()
    assert response.status == 503, await response.text()
    assert int(response.headers["Retry-After"]) >= 1
    assert (await response.json())["error"]["type"] == "overloaded"
    assert (await first).status == 200
    await _settle(engine)


async def test_a_request_that_cannot_start_in_time_is_504_and_never_runs(
    client, engine, tenants
) -> None:
    gate = _stall_model(engine)
    flood = {"model": "spam", "input": [f"flood {i}" for i in range(TENANT_QUEUE)]}
    busy = asyncio.create_task(client.post("/v1/classify", json=flood, headers=_auth(tenants.acme)))
    await asyncio.sleep(0.02)
    bob_before = dict(engine.tenant_stats().get("bob", {}))
    late = {"model": "secret", "input": ["x", "y"], "timeout": 0.05}
    late_request = asyncio.create_task(
        client.post("/v1/classify", json=late, headers=_auth(tenants.bob))
    )
    await asyncio.sleep(0.2)  # past bob's deadline while the model is still stalled
    gate.set()
    response = await late_request
    assert response.status == 504
    assert (await response.json())["error"]["type"] == "timeout"
    assert (await busy).status == 200
    await _settle(engine)
    bob = engine.tenant_stats()["bob"]
    assert bob["expired_rows"] - bob_before.get("expired_rows", 0) >= 1
    assert bob["run_rows"] - bob_before.get("run_rows", 0) == 0  # bob's rows never ran


async def test_bad_timeout_is_422(client, tenants) -> None:
    for timeout, said in ((-1, "got -1"), (-0.0, "got -0.0"), ("5", "got string")):
        body = {"model": "spam", "input": "x", "timeout": timeout}
        response = await client.post("/v1/classify", json=body, headers=_auth(tenants.acme))
        error = (await response.json())["error"]
        assert response.status == 422 and error["field"] == "timeout", error
        assert error["message"].endswith(said), error


async def test_a_cancelled_request_never_reaches_the_model(client, engine, tenants) -> None:
    gate = _stall_model(engine)
    flood = {"model": "spam", "input": [f"flood {i}" for i in range(TENANT_QUEUE)]}
    busy = asyncio.create_task(client.post("/v1/classify", json=flood, headers=_auth(tenants.acme)))
    await asyncio.sleep(0.02)
    before = dict(engine.tenant_stats().get("bob", {}))
    victim = asyncio.create_task(
        client.post(
            "/v1/classify",
            json={"model": "secret", "input": ["a", "b", "c"]},
            headers=_auth(tenants.bob),
        )
    )
    await asyncio.sleep(0.05)  # queued behind the stalled step
    victim.cancel()
    await asyncio.gather(victim, return_exceptions=True)
    await asyncio.sleep(0.05)  # the server notices the disconnect and aborts the job
    gate.set()
    await busy
    await _settle(engine)
    bob = engine.tenant_stats()["bob"]
    assert bob["run_rows"] == before.get("run_rows", 0)
    assert bob["aborted_rows"] - before.get("aborted_rows", 0) == 3


async def test_many_connect_disconnect_cycles_leave_nothing_behind(client, engine, tenants) -> None:
    tasks_before = len(asyncio.all_tasks())
    url = client.make_url("/v1/classify")
    async with aiohttp.ClientSession() as session:
        for i in range(1000):
            request = asyncio.create_task(
                session.post(
                    url,
                    json={"model": "spam", "input": [f"bye {i}", "again"]},
                    headers=_auth(tenants.acme),
                )
            )
            await asyncio.sleep(0)
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)
    await _settle(engine)
    for _ in range(100):  # server-side handler tasks finish their cancellation
        if len(asyncio.all_tasks()) <= tasks_before:
            break
        await asyncio.sleep(0.02)
    stats = engine.stats()
    assert stats["requests_in_flight"] == 0 and stats["waiting_rows"] == 0
    assert len(asyncio.all_tasks()) <= tasks_before
    assert engine.stats()["adapter_host_entries"] >= 1  # pins released, entries kept
