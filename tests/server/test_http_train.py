"""POST /v1/train and friends against a real engine and real worker processes, and the HTTP
promote / rollback of a model's latest pointer."""

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from engine import Engine
from server.app import create_app
from server.metrics import METRICS
from server.train_routes import TRAINING, TrainServiceConfig
from tests.sms_samples import sms_csv
from training.job_uploads import InvalidData

from .conftest import expect_continue, until

pytestmark = pytest.mark.asyncio(loop_scope="module")

UPLOAD_CAP = 16 * 1024
WAIT_S = 240.0  # spawning a worker on a busy 2-core machine takes a while
TINY = {"epochs": "1", "max_length": "32", "rank": "4"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def form(data: bytes, filename: str = "sms.csv", **options: str) -> aiohttp.FormData:
    body = aiohttp.FormData()
    body.add_field("file", data, filename=filename, content_type="text/csv")
    for name, value in options.items():
        body.add_field(name, value)
    return body


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(engine: Engine, tenants) -> AsyncIterator[TestClient]:
    settings = TrainServiceConfig(max_upload_bytes=UPLOAD_CAP, events_poll_s=0.05)
    app = create_app(engine, training=settings)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def start(client: TestClient, key: str, **options: str) -> dict:
    response = await client.post(
        "/v1/train", data=form(sms_csv(), **{**TINY, **options}), headers=bearer(key)
    )
    body = await response.json()
    assert response.status == 202, body
    assert response.headers["Location"] == f"/v1/train/{body['id']}"
    return body


def refuse_checks_after(release: threading.Event, manager, monkeypatch) -> set[str]:
    """Every upload check waits for ``release``, then refuses the data; returns the names of
    the threads the checks ran on, as they come."""
    threads: set[str] = set()

    def slow_rejection(*_args) -> None:
        threads.add(threading.current_thread().name)
        release.wait(WAIT_S)
        raise InvalidData("the check found nothing to train on")

    monkeypatch.setattr(manager._checker, "check", slow_rejection)
    return threads


async def run_to_done(client: TestClient, key: str, **options: str) -> dict:
    """Start a job, wait for its event stream to end with "done", and return the job."""
    started = await start(client, key, **options)
    url = f"/v1/train/{started['id']}"
    events = await asyncio.wait_for(
        (await client.get(f"{url}/events", headers=bearer(key))).text(), WAIT_S
    )
    assert json.loads(events.splitlines()[-1])["type"] == "done", events[-400:]
    return await (await client.get(url, headers=bearer(key))).json()


async def test_a_job_streams_progress_then_serves_once_promoted(client, tenants) -> None:
    started = await start(client, tenants.acme, name="triage", promote="false")
    assert started["state"] == "queued" and started["report"]["num_rows"] == 30
    assert started["report"]["class_counts"] == {"ham": 15, "spam": 15}
    response = await client.get(f"/v1/train/{started['id']}/events", headers=bearer(tenants.acme))
    assert response.headers["Content-Type"].startswith("application/x-ndjson")
    events = [
        json.loads(line) for line in (await asyncio.wait_for(response.text(), WAIT_S)).splitlines()
    ]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "report" and "epoch" in kinds and kinds[-1] == "done", events[-1]
    epoch = events[kinds.index("epoch")]
    assert {"epoch", "epochs", "loss", "val_macro_f1", "eta_s"} <= set(epoch)
    job = await (
        await client.get(f"/v1/train/{started['id']}", headers=bearer(tenants.acme))
    ).json()
    assert job["state"] == "succeeded" and job["version"] == 1
    assert job["model"] == "acme/triage@1" and "macro_f1" in job["metrics"]
    # registered but not promoted: only the pinned version answers
    classify = {"model": "triage", "input": "WIN a prize"}
    response = await client.post("/v1/classify", json=classify, headers=bearer(tenants.acme))
    assert response.status == 404
    response = await client.post(
        "/v1/adapters/triage/promote", json={"version": 1}, headers=bearer(tenants.acme)
    )
    assert await response.json() == {"model": "acme/triage", "version": 1, "latest": True}
    response = await client.post("/v1/classify", json=classify, headers=bearer(tenants.acme))
    assert response.status == 200 and (await response.json())["version"] == 1


async def test_events_replay_as_server_sent_events(client, tenants) -> None:
    [job] = (await (await client.get("/v1/train", headers=bearer(tenants.acme))).json())["data"]
    headers = {**bearer(tenants.acme), "Accept": "text/event-stream"}
    response = await client.get(f"/v1/train/{job['id']}/events", headers=headers)
    assert response.headers["Content-Type"].startswith("text/event-stream")
    blocks = (await response.text()).strip().split("\n\n")
    first = dict(line.split(": ", 1) for line in blocks[0].splitlines())
    assert first["id"] == "0" and first["event"] == "report"
    assert json.loads(first["data"])["report"]["num_rows"] == 30
    assert blocks[-1].splitlines()[1] == "event: done"
    resumed = await client.get(
        f"/v1/train/{job['id']}/events", headers={**headers, "Last-Event-ID": "1"}
    )
    assert (await resumed.text()).startswith("id: 2\n")
    for odd in ("\u00b2", "9" * 5000):  # a digit to isdigit() only; past int()'s digits
        again = await client.get(
            f"/v1/train/{job['id']}/events",
            headers={**headers, "Last-Event-ID": odd.encode().decode("latin-1")},
        )
        assert again.status == 200 and (await again.text()).startswith("id: 0\n")


async def test_cancel_kills_the_job_and_publishes_nothing(client, tenants) -> None:
    started = await start(client, tenants.acme, name="cancelme")
    url = f"/v1/train/{started['id']}"
    response = await client.delete(url, headers=bearer(tenants.acme))
    assert response.status == 200 and (await response.json())["state"] == "cancelled"
    response = await client.delete(url, headers=bearer(tenants.acme))
    body = await response.json()
    assert response.status == 409 and body["error"]["type"] == "conflict"
    events = await (await client.get(f"{url}/events", headers=bearer(tenants.acme))).text()
    assert json.loads(events.splitlines()[-1])["type"] == "cancelled"
    adapters = await (await client.get("/v1/adapters", headers=bearer(tenants.acme))).json()
    assert "cancelme" not in {a["name"] for a in adapters["data"]}
    metrics = await (await client.get("/metrics")).text()
    jobs = {  # graft_train_jobs{state="..."} N
        line.split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("graft_train_jobs{")
    }
    assert set(jobs) == {"queued", "running", "succeeded", "failed", "cancelled"}
    assert jobs["cancelled"] >= 1 and "graft_train_available 1.0" in metrics


async def test_jobs_are_private_to_their_tenant(client, tenants) -> None:
    [job, _] = (await (await client.get("/v1/train", headers=bearer(tenants.acme))).json())["data"]
    for method, path in [
        ("GET", f"/v1/train/{job['id']}"),
        ("GET", f"/v1/train/{job['id']}/events"),
        ("DELETE", f"/v1/train/{job['id']}"),
        ("GET", "/v1/train/not-a-job-id"),
    ]:
        response = await client.request(method, path, headers=bearer(tenants.bob))
        assert response.status == 404, path
        assert (await response.json())["error"]["type"] == "not_found"
    listed = await (await client.get("/v1/train", headers=bearer(tenants.bob))).json()
    assert listed == {"data": []}
    response = await client.post("/v1/train", data=form(sms_csv(), name="x"))
    assert response.status == 401


async def test_unreadable_rows_are_a_422_naming_them(client, tenants) -> None:
    lines = [
        '{"options": {"name": "lines", "epochs": 1}}',
        '{"text": "fine", "label": "ham"}',
        '{"text": "broken", ',
        '{"text": 5, "label": "spam"}',
    ]
    response = await client.post(
        "/v1/train",
        data="\n".join(lines).encode(),
        headers={**bearer(tenants.acme), "Content-Type": "application/x-ndjson"},
    )
    error = (await response.json())["error"]
    assert response.status == 422 and error["type"] == "invalid_data"
    assert error["rows"] == [3, 4] and error["field"] == "file"
    assert error["message"].startswith("upload.jsonl: 2 unreadable rows: row 3: malformed JSON")


async def test_undecodable_lines_are_a_4xx_not_a_crash(client, tenants) -> None:
    ndjson = {**bearer(tenants.acme), "Content-Type": "application/x-ndjson"}
    rows = "".join(json.dumps({"text": f"t{i}", "label": "ab"[i % 2]}) + "\n" for i in range(8))
    deep = b"[" * 3_000 + b"]" * 3_000  # past the recursion limit, under the upload cap
    huge_int = b'{"text": "x", "label": ' + b"9" * 5000 + b"}"
    response = await client.post(
        "/v1/train?name=lines&epochs=1",
        data=deep + b"\n" + huge_int + b"\n" + rows.encode(),
        headers=ndjson,
    )
    error = (await response.json())["error"]
    assert response.status == 422 and error["rows"] == [1, 2], error
    assert "nested too deeply" in error["message"] and "4300 digits" in error["message"]
    # a first line that is not an options line is a data row, whatever it holds
    for first in (b'{"options": ' + deep + b"}", b'{"options": {"name": "\xff"}}'):
        response = await client.post(
            "/v1/train?name=lines", data=first + b"\n" + rows.encode(), headers=ndjson
        )
        error = (await response.json())["error"]
        assert response.status == 422 and error["rows"][0] == 1, error
    for first in (b"\xef\xbb\xbf", b""):  # a BOM before the options line, as before a row
        response = await client.post(
            "/v1/train",
            data=first + b'{"options": {"name": "lines", "epochs": "\xc2\xb2"}}\n' + rows.encode(),
            headers=ndjson,
        )
        error = (await response.json())["error"]
        assert response.status == 422 and error["field"] == "epochs", error
    for raw in (deep, b'{"version": "\xff"}'):
        response = await client.post("/v1/adapters/spam/promote", data=raw, headers=ndjson)
        assert response.status == 400 and (await response.json())["error"]["type"] == "invalid_json"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b"not multipart"),
        ("multipart/form-data; boundary=zz", b"not multipart"),
        ("multipart/form-data; boundary=zz", None),  # a first line past aiohttp's limit
    ],
)
async def test_a_malformed_multipart_body_is_a_400(client, tenants, content_type, body) -> None:
    async def long_line() -> AsyncIterator[bytes]:  # chunked: no length to refuse up front
        for _ in range(60):
            yield b"g" * 10_000
        yield b"\r\n"

    headers = {**bearer(tenants.acme), "Content-Type": content_type}
    data = long_line() if body is None else body
    response = await client.post("/v1/train", data=data, headers=headers)
    error = (await response.json())["error"]
    assert response.status == 400 and error["message"].startswith("malformed multipart body")
    assert response.headers["Connection"] == "close"  # the rest of the stream is not trusted


