"""Every error answer is JSON with the right status, type and field."""

import asyncio
import gzip
import json
import logging

import pytest
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from engine import Engine, EngineConfig
from server.app import create_app
from server.errors import ApiError, _check_content_coding
from server.quiet_log import SERVER_LOGGER, MalformedRequestFilter
from server.routes import MAX_BODY_BYTES

from .conftest import expect_continue

pytestmark = pytest.mark.asyncio(loop_scope="module")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def error_of(response) -> dict:
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error"}
    return body["error"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer not-a-real-key"},
    ],
)
async def test_missing_or_bad_key_is_401(client, headers) -> None:
    response = await client.post(
        "/v1/classify", json={"model": "spam", "input": "x"}, headers=headers
    )
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await error_of(response))["type"] == "authentication"


DEEP = b"[" * 10_000 + b"]" * 10_000  # under the size cap, past any decoder's stack


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b'{"model": "spam",}',
        b"\xff\xfe",
        b"nul",
        b'{"model": "spam", "input": "\xff"}',
        b'{"model": "spam", "input": "caf\\u00e9 \\ud83d"}',
        b'{"model": "spam", "input": ["ok", "\\udc00 then text"]}',
        DEEP,
    ],
    ids=[
        "empty",
        "open",
        "trailing comma",
        "not utf-8",
        "nul",
        "not utf-8 in a string",
        "half a surrogate pair at the end",
        "a lone low surrogate",
        "deep",
    ],
)
async def test_malformed_json_is_400(client, tenants, raw) -> None:
    response = await client.post("/v1/classify", data=raw, headers=bearer(tenants.acme))
    assert response.status == 400
    error = await error_of(response)
    assert error["type"] == "invalid_json" and "field" not in error


@pytest.mark.parametrize("coding", ["x-custom", "gzip, br", "compress"])
async def test_a_body_in_a_coding_left_undecoded_is_415_not_read_as_plain(
    client, tenants, coding
) -> None:
    """aiohttp decodes gzip and deflate (one coding) and passes any other through as it came:
    parsed as plain, a body that really is so coded would be garbage or, worse, read wrong."""
    body = json.dumps({"model": "spam", "input": "hi"}).encode()
    headers = {**bearer(tenants.acme), "Content-Encoding": coding}
    for path in ("/v1/classify", "/v1/adapters/spam/promote", "/v1/train"):
        response = await client.post(path, data=body, headers=headers)
        assert response.status == 415, (path, await response.text())
        assert response.headers["Accept-Encoding"] == "gzip, deflate"
        error = await error_of(response)
        assert error["type"] == "invalid_request" and repr(coding) in error["message"], error
    twice = [*bearer(tenants.acme).items(), ("Content-Encoding", "gzip")]
    twice.append(("Content-Encoding", "identity"))  # two headers: aiohttp decodes by the first
    response = await client.post("/v1/classify", data=gzip.compress(body), headers=twice)
    assert response.status == 415
    for plain in ("identity", " GZIP ", "", "identity, identity"):
        sent = gzip.compress(body) if "gzip" in plain.lower() else body
        headers = {**bearer(tenants.acme), "Content-Encoding": plain}
        response = await client.post("/v1/classify", data=sent, headers=headers)
        assert response.status == 200, await response.text()


@pytest.mark.parametrize("coding", ["br", "zstd", " BR "])
async def test_br_and_zstd_are_refused_even_where_aiohttp_could_decode_them(coding) -> None:
    """Without Brotli or zstandard installed aiohttp refuses such a body before any handler;
    with them it would decode it on the event loop. Either way graft serves neither."""
    request = make_mocked_request(
        "POST", "/v1/classify", headers={"Content-Encoding": coding, "Content-Length": "2"}
    )
    with pytest.raises(ApiError) as raised:
        _check_content_coding(request)
    assert raised.value.status == 415
    assert raised.value.headers["Accept-Encoding"] == "gzip, deflate"


