"""X-Request-ID: every answer carries one, the client's own when it is a plain token."""

import re

import pytest

pytestmark = pytest.mark.asyncio(loop_scope="module")

GENERATED = re.compile(r"[0-9a-f]{32}")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_each_answer_gets_its_own_new_id(client) -> None:
    first = (await client.get("/health")).headers["X-Request-ID"]
    second = (await client.get("/health")).headers["X-Request-ID"]
    assert GENERATED.fullmatch(first) and GENERATED.fullmatch(second) and first != second


async def test_a_plain_client_id_comes_back_unchanged(client) -> None:
    sent = "trace-7f3a.01:b_2"
    response = await client.get("/health", headers={"X-Request-ID": sent})
    assert response.headers["X-Request-ID"] == sent


@pytest.mark.parametrize("sent", ["has space", "x" * 129, 'quote"d', "tab\there"])
async def test_anything_else_is_replaced(client, sent) -> None:
    response = await client.get("/health", headers={"X-Request-ID": sent})
    assert GENERATED.fullmatch(response.headers["X-Request-ID"])


async def test_errors_and_streams_carry_it_too(client, tenants) -> None:
    missing = await client.get("/no/such/route", headers={"X-Request-ID": "r-404"})
    assert missing.status == 404 and missing.headers["X-Request-ID"] == "r-404"
    denied = await client.get("/v1/adapters", headers={"X-Request-ID": "r-401"})
    assert denied.status == 401 and denied.headers["X-Request-ID"] == "r-401"
    body = {"model": "spam", "input": ["hi", "WIN NOW"], "stream": True}
    headers = {**bearer(tenants.acme), "X-Request-ID": "r-stream"}
    stream = await client.post("/v1/classify", json=body, headers=headers)
    assert stream.status == 200 and stream.headers["X-Request-ID"] == "r-stream"
    assert (await stream.text()).count("\n") == 3  # two predictions and the done line


async def test_new_ids_are_unique_and_a_forked_child_starts_its_own() -> None:
    import os

    from server import request_ids

    class Fake(dict):
        headers: dict = {}

    ids = {request_ids.request_id(Fake()) for _ in range(1000)}
    assert len(ids) == 1000 and all(GENERATED.fullmatch(i) for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its key and leave at once
        os.write(write, request_ids._SECRET)
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 64) != request_ids._SECRET