async def test_fatal_data_problems_are_a_422_with_the_report(client, tenants) -> None:
    rows = "".join(json.dumps({"text": f"note {i}", "label": "ham"}) + "\n" for i in range(8))
    response = await client.post(
        "/v1/train?name=lines&epochs=1",
        data=rows.encode(),
        headers={**bearer(tenants.acme), "Content-Type": "application/x-ndjson"},
    )
    error = (await response.json())["error"]
    assert response.status == 422 and "only one class" in error["message"]
    assert error["report"]["num_rows"] == 8 and error["rows"] == []


async def test_a_class_too_small_to_train_on_is_named_by_its_rows(client, tenants) -> None:
    labels = ["ham"] * 6 + ["spam", "ham", "spam"]  # spam: rows 7 and 9, two of the five needed
    rows = "".join(
        json.dumps({"text": f"note {i}", "label": label}) + "\n" for i, label in enumerate(labels)
    )
    response = await client.post(
        "/v1/train?name=lines&epochs=1",
        data=rows.encode(),
        headers={**bearer(tenants.acme), "Content-Type": "application/x-ndjson"},
    )
    error = (await response.json())["error"]
    assert response.status == 422 and "class 'spam' has 2 example(s)" in error["message"]
    assert error["rows"] == [7, 9] and error["report"]["error_rows"] == [7, 9]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({}, "name"),
        ({"name": "Bad Name"}, "name"),
        ({"name": "x", "epochs": "many"}, "epochs"),
        ({"name": "x", "epochs": "0"}, "epochs"),
        ({"name": "x", "mode": "turbo"}, "mode"),
        ({"name": "x", "weights_dtype": "int4"}, "weights_dtype"),
        ({"name": "x", "promote": "maybe"}, "promote"),
        ({"name": "x", "lr": "0.1"}, "lr"),
        ({"name": "x", "max_length": "100000"}, "max_length"),  # past the position embeddings
    ],
)
async def test_bad_options_are_a_422_naming_the_field(client, tenants, options, field) -> None:
    response = await client.post(
        "/v1/train", data=form(sms_csv(), **options), headers=bearer(tenants.acme)
    )
    error = (await response.json())["error"]
    assert response.status == 422 and error["field"] == field, error


