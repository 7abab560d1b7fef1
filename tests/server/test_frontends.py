"""``graft serve --workers``: front-end processes answer as the one-process server does."""

import asyncio
import gzip
import json
import math
import os
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from transformers import AutoTokenizer

import server.link
from engine import Engine, TextEncoder, packaged_backbone_dir
from registry import Registry
from server.app import create_app
from server.frontend import (
    EngineLink,
    Front,
    FrontendConfig,
    create_frontend_app,
)
from server.link import Cancel, Classify, Hello, frame, link_server
from server.metrics import METRICS
from server.train_routes import TrainServiceConfig
from server.workers import (
    front_ends,
)

from .conftest import MAX_BODY_BYTES, MAX_INPUT_TOKENS, Tenants, expect_continue, until

pytestmark = pytest.mark.asyncio(loop_scope="module")

TIMEOUT = aiohttp.ClientTimeout(total=60)
LONG = " ".join(["word"] * (MAX_INPUT_TOKENS * 2))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fronts(engine: Engine, tenants: Tenants) -> AsyncIterator[tuple[str, Any]]:
    """Two front ends over the module's engine; yields their URL and the engine's app."""
    app = create_app(engine, max_body_bytes=MAX_BODY_BYTES)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    try:
        async with front_ends(runner, engine, "127.0.0.1", 0, 2, MAX_BODY_BYTES) as ends:
            host, port = ends.address
            yield f"http://{host}:{port}", ends
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as opened:
        yield opened


