"""GET /metrics: the engine's counters and the request latencies, in Prometheus' format."""

import asyncio
import dataclasses

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from engine import Engine
from scheduler import TenantCounters
from server.app import create_app
from server.metrics import ENGINE_METRICS, TENANT_HELP

from .conftest import expect_continue

pytestmark = pytest.mark.asyncio(loop_scope="module")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def scrape(client, headers: dict[str, str] | None = None) -> dict[str, dict]:
    """{family name: {"type": ..., "samples": {(sample name, sorted labels): value}}}."""
    response = await client.get("/metrics", headers=headers or {})
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    families = {}
    for family in text_string_to_metric_families(await response.text()):
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        families[family.name] = {"type": family.type, "samples": samples}
    return families


def value(families: dict, family: str, sample: str | None = None, **labels: str) -> float:
    key = (sample or family, tuple(sorted(labels.items())))
    return families[family]["samples"].get(key, 0.0)


def request_count(families: dict, route: str, status: int, method: str = "GET") -> float:
    return value(
        families,
        "graft_http_request_duration_seconds",
        "graft_http_request_duration_seconds_count",
        method=method,
        route=route,
        status=str(status),
    )


async def test_every_engine_counter_is_named_and_typed(engine: Engine, tenants) -> None:
    assert set(engine.stats()) <= set(ENGINE_METRICS)
    assert {f.name for f in dataclasses.fields(TenantCounters)} == set(TENANT_HELP)


async def test_scrape_reports_the_engines_own_counts(client, engine: Engine, tenants) -> None:
    before = await scrape(client)
    response = await client.post(
        "/v1/classify",
        json={"model": "spam", "input": ["hi", "WIN NOW"]},
        headers=bearer(tenants.acme),
    )
    assert response.status == 200
    after = await scrape(client)
    stats = engine.stats()  # nothing ran since the scrape
    for key, (name, kind, _) in ENGINE_METRICS.items():
        assert after[f"graft_{name}"]["type"] == kind, name
        if key in stats:
            sample = f"graft_{name}_total" if kind == "counter" else f"graft_{name}"
            scale = 1e-6 if key.endswith("_us") else 1
            assert value(after, f"graft_{name}", sample) == pytest.approx(stats[key] * scale)
    assert value(after, "graft_ready") == 1
    assert not [name for name in after if name.startswith("graft_tenant_")]  # open: no tenants
    assert value(after, "graft_rows", "graft_rows_total") >= 2
    busy = ("graft_step_busy_seconds", "graft_step_busy_seconds_total")
    assert value(after, *busy) > value(before, *busy)  # the classify request's step
    assert (
        request_count(after, "/v1/classify", 200, "POST")
        - request_count(before, "/v1/classify", 200, "POST")
        == 1
    )
    # the scrape that returned ``before`` was timed after it answered
    assert request_count(after, "/metrics", 200) == request_count(before, "/metrics", 200) + 1
    info = after["graft_engine_info"]["samples"]
    ((_, labels),) = info
    assert dict(labels)["backbone_sha256"] == engine.backbone.sha256


async def test_errors_are_counted_by_route_and_the_status_sent(client, tenants) -> None:
    before = await scrape(client)
    assert (await client.get("/v1/adapters/spam", headers=bearer("wrong"))).status == 401
    assert (await client.get("/no/such/route")).status == 404
    assert (await client.request("PROPFIND", "/v1/adapters")).status == 405
    after = await scrape(client)
    assert request_count(after, "/v1/adapters/{name}", 401) == (
        request_count(before, "/v1/adapters/{name}", 401) + 1
    )
    assert request_count(after, "unmatched", 404) == request_count(before, "unmatched", 404) + 1
    # a method outside the usual ones is one "other" label, however many a client invents
    assert request_count(after, "unmatched", 405, "other") == (
        request_count(before, "unmatched", 405, "other") + 1
    )