async def test_an_option_or_file_sent_twice_is_a_422_not_the_last_one_kept(client, tenants) -> None:
    twice_file = form(sms_csv(), name="twice")
    twice_file.add_field("file", b"text,label\n", filename="other.csv", content_type="text/csv")
    twice_option = form(sms_csv(), name="twice", epochs="1")
    twice_option.add_field("epochs", "3")
    for body, field in ((twice_file, "file"), (twice_option, "epochs")):
        response = await client.post("/v1/train", data=body, headers=bearer(tenants.acme))
        error = (await response.json())["error"]
        assert response.status == 422 and error["field"] == field, error
        assert "sent more than once" in error["message"], error
    ndjson = {**bearer(tenants.acme), "Content-Type": "application/x-ndjson"}
    rows = b'{"text": "hi", "label": "a"}\n'
    options_line = b'{"options": {"epochs": 2}}\n'
    for query, data, field in (
        ("name=twice&epochs=1&epochs=2", rows, "epochs"),
        ("name=twice&epochs=1", options_line + rows, "epochs"),
    ):
        response = await client.post(f"/v1/train?{query}", data=data, headers=ndjson)
        error = (await response.json())["error"]
        assert response.status == 422 and error["field"] == field, error
    jobs = await (await client.get("/v1/train", headers=bearer(tenants.acme))).json()
    assert not any(job["name"] == "twice" for job in jobs["data"]), jobs