@pytest.mark.parametrize(
    ("raw", "said"),
    [
        (b'{"model": "spam", "input": ["ok", "caf\\u00e9 \\ud83d"]}', "surrogate pair"),
        (b'{"model": "spam", "input": "caf', "truncated"),
    ],
    ids=["half a surrogate pair at the end", "truncated"],
)
async def test_a_body_cut_short_and_one_ending_in_half_a_character_are_told_apart(
    client, tenants, raw, said
) -> None:
    """msgspec calls both "truncated"; only the second is."""
    response = await client.post("/v1/classify", data=raw, headers=bearer(tenants.acme))
    assert response.status == 400
    error = await error_of(response)
    assert error["type"] == "invalid_json" and said in error["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"input": "x"}, "model"),
        ({"model": 3, "input": "x"}, "model"),
        ({"model": "", "input": "x"}, "model"),
        ({"model": "spam"}, "input"),
        ({"model": "spam", "input": ""}, "input"),
        ({"model": "spam", "input": "   "}, "input"),
        ({"model": "spam", "input": []}, "input"),
        ({"model": "spam", "input": {"text": "x"}}, "input"),
        ({"model": "spam", "input": None}, "input"),
        ({"model": "spam", "input": ["ok", 7]}, "input[1]"),
        ({"model": "spam", "input": ["ok", "fine", ""]}, "input[2]"),
        ({"model": "spam", "input": ["ok", "\n\t"]}, "input[1]"),
        ({"model": "spam", "input": "x", "stream": "yes"}, "stream"),
        ({"model": "spam", "input": "x", "stream": 1}, "stream"),
        ({"model": "spam", "input": "x", "truncate": None}, "truncate"),
        ({"model": "spam", "input": "x", "temperature": 0.5}, "temperature"),
    ],
)
async def test_invalid_body_is_422_naming_the_field(client, tenants, body, field) -> None:
    response = await client.post("/v1/classify", json=body, headers=bearer(tenants.acme))
    assert response.status == 422
    error = await error_of(response)
    assert error["type"] == "invalid_request" and error["field"] == field
    assert error["message"]


async def test_a_timeout_past_any_float_is_capped_like_any_long_one(client, tenants) -> None:
    raw = b'{"model": "spam", "input": "x", "timeout": 1' + b"0" * 400 + b"}"
    response = await client.post("/v1/classify", data=raw, headers=bearer(tenants.acme))
    assert response.status == 200, await response.text()


async def test_a_number_past_any_float_says_so(client, tenants) -> None:
    """msgspec's words were "Number out of range - at `$[...]`", which names nothing."""
    raw = b'{"model": "spam", "input": "x", "timeout": 1e400}'
    response = await client.post("/v1/classify", data=raw, headers=bearer(tenants.acme))
    error = await error_of(response)
    assert response.status == 400 and error["type"] == "invalid_json"
    assert "a number is out of range" in error["message"], error


@pytest.mark.parametrize("raw", [b'[{"model": "spam", "input": "x"}]', b'"spam"', b"3", b"null"])
async def test_body_that_is_not_an_object_is_422(client, tenants, raw) -> None:
    response = await client.post("/v1/classify", data=raw, headers=bearer(tenants.acme))
    assert response.status == 422
    assert (await error_of(response))["type"] == "invalid_request"


async def test_too_many_inputs_is_422_from_the_engine(client, engine, tenants) -> None:
    texts = ["x"] * (engine.config.max_inputs_per_request + 1)
    response = await client.post(
        "/v1/classify", json={"model": "spam", "input": texts}, headers=bearer(tenants.acme)
    )
    assert response.status == 422
    assert (await error_of(response))["field"] == "input"


async def test_unknown_model_is_404(client, tenants) -> None:
    for model in ("nosuch", "spam@9", "Not A Name!", "a/b/c"):
        response = await client.post(
            "/v1/classify", json={"model": model, "input": "x"}, headers=bearer(tenants.acme)
        )
        assert response.status == 404, model
        assert (await error_of(response))["type"] == "not_found"
    huge = "A" * 50_000  # under the body limit; the 404 must not echo it back whole
    response = await client.post(
        "/v1/classify", json={"model": huge, "input": "x"}, headers=bearer(tenants.acme)
    )
    assert response.status == 404 and len(await response.read()) < 1_000
    response = await client.post(  # nor the 422 an unknown field of that size
        "/v1/classify", json={"model": "spam", "input": "x", huge: 1}, headers=bearer(tenants.acme)
    )
    assert response.status == 422 and len(await response.read()) < 1_000