def _close(a: Any, b: Any) -> bool:
    """Equal JSON, floats within 1e-5 (a step's other rows may pad the same text apart)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, abs_tol=1e-5)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    return a == b


REQUESTS = [
    # (name, key ("acme", "bob" or a literal), body as sent, content type)
    ("one text", "acme", {"model": "spam", "input": "win a free prize now"}),
    ("a batch", "acme", {"model": "spam@1", "input": ["hello there", "call me", "FREE"]}),
    ("several models", "acme", {"models": ["spam", "news"], "input": ["goal!", "stocks"]}),
    ("truncated", "acme", {"model": "news", "input": [LONG, "short"]}),
    ("too long", "acme", {"model": "news", "input": LONG, "truncate": False}),
    ("too long in a batch", "acme", {"model": "news", "input": ["ok", LONG], "truncate": False}),
    ("blank text", "acme", {"model": "spam", "input": ["fine", "  "]}),
    ("timed out once queued", "acme", {"model": "spam", "input": "hi", "timeout": 1e-6}),
    ("unknown model", "acme", {"model": "nope", "input": "hi"}),
    ("another tenant's model", "acme", {"model": "bob/secret", "input": "hi"}),
    ("model listed twice", "acme", {"models": ["spam", "spam"], "input": "hi"}),
    ("unknown field", "acme", {"model": "spam", "input": "hi", "colour": "red"}),
    ("bad key", "not-a-key", {"model": "spam", "input": "hi"}),
    ("no key", None, {"model": "spam", "input": "hi"}),
    ("not JSON", "acme", b"{model"),
    ("not UTF-8", "acme", b'{"model": "spam", "input": "\xff"}'),
    ("nested too deeply", "acme", b"[" * 10_000 + b"]" * 10_000),
    ("too large", "acme", {"model": "spam", "input": "x" * MAX_BODY_BYTES}),
]


async def _answer(session, url: str, key: str | None, body: Any) -> tuple[int, Any, Any]:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers["Content-Type"] = "application/json"
    async with session.post(f"{url}/v1/classify", data=data, headers=headers) as response:
        return response.status, await response.json(), response.headers


@pytest.mark.parametrize(("name", "who", "body"), REQUESTS, ids=[r[0] for r in REQUESTS])
async def test_classify_answers_as_one_process_does(
    fronts, session, client: TestClient, tenants: Tenants, name: str, who, body
) -> None:
    key = {"acme": tenants.acme, "bob": tenants.bob}.get(who, who)
    url, _ = fronts
    status, answer, headers = await _answer(session, url, key, body)
    here = await client.post(
        "/v1/classify",
        data=body if isinstance(body, bytes) else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}
        | ({} if key is None else {"Authorization": f"Bearer {key}"}),
    )
    assert (status, name) == (here.status, name)
    assert _close(answer, await here.json()), (answer, await here.json())
    for header in ("WWW-Authenticate", "Content-Type"):
        assert headers.get(header) == here.headers.get(header)
    assert headers["X-Request-ID"]
    if status == 200:
        assert headers["Server-Timing"].startswith("queue;dur=")


async def test_other_routes_and_streams_go_to_the_engines_app(
    fronts, session, engine: Engine, tenants: Tenants
) -> None:
    url, _ = fronts
    auth = {"Authorization": f"Bearer {tenants.acme}"}
    for path in ("spam", "acme/spam@1"):
        async with session.get(f"{url}/v1/adapters/{path}", headers=auth) as response:
            assert response.status == 200 and (await response.json())["name"] == "spam"
    async with session.get(f"{url}/v1/adapters/secret", headers=auth) as response:
        assert response.status == 404
    async with session.delete(f"{url}/v1/adapters/secret", headers=auth) as response:
        assert response.status == 404  # bob's: acme cannot delete it, nor learn it exists
    async with session.delete(f"{url}/v1/adapters/spam@2", headers=auth) as response:
        assert response.status == 409 and (await response.json())["error"]["type"] == "conflict"
    async with session.get(f"{url}/ready") as response:
        assert (await response.json())["backbone_sha256"] == engine.backbone.sha256
    async with session.get(f"{url}/nowhere") as response:
        assert response.status == 404 and (await response.json())["error"]["type"]
    body = {"model": "spam", "input": [f"row {i}" for i in range(5)], "stream": True}
    sent_id = "trace-42"
    headers = auth | {"X-Request-ID": sent_id}
    async with session.post(f"{url}/v1/classify", json=body, headers=headers) as response:
        assert response.status == 200 and response.headers["X-Request-ID"] == sent_id
        lines = [json.loads(line) async for line in response.content]
    assert sorted(line["index"] for line in lines[:-1]) == list(range(5))
    assert lines[-1]["done"] is True


@pytest.mark.parametrize("second", ["bob", "Bearer not-a-key"])
async def test_an_authorization_sent_twice_is_a_400_both_ways(
    fronts, session, client: TestClient, tenants: Tenants, second: str
) -> None:
    """A front end reads the first header; were the engine behind it to read the last, one
    request could be authorized as two tenants."""
    other = f"Bearer {tenants.bob}" if second == "bob" else second
    headers = [("Authorization", f"Bearer {tenants.acme}"), ("Authorization", other)]
    url, _ = fronts
    stream = {"model": "secret", "input": "x", "stream": True}
    for method, path, body in [
        ("POST", "/v1/classify", stream),
        ("POST", "/v1/classify", {"model": "spam", "input": "x"}),
        ("GET", "/v1/adapters", None),
    ]:
        for request, prefix in ((session.request, url), (client.request, "")):
            async with request(method, prefix + path, json=body, headers=headers) as response:
                error = (await response.json())["error"]
                assert (response.status, error["type"]) == (400, "invalid_request"), path
                assert "one Authorization header" in error["message"]


async def test_an_answer_that_closes_the_connection_closes_the_clients_too(
    fronts, session, tenants: Tenants
) -> None:
    """The engine ends its connection after a body it cannot trust (a malformed multipart
    upload); the front end must end the client's, not only its own to the engine."""
    url, _ = fronts
    headers = {
        "Authorization": f"Bearer {tenants.acme}",
        "Content-Type": "multipart/form-data; boundary=zz",
    }
    async with session.post(f"{url}/v1/train", data=b"not multipart", headers=headers) as answer:
        assert answer.status == 400 and answer.headers.get("Connection") == "close"


COMPRESSORS = {"gzip": gzip.compress, "deflate": zlib.compress}