async def test_a_multipart_upload_takes_options_from_the_query_too(client, tenants) -> None:
    """The query's options were read for JSON lines only: on a multipart upload a bad, unknown
    or valid one alike was dropped without a word, and the job trained on defaults."""
    acme = bearer(tenants.acme)
    options = {k: v for k, v in TINY.items() if k != "epochs"}
    for query, field, said in (
        ("epochs=banana", "epochs", "must be a positive integer"),
        ("colour=red", "colour", "unknown option"),
        ("epochs=1&epochs=2", "epochs", "more than once"),
        ("rank=4", "rank", "both in the query and in a part"),
    ):
        body = form(sms_csv(), name="viaquery", **options)
        response = await client.post(f"/v1/train?{query}", data=body, headers=acme)
        error = (await response.json())["error"]
        assert response.status == 422 and error["field"] == field, (query, error)
        assert said in error["message"], error
    body = form(sms_csv(), name="viaquery", **options)
    response = await client.post("/v1/train?epochs=2&promote=false", data=body, headers=acme)
    started = await response.json()
    assert response.status == 202, started
    url = f"/v1/train/{started['id']}"
    try:
        job = await (await client.get(url, headers=acme)).json()
        assert job["config"]["epochs"] == 2 and job["promote"] is False, job
    finally:
        await client.delete(url, headers=acme)


