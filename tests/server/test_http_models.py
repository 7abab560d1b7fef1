"""POST /v1/classify with "models": every model answers every input, in JSON and NDJSON."""

import json

import pytest
import torch

from engine import Engine
from engine.peft_io import write_peft_adapter

pytestmark = pytest.mark.asyncio(loop_scope="module")

TEXTS = ["WIN cash now, reply YES", "see you at lunch", "the board approved the merger"]
# acme's models: spam (v2, LoRA), news (LoRA) from conftest; urgent, sales (head-only) here
MODELS = ["spam", "urgent", "news", "sales"]
RESOLVED = [
    {"model": "acme/spam", "version": 2},
    {"model": "acme/urgent", "version": 1},
    {"model": "acme/news", "version": 1},
    {"model": "acme/sales", "version": 1},
]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def head_only(engine: Engine, tenants, tmp_path_factory) -> None:
    """Head-only models (no LoRA weights) of both poolings for acme."""
    backbone = engine.backbone
    for seed, (name, pooling, labels) in enumerate(
        (("urgent", "mean", ("no", "yes")), ("sales", "cls_pooler", ("lead", "other", "spam")))
    ):
        out = tmp_path_factory.mktemp(name)
        gen = torch.Generator().manual_seed(10 + seed)
        write_peft_adapter(
            out,
            backbone,
            {},
            rank=1,
            alpha=1.0,
            head_weight=torch.randn(len(labels), backbone.hidden_size, generator=gen),
            head_bias=torch.randn(len(labels), generator=gen),
        )
        manifest = {
            "labels": list(labels),
            "base_sha256": backbone.sha256,
            "rank": 0,
            "pooling": pooling,
        }
        engine.registry.publish("acme", name, out, manifest)


async def post(client, key: str, body: dict):
    return await client.post("/v1/classify", json=body, headers=bearer(key))


async def test_every_model_answers_each_input_as_it_would_alone(client, tenants, head_only):
    response = await post(client, tenants.acme, {"models": MODELS, "input": TEXTS})
    assert response.status == 200, await response.text()
    body = await response.json()
    assert set(body) == {"models", "data", "usage"}
    assert body["models"] == RESOLVED
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    assert body["usage"] == {
        "inputs": 3,
        "tokens": sum(item["tokens"] for item in body["data"]),
    }
    for name, resolved in zip(MODELS, RESOLVED, strict=True):
        single = await post(client, tenants.acme, {"model": name, "input": TEXTS})
        single_body = await single.json()
        assert set(single_body) == {"model", "version", "data", "usage"}  # shape unchanged
        for item, alone in zip(body["data"], single_body["data"], strict=True):
            assert set(item) == {"index", "results", "truncated", "tokens"}
            assert item["tokens"] == alone["tokens"]
            assert item["truncated"] == alone["truncated"]
            (result,) = [r for r in item["results"] if r["model"] == resolved["model"]]
            assert set(result) == {"model", "version", "label", "scores"}
            assert result["version"] == resolved["version"]
            assert result["label"] == alone["label"]
            assert result["scores"] == pytest.approx(alone["scores"], abs=1e-5)
    for item in body["data"]:
        assert [r["model"] for r in item["results"]] == [m["model"] for m in RESOLVED]


async def test_models_stream_sends_a_line_per_input_then_a_summary(client, tenants, head_only):
    body = {"models": MODELS, "input": TEXTS, "stream": True}
    response = await post(client, tenants.acme, body)
    assert response.status == 200
    assert response.content_type == "application/x-ndjson"
    lines = [json.loads(line) for line in (await response.read()).splitlines()]
    *items, summary = lines
    assert sorted(item["index"] for item in items) == [0, 1, 2]
    assert summary == {
        "done": True,
        "models": RESOLVED,
        "usage": {"inputs": 3, "tokens": sum(item["tokens"] for item in items)},
    }
    plain = await (await post(client, tenants.acme, {**body, "stream": False})).json()
    by_index = {item["index"]: item for item in items}
    for item in plain["data"]:
        streamed = by_index[item["index"]]
        assert [r["label"] for r in streamed["results"]] == [r["label"] for r in item["results"]]


async def test_one_model_in_models_uses_the_models_shape(client, tenants, head_only):
    response = await post(client, tenants.acme, {"models": ["urgent"], "input": "hello"})
    body = await response.json()
    assert body["models"] == [{"model": "acme/urgent", "version": 1}]
    (item,) = body["data"]
    assert [r["model"] for r in item["results"]] == ["acme/urgent"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": "spam", "models": ["spam"], "input": "x"}, "models"),
        ({"input": "x"}, "model"),
        ({"models": "spam", "input": "x"}, "models"),
        ({"models": [], "input": "x"}, "models"),
        ({"models": ["spam", 3], "input": "x"}, "models[1]"),
        ({"models": ["spam", " "], "input": "x"}, "models[1]"),
        ({"models": ["spam", "urgent", "spam"], "input": "x"}, "models[2]"),
        ({"models": ["spam", "acme/spam@2"], "input": "x"}, "models[1]"),
        ({"models": [f"m{i}" for i in range(17)], "input": "x"}, "models"),
        ({"models": ["spam", "urgent"], "input": ["ok", ""]}, "input[1]"),
        ({"models": ["spam", "urgent"], "input": ""}, "input"),
    ],
)
async def test_bad_models_field_is_422_naming_it(client, tenants, head_only, body, field):
    response = await post(client, tenants.acme, body)
    assert response.status == 422, await response.text()
    error = (await response.json())["error"]
    assert error["type"] == "invalid_request"
    assert error["field"] == field


@pytest.mark.parametrize("unknown", ["nope", "secret", "bob/secret", "spam@9"])
async def test_unknown_model_is_404_and_nothing_runs(client, engine, tenants, head_only, unknown):
    before = engine.stats()
    response = await post(
        client, tenants.acme, {"models": ["spam", "urgent", unknown], "input": TEXTS}
    )
    assert response.status == 404
    error = (await response.json())["error"]
    assert error["type"] == "not_found"
    # the caller's own name says what it lacks; a name that is not theirs, nothing more
    reason = ": adapter acme/spam has no version 9 (latest is 2)" if unknown == "spam@9" else ""
    assert error["message"] == f"model {unknown!r} not found{reason} (models[2])"
    after = engine.stats()
    assert after["rows"] == before["rows"]
    assert after["adapter_disk_loads"] == before["adapter_disk_loads"]
    assert after["requests_in_flight"] == 0