async def test_body_over_the_limit_is_413(client, tenants) -> None:
    max_bytes = client.app[MAX_BODY_BYTES]
    payload = b'{"model": "spam", "input": "' + b"a" * max_bytes + b'"}'
    response = await client.post("/v1/classify", data=payload, headers=bearer(tenants.acme))
    assert response.status == 413
    assert (await error_of(response))["type"] == "too_large"

    async def chunks():  # no Content-Length: the limit must hold while reading
        for _ in range(4):
            yield b"a" * (max_bytes // 2)

    response = await client.post("/v1/classify", data=chunks(), headers=bearer(tenants.acme))
    assert response.status == 413
    assert (await error_of(response))["type"] == "too_large"
    # a route that reads its body through aiohttp's own limit names the limit too
    response = await client.post(
        "/v1/adapters/spam/promote", data=payload, headers=bearer(tenants.acme)
    )
    error = await error_of(response)
    assert response.status == 413 and error["type"] == "too_large"
    assert str(max_bytes) in error["message"], error


async def test_unknown_route_and_wrong_method_are_json(client, tenants) -> None:
    response = await client.get("/v1/nothing-here")
    assert response.status == 404
    assert (await error_of(response))["type"] == "not_found"

    response = await client.get("/v1/classify", headers=bearer(tenants.acme))
    assert response.status == 405
    assert "POST" in response.headers["Allow"]
    assert (await error_of(response))["type"] == "method_not_allowed"

    response = await client.post("/health")
    assert response.status == 405
    assert (await error_of(response))["type"] == "method_not_allowed"


async def test_unexpected_failure_is_500_without_details(
    client, engine, tenants, monkeypatch, caplog
) -> None:
    def broken(tenant: str) -> list:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(engine, "list_adapters", broken)
    response = await client.get("/v1/adapters", headers=bearer(tenants.acme))
    assert response.status == 500
    error = await error_of(response)
    assert error["type"] == "internal"
    assert "secret" not in error["message"] and "Traceback" not in error["message"]
    assert "secret internal detail" in caplog.text  # logged, not sent


async def test_stopped_engine_answers_503_and_not_ready(tmp_path) -> None:
    engine = Engine(EngineConfig(registry_dir=tmp_path / "registry"))  # never started
    try:
        async with TestClient(TestServer(create_app(engine))) as client:
            health = await client.get("/health")
            assert health.status == 200
            ready = await client.get("/ready")
            assert ready.status == 503
            assert (await error_of(ready))["type"] == "unavailable"
            response = await client.post(
                "/v1/classify", json={"model": "m", "input": "x"}, headers=bearer("any")
            )
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
            assert (await error_of(response))["type"] == "unavailable"
    finally:
        await engine.close()


async def test_an_engine_closed_under_the_app_answers_503(tmp_path) -> None:
    """Closed after serving (an embedder's own shutdown order): 503 and Retry-After on every
    route that needs it, not a 500 from the closed registry underneath."""
    engine = Engine(EngineConfig(registry_dir=tmp_path / "registry"))
    async with TestClient(TestServer(create_app(engine))) as client:
        await engine.start()
        key = engine.registry.create_tenant("acme")
        await engine.close()
        for method, path, body in [
            ("POST", "/v1/classify", {"model": "m", "input": "x"}),
            ("GET", "/v1/adapters", None),
            ("GET", "/v1/train", None),
        ]:
            response = await client.request(method, path, json=body, headers=bearer(key))
            assert response.status == 503, path
            assert response.headers["Retry-After"] == "1"
            assert (await error_of(response))["type"] == "unavailable"


async def test_create_app_rejects_a_bad_body_limit(engine) -> None:
    with pytest.raises(ValueError, match="max_body_bytes"):
        create_app(engine, max_body_bytes=0)


async def test_malformed_requests_log_one_short_warning_per_burst(client, caplog) -> None:
    """A client sending garbage in a loop must not fill the log with tracebacks."""

    async def send_raw(data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
        writer.write(data)
        await writer.drain()
        answer = await reader.read()  # aiohttp closes the connection after a parse error
        writer.close()
        return answer

    caplog.set_level(logging.DEBUG, logger=SERVER_LOGGER)
    answers = [await send_raw(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n") for _ in range(5)]
    assert all(answer.split(b" ", 2)[1] == b"400" for answer in answers), answers[0][:80]
    records = [r for r in caplog.records if r.name == SERVER_LOGGER]
    assert len(records) == 1, [r.getMessage() for r in records]
    (record,) = records
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert "Error handling request" in record.getMessage() and "\n" not in record.getMessage()


async def test_the_filter_counts_what_a_burst_dropped() -> None:
    now = [0.0]
    quiet = MalformedRequestFilter(interval_s=10.0, clock=lambda: now[0])

    def record(error: BaseException | None) -> logging.LogRecord:
        info = (type(error), error, None) if error is not None else None
        return logging.LogRecord(
            SERVER_LOGGER, logging.ERROR, __file__, 1, "Error handling request from %s",
            ("10.0.0.1",), info,
        )  # fmt: skip

    bad = BadHttpMessage("Bad\n  header")
    first = record(bad)
    assert quiet.filter(first) and first.getMessage() == (
        "Error handling request from 10.0.0.1: 400 Bad header"
    )
    assert not quiet.filter(record(bad)) and not quiet.filter(record(bad))
    now[0] = 10.0
    later = record(bad)
    assert quiet.filter(later) and later.getMessage().endswith("(2 more since the last such line)")
    debug = record(bad)
    debug.levelno = logging.DEBUG  # aiohttp's line for a first bad method: left as it is
    now[0] = 100.0
    assert quiet.filter(debug) and debug.levelno == logging.DEBUG and debug.exc_info
    other = record(RuntimeError("a bug of ours"))
    assert quiet.filter(other) and other.levelno == logging.ERROR and other.exc_info is not None


async def test_a_body_past_the_cap_is_refused_before_the_client_sends_it(client, tenants) -> None:
    """With Expect: 100-continue (curl's way for bodies over 1 MB) the 413 comes first, so a
    client does not send megabytes only to have them refused."""
    past_cap = client.server.app[MAX_BODY_BYTES] + 1
    address = (client.server.host, client.server.port)
    answer = await expect_continue(address, "/v1/classify", tenants.acme, past_cap)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"type":"too_large"' in answer and b"Connection: close" in answer
    body = json.dumps({"model": "spam", "input": "hi"}).encode()
    answer = await expect_continue(address, "/v1/classify", tenants.acme, len(body), body)
    assert answer.startswith(b"HTTP/1.1 100 Continue") and b"HTTP/1.1 200" in answer, answer


async def test_an_http_1_0_expectation_is_ignored_and_an_unknown_one_is_417(client, tenants):
    body = json.dumps({"model": "spam", "input": "hi"}).encode()
    for version, expect, status in (("1.0", "100-continue", b"200"), ("1.1", "magic", b"417")):
        reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
        head = (
            f"POST /v1/classify HTTP/{version}\r\nHost: x\r\n"
            f"Authorization: Bearer {tenants.acme}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nExpect: {expect}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)  # both close: 1.0, and the 417
        writer.close()
        assert answer.split(b" ", 2)[1] == status, answer[:300]


async def test_one_strings_input_error_is_named_input_wherever_the_engine_names_it() -> None:
    from engine import InputError
    from server.errors import from_input_error

    named = from_input_error(InputError("input[0] is empty", "input[0]"), is_batch=False)
    assert (named.field, named.message) == ("input", "input is empty")
    other = from_input_error(InputError("too many tokens in all", "input[0]"), is_batch=False)
    assert (other.field, other.message) == ("input", "too many tokens in all")  # kept whole
    batch = from_input_error(InputError("input[0] is empty", "input[0]"), is_batch=True)
    assert (batch.field, batch.message) == ("input[0]", "input[0] is empty")