async def test_a_refused_option_value_is_echoed_cut_short(client, tenants) -> None:
    ndjson = {**bearer(tenants.acme), "Content-Type": "application/x-ndjson"}
    rows = b'{"text": "hi", "label": "a"}\n'
    for option in ("mode", "promote", "epochs", "weights_dtype"):
        first = json.dumps({"options": {"name": "long", option: "z" * 10_000}}).encode()
        response = await client.post("/v1/train", data=first + b"\n" + rows, headers=ndjson)
        text = await response.text()
        assert response.status == 422 and len(text) < 1_000, (option, text[:300])
        assert json.loads(text)["error"]["field"] == option


async def test_an_upload_past_the_cap_is_refused_before_it_is_sent(client, tenants) -> None:
    address = (client.server.host, client.server.port)
    ndjson = "application/x-ndjson"
    answer = await expect_continue(address, "/v1/train", tenants.acme, UPLOAD_CAP + 1, b"", ndjson)
    assert answer.startswith(b"HTTP/1.1 413") and b'"field":"file"' in answer, answer[:300]


async def test_uploads_over_the_cap_are_a_413(client, tenants) -> None:
    big = b"text,label\n" + b"a,b\n" * (UPLOAD_CAP // 4)
    response = await client.post(
        "/v1/train", data=form(big, name="x"), headers=bearer(tenants.acme)
    )
    assert response.status == 413 and (await response.json())["error"]["type"] == "too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the cap applies while reading
        for _ in range(UPLOAD_CAP // 1024 + 2):
            yield b'{"text": "' + b"x" * 1000 + b'", "label": "a"}\n'

    response = await client.post(
        "/v1/train?name=x",
        data=chunks(),
        headers={**bearer(tenants.acme), "Content-Type": "application/x-ndjson"},
    )
    assert response.status == 413
    response = await client.post("/v1/train", json={"name": "x"}, headers=bearer(tenants.acme))
    assert response.status == 415


async def test_the_cap_holds_for_every_part_of_a_chunked_multipart_body(client, tenants) -> None:
    """Not the file part's bytes alone: parts without a name, and option parts, counted too;
    a part of no known option is refused as it arrives, not once the body is read."""
    boundary = "QQ"
    headers = {
        **bearer(tenants.acme),
        "Content-Type": f"multipart/form-data; boundary={boundary}",
    }

    def part(header: str, payload: bytes) -> bytes:
        return f"--{boundary}\r\n{header}\r\n\r\n".encode() + payload + b"\r\n"

    def body(extra: Callable[[], Iterator[bytes]]) -> Callable[[], AsyncIterator[bytes]]:
        async def chunks() -> AsyncIterator[bytes]:
            yield part('Content-Disposition: form-data; name="file"; filename="s.csv"', sms_csv())
            yield part('Content-Disposition: form-data; name="name"', b"capped")
            for chunk in extra():
                yield chunk
            yield f"--{boundary}--\r\n".encode()

        return chunks

    def unnamed() -> Iterator[bytes]:  # 40 times the cap in a part with no name
        yield f"--{boundary}\r\nContent-Type: text/plain\r\n\r\n".encode()
        for _ in range(40):
            yield b"a" * UPLOAD_CAP
        yield b"\r\n"

    def options() -> Iterator[bytes]:  # each under an option's own limit
        for i in range(1_000):
            yield part(f'Content-Disposition: form-data; name="o{i}"', b"v" * 500)

    response = await client.post("/v1/train", data=body(unnamed)(), headers=headers)
    assert response.status == 413, await response.text()
    response = await client.post("/v1/train", data=body(options)(), headers=headers)
    error = (await response.json())["error"]
    assert response.status == 422 and error["field"] == "o0", error


async def test_promote_and_rollback_over_http(client, tenants) -> None:
    acme = bearer(tenants.acme)
    # the caller's full name works as in classify and DELETE
    response = await client.post("/v1/adapters/acme/spam/rollback", headers=acme)
    assert await response.json() == {"model": "acme/spam", "version": 1, "previous": 2}
    classify = {"model": "spam", "input": "hello"}
    response = await client.post("/v1/classify", json=classify, headers=acme)
    assert (await response.json())["version"] == 1
    response = await client.post(
        "/v1/adapters/acme%2Fspam/promote", json={"version": 2}, headers=acme
    )
    assert response.status == 200
    response = await client.post("/v1/classify", json=classify, headers=acme)
    assert (await response.json())["version"] == 2
    for key, name, body, status, field in [
        (tenants.acme, "spam", {"version": 9}, 404, None),
        (tenants.acme, "spam", {"version": 2**63}, 404, None),  # past SQLite's integers
        (tenants.bob, "spam", {"version": 1}, 404, None),
        (tenants.bob, "acme/spam", {"version": 1}, 404, None),
        (tenants.acme, "spam@2", {"version": 2}, 404, None),
        (tenants.acme, "spam", {"version": "2"}, 422, "version"),
        (tenants.acme, "spam", {"version": 2, "why": "x"}, 422, "why"),
    ]:
        response = await client.post(f"/v1/adapters/{name}/promote", json=body, headers=bearer(key))
        error = (await response.json())["error"]
        assert response.status == status and error.get("field") == field, error
    long_key = json.dumps({"k" * 100_000: 1}).encode()
    response = await client.post("/v1/adapters/spam/rollback", data=long_key, headers=acme)
    assert response.status == 422 and len(await response.read()) < 1_000
    for body, status, field in [
        (b'{"version": 1}', 422, "version"),
        (b"[]", 422, None),
        (b"not json", 400, None),
    ]:
        response = await client.post("/v1/adapters/spam/rollback", data=body, headers=acme)
        error = (await response.json())["error"]
        assert response.status == status and error.get("field") == field, error
    response = await client.post("/v1/adapters/spam/rollback", json={}, headers=acme)
    assert (await response.json())["version"] == 1  # an empty object is no body
    response = await client.post("/v1/adapters/spam/promote", json={"version": 2}, headers=acme)
    assert response.status == 200
    response = await client.post("/v1/adapters/news/rollback", headers=acme)
    assert (
        response.status == 404
        and "no previously promoted" in (await response.json())["error"]["message"]
    )


async def test_a_head_only_job_serves_at_once_and_takes_no_pool_pages(
    client, tenants, engine
) -> None:
    bob = bearer(tenants.bob)
    job = await run_to_done(client, tenants.bob, name="headonly", mode="head")
    assert job["state"] == "succeeded" and job["model"] == "bob/headonly@1"
    record = engine.registry.resolve("bob", "headonly")
    assert record.rank == 0 and record.manifest["mode"] == "head"
    # held out as this server reads texts: cut at its max_input_tokens, not the backbone's
    assert record.manifest["training"]["eval_max_tokens"] == engine.max_input_tokens == 32
    free_before = engine.stats()["adapter_pages_free"]
    response = await client.post(
        "/v1/classify", json={"model": "headonly", "input": "WIN a prize now"}, headers=bob
    )
    assert response.status == 200 and (await response.json())["version"] == 1
    assert engine.stats()["adapter_pages_free"] == free_before


async def test_a_full_job_writes_a_standalone_model_and_registers_nothing(
    client, tenants, engine
) -> None:
    bob = bearer(tenants.bob)
    job = await run_to_done(client, tenants.bob, name="ceiling", mode="full")
    assert job["state"] == "succeeded" and job["model"] is None and job["version"] is None
    assert 0.0 <= job["metrics"]["macro_f1"] <= 1.0
    assert all(r.name != "ceiling" for r in engine.registry.list_adapters("bob"))
    model_dir = Path(engine.config.registry_dir) / "jobs" / job["id"] / "model"
    assert (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()
    response = await client.post(
        "/v1/classify", json={"model": "ceiling", "input": "hello"}, headers=bob
    )
    assert response.status == 404  # never loaded into the shared engine


async def test_uploads_waiting_for_the_validator_hold_up_no_promote(
    client, tenants, monkeypatch
) -> None:
    """Uploads are checked one at a time; those waiting their turn must not take the threads
    that another tenant's rollback and promote run on, and past a tenant's limit they are
    refused at once."""
    checking = threading.Event()
    manager = client.server.app[TRAINING].manager
    threads = refuse_checks_after(checking, manager, monkeypatch)
    uploads = [
        asyncio.create_task(
            client.post("/v1/train", data=form(sms_csv(), name="zz", **TINY), headers=bearer(key))
        )
        for key in (tenants.acme, tenants.bob)
        for _ in range(3)  # each tenant's limit of unfinished jobs
    ]
    try:
        while sum(manager._uploading.values()) < 6:
            await asyncio.sleep(0.01)
        response = await client.post(
            "/v1/train", data=form(sms_csv(), name="zz", **TINY), headers=bearer(tenants.acme)
        )
        assert response.status == 429, await response.text()
        acme = bearer(tenants.acme)
        rollback = client.post("/v1/adapters/spam/rollback", headers=acme)
        response = await asyncio.wait_for(rollback, 30)
        assert (await response.json())["version"] == 1
        promote = client.post("/v1/adapters/spam/promote", json={"version": 2}, headers=acme)
        assert (await asyncio.wait_for(promote, 30)).status == 200
    finally:
        checking.set()
        responses = await asyncio.gather(*uploads)
    assert [r.status for r in responses] == [422] * 6
    assert threads and all(name.startswith("graft-train-upload") for name in threads)


async def test_an_event_stream_ends_cleanly_when_its_tenant_is_deleted(client, engine) -> None:
    """The stream asked for the job on every poll; once its tenant was gone that raised
    after the answer had begun: a cut chunked body and a 500 in the log."""
    key = engine.registry.create_tenant("carol")
    started = await start(client, key, name="doomed", epochs="1000")
    url = f"/v1/train/{started['id']}/events"
    async with client.get(url, headers=bearer(key)) as response:
        assert response.status == 200
        first = json.loads(await response.content.readline())
        assert first["type"] == "report"
        engine.registry.delete_tenant("carol")
        rest = await asyncio.wait_for(response.read(), WAIT_S)  # ends, and reads whole
    assert all(json.loads(line)["type"] != "error" for line in rest.splitlines())


def _raw_multipart(parts: list[tuple[bytes, bytes]]) -> bytes:
    """A multipart body of (header, body) parts written byte for byte (FormData would encode
    the headers' bytes)."""
    sections = b"".join(b"--BND\r\n" + head + b"\r\n\r\n" + body + b"\r\n" for head, body in parts)
    return sections + b"--BND--\r\n"


async def test_non_utf8_bytes_in_a_part_header_are_a_json_422_or_kept_as_text(
    client, tenants
) -> None:
    """aiohttp reads a part header's bytes that are not UTF-8 as lone surrogates. Echoed in an
    error's field, they failed to encode into a plain-text 500; kept as a job's file name,
    every later answer about the tenant's jobs was a 500."""
    headers = {**bearer(tenants.acme), "Content-Type": "multipart/form-data; boundary=BND"}
    unknown = _raw_multipart([(b'Content-Disposition: form-data; name="x\xffy"', b"1")])
    response = await client.post("/v1/train", data=unknown, headers=headers)
    error = (await response.json())["error"]
    assert response.status == 422 and error["field"] == "x\\udcffy", error
    upload = _raw_multipart(
        [
            (b'Content-Disposition: form-data; name="name"', b"oddname"),
            (b'Content-Disposition: form-data; name="epochs"', b"1"),
            (b'Content-Disposition: form-data; name="file"; filename="d\xff.csv"', sms_csv()),
        ]
    )
    response = await client.post("/v1/train", data=upload, headers=headers)
    started = await response.json()
    assert response.status == 202, started
    try:
        jobs = await client.get("/v1/train", headers=bearer(tenants.acme))
        listed = {job["id"]: job for job in (await jobs.json())["data"]}
        assert jobs.status == 200 and listed[started["id"]]["source"] == "d\\udcff.csv"
    finally:
        await client.delete(f"/v1/train/{started['id']}", headers=bearer(tenants.acme))


async def test_an_option_given_twice_in_the_first_line_is_a_422(client, tenants) -> None:
    """JSON keeps a key's last value: {"name": "a", "name": "b"} trained as "b", where the
    README promises a 422 for an option sent twice."""
    ndjson = {**bearer(tenants.acme), "Content-Type": "application/x-ndjson"}
    rows = b'{"text": "hi", "label": "a"}\n'
    for line in (
        b'{"options": {"name": "first", "name": "second", "mode": "head"}}\n',
        b'{"options": {"name": "first"}, "options": {"name": "second"}}\n',
    ):
        response = await client.post("/v1/train", data=line + rows, headers=ndjson)
        error = (await response.json())["error"]
        assert response.status == 422 and "given twice" in error["message"], error


async def test_an_upload_whose_client_left_during_its_check_makes_no_job(
    client, tenants, monkeypatch
) -> None:
    """The check runs on in its thread when the client goes; it used to queue the job all the
    same, to train (and with promote=true publish) for a client that never got its id."""
    checking, release = threading.Event(), threading.Event()
    manager = client.server.app[TRAINING].manager
    check = manager._checker.check

    def slow_check(*args):
        checking.set()
        release.wait(WAIT_S)
        return check(*args)

    def gone_count() -> float:
        value = client.server.app[METRICS].registry.get_sample_value(
            "graft_http_request_duration_seconds_count",
            {"method": "POST", "route": "/v1/train", "status": "499"},
        )
        return value or 0.0

    monkeypatch.setattr(manager._checker, "check", slow_check)
    before, jobs_before = gone_count(), len(manager.list_jobs("acme"))
    upload = asyncio.create_task(
        client.post(
            "/v1/train", data=form(sms_csv(), name="left", **TINY), headers=bearer(tenants.acme)
        )
    )
    try:
        await until(checking.is_set)
        upload.cancel()  # the client gives up: its connection closes
        with pytest.raises(asyncio.CancelledError):
            await upload
        await until(lambda: gone_count() > before)  # the server saw it go
    finally:
        release.set()
    await until(lambda: not manager._uploading)
    assert len(manager.list_jobs("acme")) == jobs_before
    jobs_dir = manager._config.jobs_dir
    assert not [p for p in jobs_dir.iterdir() if p.name.startswith(".staging-")]
    monkeypatch.undo()  # and the next upload is a job as before
    started = await start(client, tenants.acme, name="left")
    assert (await client.delete(f"/v1/train/{started['id']}", headers=bearer(tenants.acme))).ok


async def test_a_tenant_at_its_limit_is_refused_before_its_upload_is_read(
    client, tenants, monkeypatch
) -> None:
    """Uploads counted only once received: a tenant at its limit could hold 20 MiB of the
    server's memory per connection, sending bodies it would then be refused."""
    checking = threading.Event()
    manager = client.server.app[TRAINING].manager
    refuse_checks_after(checking, manager, monkeypatch)
    uploads = [
        asyncio.create_task(
            client.post(
                "/v1/train", data=form(sms_csv(), name="zz", **TINY), headers=bearer(tenants.bob)
            )
        )
        for _ in range(3)  # bob's limit of unfinished jobs
    ]
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        await until(lambda: manager._uploading.get("bob") == 3)
        head = (
            f"POST /v1/train?name=zz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tenants.bob}"
            f"\r\nContent-Type: application/x-ndjson\r\nContent-Length: {UPLOAD_CAP}\r\n\r\n"
        )
        writer.write(head.encode() + b'{"text": "a few bytes of a body never finished"')
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 10)  # not waiting for the rest
        assert b" 429 " in status, status
    finally:
        writer.close()
        checking.set()
        responses = await asyncio.gather(*uploads)
    assert [r.status for r in responses] == [422] * 3
    assert manager._uploading == {}
