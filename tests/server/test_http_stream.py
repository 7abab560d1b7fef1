"""NDJSON streaming, failures midway, and clients that go away before the answer."""

import asyncio
import json
import time

import pytest

from engine import EngineError

pytestmark = pytest.mark.asyncio(loop_scope="module")

MANY = 100  # inputs; at two rows per engine step they take ~50 steps


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def read_lines(response) -> list[dict]:
    return [json.loads(line) for line in (await response.read()).splitlines()]


async def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_stream_sends_a_line_per_input_then_a_summary(client, tenants) -> None:
    texts = ["free prize", "hello mum", "win cash now", "meeting at 3", "call me"]
    body = {"model": "spam@1", "input": texts, "stream": True}
    response = await client.post("/v1/classify", json=body, headers=bearer(tenants.acme))
    assert response.status == 200
    assert response.content_type == "application/x-ndjson"
    lines = await read_lines(response)
    assert len(lines) == len(texts) + 1
    *items, summary = lines
    assert sorted(item["index"] for item in items) == list(range(len(texts)))
    assert summary == {
        "done": True,
        "model": "acme/spam",
        "version": 1,
        "usage": {"inputs": 5, "tokens": sum(i["tokens"] for i in items)},
    }

    plain = await client.post(
        "/v1/classify", json={**body, "stream": False}, headers=bearer(tenants.acme)
    )
    by_index = {item["index"]: item for item in items}
    for item in (await plain.json())["data"]:
        streamed = by_index[item["index"]]
        assert set(streamed) == set(item) == {"index", "label", "scores", "truncated", "tokens"}
        assert streamed["label"] == item["label"]
        for label, score in item["scores"].items():
            assert streamed["scores"][label] == pytest.approx(score, abs=1e-4)


async def test_stream_of_one_text(client, tenants) -> None:
    body = {"model": "news", "input": "goal in the last minute", "stream": True}
    response = await client.post("/v1/classify", json=body, headers=bearer(tenants.acme))
    item, summary = await read_lines(response)
    assert item["index"] == 0 and summary["done"] is True and summary["usage"]["inputs"] == 1


async def test_stream_errors_before_the_first_row_keep_their_status(client, tenants) -> None:
    body = {"model": "nosuch", "input": ["x"], "stream": True}
    response = await client.post("/v1/classify", json=body, headers=bearer(tenants.acme))
    assert response.status == 404
    assert response.content_type == "application/json"
    assert (await response.json())["error"]["type"] == "not_found"


async def test_engine_failure_midway_ends_the_stream_with_an_error_line(
    client, engine, tenants, monkeypatch
) -> None:
    submit = engine.submit

    async def submit_failing_after_one_row(*args, **kwargs):
        job = await submit(*args, **kwargs)
        deliver = job.deliver

        def deliver_then_fail(prediction) -> None:
            deliver(prediction)
            job.fail(EngineError("model step failed: simulated"))

        job.deliver = deliver_then_fail
        return job

    monkeypatch.setattr(engine, "submit", submit_failing_after_one_row)
    body = {"model": "spam", "input": ["a", "b", "c", "d", "e", "f"], "stream": True}
    response = await client.post("/v1/classify", json=body, headers=bearer(tenants.acme))
    assert response.status == 200
    item, last = await read_lines(response)
    assert "label" in item
    assert last["error"]["type"] == "internal"
    assert "simulated" in last["error"]["message"]
    await wait_until(lambda: engine.stats()["requests_in_flight"] == 0)


async def test_disconnect_mid_stream_cancels_the_job(client, engine, tenants) -> None:
    rows_before = engine.stats()["rows"]
    body = {"model": "spam", "input": [f"text number {i}" for i in range(MANY)], "stream": True}
    response = await client.post("/v1/classify", json=body, headers=bearer(tenants.acme))
    first = json.loads(await response.content.readline())
    assert "label" in first
    response.close()  # drop the connection with most rows still queued

    await wait_until(lambda: engine.stats()["requests_in_flight"] == 0)
    await wait_until(lambda: engine.stats()["waiting_rows"] == 0)
    assert engine.stats()["rows"] - rows_before < MANY


async def test_disconnect_before_a_plain_answer_cancels_the_job(client, engine, tenants) -> None:
    rows_before = engine.stats()["rows"]
    body = {"model": "spam", "input": [f"text number {i}" for i in range(MANY)]}
    request = asyncio.create_task(
        client.post("/v1/classify", json=body, headers=bearer(tenants.acme))
    )
    await wait_until(lambda: engine.stats()["rows"] > rows_before)
    request.cancel()  # the client gives up: its connection closes
    with pytest.raises(asyncio.CancelledError):
        await request

    await wait_until(lambda: engine.stats()["requests_in_flight"] == 0)
    await wait_until(lambda: engine.stats()["waiting_rows"] == 0)
    assert engine.stats()["rows"] - rows_before < MANY