@pytest.mark.parametrize("encoding", COMPRESSORS)
async def test_compressed_bodies_reach_the_engine_decoded(
    fronts, session, client: TestClient, tenants: Tenants, encoding: str
) -> None:
    """A front end reads a compressed body decoded and forwards it so; one that does not
    decode is the same JSON 400 as from one process, on handed-over and proxied routes."""
    url, _ = fronts
    headers = {
        "Authorization": f"Bearer {tenants.acme}",
        "Content-Type": "application/json",
        "Content-Encoding": encoding,
    }
    sent = [
        ("/v1/classify", {"model": "spam", "input": "hi"}),
        ("/v1/classify", {"model": "spam", "input": ["hi", "you"], "stream": True}),
        ("/v1/adapters/spam/promote", {"version": 1}),
    ]
    for path, body in sent:
        raw = COMPRESSORS[encoding](json.dumps(body).encode())
        async with session.post(url + path, data=raw, headers=headers) as response:
            status, text = response.status, await response.text()
        assert status == 200, (path, text)
        assert (await client.post(path, data=raw, headers=headers)).status == 200
    for path in ("/v1/classify", "/v1/adapters/spam/promote", "/v1/train"):
        async with session.post(url + path, data=b"not gzip", headers=headers) as response:
            status, error = response.status, (await response.json())["error"]
        assert status == 400 and error["type"] == "invalid_request", error
        assert error["message"].startswith("request body could not be read"), error
        if path != "/v1/train":  # the engine's app runs the jobs, not the `client` app
            here = await client.post(path, data=b"not gzip", headers=headers)
            assert (status, error) == (here.status, (await here.json())["error"])
    unknown = {**headers, "Content-Encoding": "gzip, br"}  # left undecoded: refused as one
    for path in ("/v1/classify", "/v1/adapters/spam/promote", "/v1/train"):
        async with session.post(url + path, data=b"{}", headers=unknown) as response:
            status, error = response.status, (await response.json())["error"]
        assert status == 415 and "'gzip, br' is not supported" in error["message"], error


async def test_metrics_count_the_requests_the_front_ends_hand_over(
    fronts, session, tenants: Tenants
) -> None:
    url, _ = fronts

    async def classify_count() -> float:
        async with session.get(f"{url}/metrics") as response:
            text = await response.text()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("graft_http_request_duration_seconds_count")
            and 'route="/v1/classify"' in line
            and 'status="200"' in line
        )

    _, ends = fronts
    before, handed_over = await classify_count(), ends.link.num_answered
    for _ in range(3):
        status, _, _ = await _answer(
            session, url, tenants.acme, {"model": "spam", "input": "count me"}
        )
        assert status == 200
    assert await classify_count() == before + 3
    assert ends.link.num_answered == handed_over + 3  # as token ids, not proxied HTTP


async def test_many_concurrent_requests_each_get_their_own_answer(
    fronts, session, client: TestClient, tenants: Tenants
) -> None:
    url, _ = fronts
    texts = [f"message number {i} about {'prizes' if i % 2 else 'lunch'}" for i in range(24)]
    answers = await asyncio.gather(
        *(_answer(session, url, tenants.acme, {"model": "spam", "input": t}) for t in texts)
    )
    for text, (status, answer, _) in zip(texts, answers, strict=True):
        alone = await client.post(
            "/v1/classify",
            json={"model": "spam", "input": text},
            headers={"Authorization": f"Bearer {tenants.acme}"},
        )
        assert status == 200 and _close(answer, await alone.json())


async def test_uploads_pass_through_as_they_stream(fronts, session, tenants: Tenants) -> None:
    """A training upload over the classify body cap reaches the engine's app, which checks it
    (here: a bad option, named). The front end's own cap would have answered 413."""
    url, _ = fronts
    rows = b"text,label\n" + b"".join(b"note %d,ham\n" % i for i in range(8000))
    assert len(rows) > MAX_BODY_BYTES

    def upload() -> aiohttp.FormData:
        form = aiohttp.FormData()
        form.add_field("file", rows, filename="big.csv", content_type="text/csv")
        form.add_field("name", "big")
        form.add_field("epochs", "many")
        return form

    auth = {"Authorization": f"Bearer {tenants.acme}"}
    async with session.post(f"{url}/v1/train", data=upload(), headers=auth) as response:
        status, body = response.status, await response.json()
    assert status == 422 and body["error"]["field"] == "epochs"