async def test_refusals_of_an_expect_header_are_counted(client, tenants) -> None:
    """Answered before any middleware (a 413 before the body, a 417), they were missing from
    /metrics: the oversized uploads an operator most wants to see."""
    address = (client.server.host, client.server.port)
    before = await scrape(client)
    answer = await expect_continue(address, "/v1/classify", tenants.acme, 10**9)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    answer = await expect_continue(address, "/v1/train", tenants.acme, 10**12)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    reader, writer = await asyncio.open_connection(*address)
    writer.write(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n")
    writer.write(b"Expect: magic\r\n\r\n{}")
    assert (await reader.readline()).startswith(b"HTTP/1.1 417")
    writer.close()
    after = await scrape(client)
    for route, status in (("/v1/classify", 413), ("/v1/train", 413), ("/v1/classify", 417)):
        grew = request_count(after, route, status, "POST") - request_count(
            before, route, status, "POST"
        )
        assert grew == 1, (route, status)


async def test_a_metrics_key_guards_the_scrape_and_adds_the_tenants(engine, tenants) -> None:
    app = create_app(engine, metrics_key="scrape-secret")
    async with TestClient(TestServer(app)) as guarded:
        for headers in ({}, bearer("wrong"), bearer(tenants.acme)):
            response = await guarded.get("/metrics", headers=headers)
            assert response.status == 401
            assert (await response.json())["error"]["type"] == "authentication"
        before = await scrape(guarded, bearer("scrape-secret"))
        body = {"model": "spam", "input": ["hi", "WIN NOW"]}
        response = await guarded.post("/v1/classify", json=body, headers=bearer(tenants.acme))
        assert response.status == 200
        after = await scrape(guarded, bearer("scrape-secret"))
    assert value(after, "graft_ready") == 1
    rows = ("graft_tenant_run_rows", "graft_tenant_run_rows_total")
    assert value(after, *rows, tenant="acme") - value(before, *rows, tenant="acme") == 2
    assert {f"graft_tenant_{key}" for key in TENANT_HELP} <= set(after)


async def test_training_is_reported_even_where_this_server_runs_none(client, tenants) -> None:
    families = await scrape(client)
    available = value(families, "graft_train_available")
    assert available in (0, 1)  # this module's apps share one jobs directory: one may run it
    states = {dict(labels)["state"] for _, labels in families["graft_train_jobs"]["samples"]}
    assert states == (
        {"queued", "running", "succeeded", "failed", "cancelled"} if available else set()
    )


async def test_metrics_can_be_switched_off(engine: Engine, tenants) -> None:
    async with TestClient(TestServer(create_app(engine, metrics=False))) as plain:
        assert (await plain.get("/metrics")).status == 404
        assert (await plain.get("/health")).status == 200


async def test_a_blank_metrics_key_is_refused(engine: Engine) -> None:
    with pytest.raises(ValueError, match="blank"):
        create_app(engine, metrics_key="  ")


async def test_a_request_whose_client_left_is_499_not_500(engine: Engine) -> None:
    async def client_left(request: web.Request) -> web.Response:
        raise asyncio.CancelledError  # what aiohttp raises in a handler whose client went away

    app = create_app(engine)
    app.router.add_get("/leave", client_left)
    async with TestClient(TestServer(app)) as test_client:
        with pytest.raises(aiohttp.ClientError):
            await test_client.get("/leave")
        families = await scrape(test_client)
    assert request_count(families, "/leave", 499) == 1
    assert request_count(families, "/leave", 500) == 0


async def test_a_scrape_key_of_bytes_that_are_not_utf8_is_a_401(engine, tenants) -> None:
    """aiohttp reads such header bytes as lone surrogates; encoding them for the comparison
    raised, and the scrape got a 500."""
    app = create_app(engine, metrics_key="scrape-secret")
    async with TestClient(TestServer(app)) as guarded:
        reader, writer = await asyncio.open_connection(guarded.host, guarded.port)
        writer.write(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
            b"Connection: close\r\n\r\n"
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b'"authentication"' in answer