@pytest.mark.parametrize("stream", [False, True], ids=["handed over", "proxied stream"])
async def test_a_client_that_leaves_drops_its_rows_not_yet_run(
    fronts, session, engine: Engine, tenants: Tenants, stream: bool
) -> None:
    url, _ = fronts
    before = engine.stats()["rows"]
    body = {"model": "spam", "input": [f"text number {i}" for i in range(200)], "stream": stream}
    headers = {"Authorization": f"Bearer {tenants.acme}"}

    async def send() -> None:
        async with session.post(f"{url}/v1/classify", json=body, headers=headers) as response:
            await response.read()

    request = asyncio.create_task(send())
    await until(lambda: engine.stats()["rows"] > before)  # its steps have begun
    request.cancel()
    await until(lambda: engine.stats()["requests_in_flight"] == 0)
    assert engine.stats()["waiting_rows"] == 0
    assert engine.stats()["rows"] - before < 200
    async with session.get(f"{url}/metrics") as response:
        counted = await response.text()
    left = 'graft_http_request_duration_seconds_count{method="POST",route="/v1/classify",status="'
    assert f'{left}499"}}' in counted and f'{left}500"}}' not in counted  # not a server error


async def test_a_cold_adapter_is_answered_then_its_warm_requests_equal_it(
    fronts, session, client: TestClient, engine: Engine, tenants: Tenants, publish
) -> None:
    """A handed-over request whose adapter is still on disk waits for its load in a task;
    once warm, requests are queued at once and answered from their job's callback."""
    publish("acme", "fresh", ("no", "yes"), seed=7)
    url, _ = fronts
    body = {"model": "fresh", "input": ["is this fresh?", "another text"]}
    loads = engine.stats()["adapter_disk_loads"]
    answers = [await _answer(session, url, tenants.acme, body) for _ in range(3)]
    assert engine.stats()["adapter_disk_loads"] == loads + 1
    here = await client.post(
        "/v1/classify", json=body, headers={"Authorization": f"Bearer {tenants.acme}"}
    )
    for status, answer, _ in answers:
        assert status == 200 and _close(answer, await here.json())


async def test_a_front_end_whose_engine_is_gone_answers_503_with_retry_after(
    engine: Engine, tenants: Tenants, tmp_path: Path
) -> None:
    """As one process answers while its engine stops: clients are told when to come back."""

    async def hang_up(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    link_path = str(tmp_path / "link")
    server = await asyncio.start_unix_server(hang_up, link_path)
    link = await EngineLink.connect(link_path)
    await asyncio.wait_for(link.closed.wait(), 10)
    backbone = str(packaged_backbone_dir())
    config = FrontendConfig(
        host="127.0.0.1",
        port=0,
        link_path=link_path,
        engine_path=str(tmp_path / "no-engine"),
        registry_dir=str(engine.registry.root),
        backbone_dir=backbone,
        max_input_tokens=MAX_INPUT_TOKENS,
        max_inputs=256,
        max_body_bytes=MAX_BODY_BYTES,
    )
    tokenizer = AutoTokenizer.from_pretrained(backbone, local_files_only=True)
    connector = aiohttp.UnixConnector(path=config.engine_path)
    with Registry(config.registry_dir) as registry:
        async with aiohttp.ClientSession(connector=connector) as to_engine:
            front = Front(config, registry, TextEncoder(tokenizer), link, to_engine)
            async with TestClient(TestServer(create_frontend_app(front))) as client:
                headers = {"Authorization": f"Bearer {tenants.acme}"}
                body = {"model": "spam", "input": "hi"}
                for method, path in (("POST", "/v1/classify"), ("GET", "/v1/adapters")):
                    response = await client.request(method, path, json=body, headers=headers)
                    assert response.status == 503, (path, await response.text())
                    assert response.headers["Retry-After"] == "1", path
    server.close()
    await server.wait_closed()


async def test_a_front_end_refuses_a_body_past_the_cap_before_it_is_sent(fronts, tenants) -> None:
    url, _ = fronts
    host, port = url.removeprefix("http://").rsplit(":", 1)
    answer = await expect_continue(
        (host, int(port)), "/v1/classify", tenants.acme, MAX_BODY_BYTES + 1
    )
    assert answer.startswith(b"HTTP/1.1 413") and b'"type":"too_large"' in answer, answer[:300]


async def test_classifies_a_front_end_refuses_are_counted_in_the_engines_metrics(
    fronts, session, tenants: Tenants
) -> None:
    """Refused in the front end (401, 413, 422), they never reached the engine's app, and
    /metrics counted none: an alert on auth failures read zero behind --workers."""
    url, _ = fronts
    left = 'graft_http_request_duration_seconds_count{method="POST",route="/v1/classify",status="'

    async def counts() -> dict[str, float]:
        async with session.get(f"{url}/metrics") as response:
            text = await response.text()
        found = {}
        for status in ("401", "413", "422"):
            line = next((x for x in text.splitlines() if x.startswith(f'{left}{status}"}}')), None)
            found[status] = float(line.rsplit(" ", 1)[1]) if line else 0.0
        return found

    before = await counts()
    bad_key = {"Authorization": "Bearer not-a-key"}
    async with session.post(
        f"{url}/v1/classify", json={"model": "spam", "input": "x"}, headers=bad_key
    ) as r:
        assert r.status == 401
    good = {"Authorization": f"Bearer {tenants.acme}"}
    async with session.post(
        f"{url}/v1/classify", json={"model": "spam", "input": []}, headers=good
    ) as r:
        assert r.status == 422
    host, port = url.removeprefix("http://").rsplit(":", 1)  # a 413 before the body is sent
    answer = await expect_continue((host, int(port)), "/v1/classify", tenants.acme, 10**9)
    assert answer.startswith(b"HTTP/1.1 413")
    for _ in range(100):  # the tallies travel over the link
        after = await counts()
        if all(after[status] > before[status] for status in after):
            break
        await asyncio.sleep(0.05)
    assert all(after[status] - before[status] == 1 for status in after), (before, after)


async def test_a_proxied_classify_is_counted_once(fronts, session, tenants: Tenants) -> None:
    """A GET of /v1/classify goes through to the engine, which counts its 405: the front end
    must not count it again as a refusal of its own."""
    url, _ = fronts
    series = 'graft_http_request_duration_seconds_count{method="GET",'  # route: "unmatched"

    async def count() -> float:
        async with session.get(f"{url}/metrics") as response:
            text = await response.text()
        lines = [x for x in text.splitlines() if x.startswith(series) and 'status="405"' in x]
        return sum(float(x.rsplit(" ", 1)[1]) for x in lines)

    before = await count()
    async with session.get(f"{url}/v1/classify") as response:
        assert response.status == 405
    await asyncio.sleep(0.3)  # a tally would travel over the link meanwhile
    after = await count()
    posts = (
        'graft_http_request_duration_seconds_count{method="POST",route="/v1/classify",status="405"}'
    )
    async with session.get(f"{url}/metrics") as response:
        assert posts not in await response.text()
    assert after - before == 1


async def test_a_front_end_refuses_an_upload_past_the_cap_as_the_engine_does(
    fronts, session, tenants: Tenants
) -> None:
    """Proxied, POST /v1/train got aiohttp's 100 Continue and its chunked body was refused
    only once the engine had read the cap: a client sent 25 MB of 30 before its 413. An
    unknown Expect got aiohttp's plain-text 417."""
    url, _ = fronts
    host, port = url.removeprefix("http://").rsplit(":", 1)
    address = (host, int(port))
    cap = TrainServiceConfig().max_upload_bytes  # the fixture's engine app trains by default
    metric = (
        'graft_http_request_duration_seconds_count{method="POST",route="/v1/train",status="413"}'
    )

    async def counted() -> float:
        async with session.get(f"{url}/metrics") as response:
            text = await response.text()
        line = next((x for x in text.splitlines() if x.startswith(metric)), None)
        return float(line.rsplit(" ", 1)[1]) if line else 0.0

    before = await counted()
    answer = await expect_continue(address, "/v1/train", tenants.acme, cap + 1)
    assert answer.startswith(b"HTTP/1.1 413") and b'"field":"file"' in answer, answer[:300]
    reader, writer = await asyncio.open_connection(*address)  # no Expect: refused unread
    writer.write(
        f"POST /v1/train HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tenants.acme}\r\n"
        f"Content-Type: application/x-ndjson\r\nContent-Length: {cap + 1}\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.read(4096), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 413") and b"upload is larger than" in head, head[:300]
    reader, writer = await asyncio.open_connection(*address)
    writer.write(b"GET /v1/adapters HTTP/1.1\r\nHost: x\r\nExpect: magic\r\n\r\n")
    head = await asyncio.wait_for(reader.read(4096), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 417") and b"application/json" in head, head[:300]
    for _ in range(100):  # the tallies travel over the link
        if await counted() - before == 2:
            break
        await asyncio.sleep(0.05)
    assert await counted() - before == 2


def _classify_count(app: web.Application, status: str) -> float:
    """The engine app's tally of ``POST /v1/classify`` answered with ``status``."""
    return sum(
        sample.value
        for metric in app[METRICS].request_seconds.collect()
        for sample in metric.samples
        if sample.name.endswith("_count")
        and sample.labels["route"] == "/v1/classify"
        and sample.labels["status"] == status
    )


async def test_a_cancel_read_with_its_cold_classify_is_counted_and_forgotten(
    engine: Engine, tenants: Tenants, publish, tmp_path: Path
) -> None:
    """A Cancel read in the same chunk as the Classify of an adapter still on disk cancelled
    the admitting task before its body ran: the request was counted nowhere, and its entry
    stayed in the connection's table for as long as the front end lived."""
    publish("acme", "cold-cancelled", ("no", "yes"), seed=11)
    app = create_app(engine, max_body_bytes=MAX_BODY_BYTES)
    ids = tuple(engine.backbone.tokenizer("hi")["input_ids"])
    message = Classify(
        1, "acme", "r1", "cold-cancelled", None, ("hi",), False, True, None, (ids,), (False,)
    )
    path = str(tmp_path / "link.sock")
    async with link_server(app, path) as link:
        _, writer = await asyncio.open_unix_connection(path)
        writer.write(frame(Hello(os.getpid())) + frame(message) + frame(Cancel(1)))
        await writer.drain()
        await until(lambda: _classify_count(app, "499") == 1)
        assert [connection.running for connection in link._connections] == [{}]
        writer.close()


async def test_an_answer_that_fails_to_encode_is_a_500_not_a_hang(
    fronts, session, tenants: Tenants, publish, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encoding a finished job's answer ran outside the callback's ``try``: what it raised
    was only logged, no answer was sent, and the client waited forever."""
    publish("acme", "unencodable", ("fine", "boom-label"), seed=12)
    encode = server.link.encode

    def failing_encode(payload: Any) -> bytes:
        if "boom-label" in repr(payload):
            raise ValueError("cannot encode this answer")
        return encode(payload)

    monkeypatch.setattr(server.link, "encode", failing_encode)
    url, _ = fronts
    body = {"model": "unencodable", "input": "hi"}
    status, answer, _ = await asyncio.wait_for(_answer(session, url, tenants.acme, body), 30)
    assert status == 500 and answer["error"]["type"] == "internal"


async def test_a_client_that_leaves_before_the_hand_over_is_counted(
    fronts, session, tenants: Tenants
) -> None:
    """A client gone while a front end read its body was counted by the one-process server
    as a 499, and behind front ends not at all."""
    url, _ = fronts

    async def left() -> float:
        async with session.get(f"{url}/metrics") as response:
            text = await response.text()
        series = 'graft_http_request_duration_seconds_count{method="POST",route="/v1/classify",'
        line = next((x for x in text.splitlines() if x.startswith(f'{series}status="499"}}')), "")
        return float(line.rsplit(" ", 1)[1]) if line else 0.0

    before = await left()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps({"model": "spam", "input": "hello"}).encode()
    writer.write(
        (
            f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tenants.acme}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body[:5]
    )
    await writer.drain()
    await asyncio.sleep(0.3)  # the front end is reading the body
    writer.close()
    for _ in range(100):  # the tally travels over the link
        if await left() == before + 1:
            break
        await asyncio.sleep(0.05)
    assert await left() == before + 1
