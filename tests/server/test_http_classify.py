"""POST /v1/classify, GET /v1/adapters, /health and /ready against a real engine."""

import math

import pytest
from aiohttp.test_utils import TestClient

from engine import Engine

pytestmark = pytest.mark.asyncio(loop_scope="module")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def post_classify(client: TestClient, key: str, **body: object) -> tuple[int, dict]:
    response = await client.post("/v1/classify", json=body, headers=bearer(key))
    return response.status, await response.json()


async def test_classify_one_text(client, tenants) -> None:
    status, body = await post_classify(client, tenants.acme, model="news", input="Stocks rallied")
    assert status == 200
    assert body["model"] == "acme/news" and body["version"] == 1
    [item] = body["data"]
    assert item["index"] == 0 and item["truncated"] is False
    assert set(item["scores"]) == {"business", "sport", "tech"}
    assert math.isclose(sum(item["scores"].values()), 1.0, rel_tol=1e-5)
    assert item["label"] == max(item["scores"], key=item["scores"].get)
    assert body["usage"] == {"inputs": 1, "tokens": item["tokens"]}
    assert item["tokens"] >= 3  # [CLS] ... [SEP]


async def test_classify_list_keeps_input_order(client, tenants) -> None:
    texts = ["win a free prize now", "lunch at noon?", "claim your reward", "see you", "hi"]
    status, body = await post_classify(client, tenants.acme, model="spam@1", input=texts)
    assert status == 200
    assert [item["index"] for item in body["data"]] == [0, 1, 2, 3, 4]
    assert body["usage"]["inputs"] == 5
    assert body["usage"]["tokens"] == sum(item["tokens"] for item in body["data"])
    # the same text alone gets the same answer as inside a batch
    _, alone = await post_classify(client, tenants.acme, model="spam@1", input=texts[2])
    for label, score in alone["data"][0]["scores"].items():
        assert math.isclose(score, body["data"][2]["scores"][label], abs_tol=1e-4)


@pytest.mark.parametrize(
    ("model", "version", "labels"),
    [
        ("spam@1", 1, {"ham", "spam"}),
        ("spam", 2, {"ham", "spam", "phish"}),
        ("acme/spam", 2, {"ham", "spam", "phish"}),
        ("acme/spam@1", 1, {"ham", "spam"}),
        ("spam@2", 2, {"ham", "spam", "phish"}),
    ],
)
async def test_model_references_and_pinned_versions(client, tenants, model, version, labels):
    status, body = await post_classify(client, tenants.acme, model=model, input="hello")
    assert status == 200, body
    assert body["model"] == "acme/spam" and body["version"] == version
    assert set(body["data"][0]["scores"]) == labels


async def test_latest_moves_when_a_version_is_published(client, engine, publish) -> None:
    key = engine.registry.create_tenant("carol")
    publish("carol", "topic", ["a", "b"], seed=5)
    _, before = await post_classify(client, key, model="topic", input="x y z")
    publish("carol", "topic", ["a", "b", "c"], seed=6)
    _, latest = await post_classify(client, key, model="topic", input="x y z")
    _, pinned = await post_classify(client, key, model="topic@1", input="x y z")
    assert (before["version"], latest["version"], pinned["version"]) == (1, 2, 1)
    assert set(latest["data"][0]["scores"]) == {"a", "b", "c"}
    status, missing = await post_classify(client, key, model="topic@3", input="x")
    assert status == 404 and missing["error"]["type"] == "not_found"


async def test_other_tenants_model_is_indistinguishable_from_a_missing_one(
    client, engine, tenants, publish
) -> None:
    # bob's "later" does not exist yet: the answer acme gets must not change once it does
    status_before, before = await post_classify(client, tenants.acme, model="bob/later", input="x")
    publish("bob", "later", ["no", "yes"], seed=7)
    status_after, after = await post_classify(client, tenants.acme, model="bob/later", input="x")
    assert status_before == status_after == 404
    assert before == after
    assert before["error"]["type"] == "not_found"
    owner_status, _ = await post_classify(client, tenants.bob, model="later", input="x")
    assert owner_status == 200
    # and an existing name of bob's reads like a made-up one, up to the echoed reference
    _, real = await post_classify(client, tenants.acme, model="bob/secret", input="x")
    _, fake = await post_classify(client, tenants.acme, model="bob/nosuch", input="x")
    assert real["error"]["message"].replace("bob/secret", "M") == (
        fake["error"]["message"].replace("bob/nosuch", "M")
    )
    # the bare name resolves in the caller's own tenant only
    status, _ = await post_classify(client, tenants.acme, model="secret", input="x")
    assert status == 404


async def test_long_text_is_truncated_by_default(client, engine, tenants) -> None:
    long_text = "word " * (engine.max_input_tokens * 2)
    status, body = await post_classify(
        client, tenants.acme, model="news", input=["short", long_text]
    )
    assert status == 200
    short, long = body["data"]
    assert short["truncated"] is False
    assert long["truncated"] is True and long["tokens"] == engine.max_input_tokens


async def test_long_text_without_truncation_is_413(client, engine, tenants) -> None:
    long_text = "word " * (engine.max_input_tokens * 2)
    status, body = await post_classify(
        client, tenants.acme, model="news", truncate=False, input=["short", long_text]
    )
    assert status == 413
    assert body["error"]["type"] == "too_large" and body["error"]["field"] == "input[1]"
    status, body = await post_classify(
        client, tenants.acme, model="news", truncate=False, input=long_text
    )
    assert status == 413 and body["error"]["field"] == "input"
    assert body["error"]["message"].startswith("input has "), body  # not input[0]: one string


async def test_adapters_lists_own_models_only(client, engine, tenants) -> None:
    response = await client.get("/v1/adapters", headers=bearer(tenants.acme))
    assert response.status == 200
    entries = {entry["name"]: entry for entry in (await response.json())["data"]}
    assert set(entries) == {"news", "spam"}
    spam = entries["spam"]
    assert spam["model"] == "acme/spam"
    assert spam["version"] == 2 and spam["versions"] == [1, 2]
    assert spam["rank"] == 8 and spam["labels"] == ["ham", "spam", "phish"]
    assert spam["metrics"] == {"accuracy": 0.95}
    assert spam["base_sha256"] == engine.backbone.sha256
    assert spam["size_bytes"] > 0 and len(spam["content_sha256"]) == 64

    response = await client.get("/v1/adapters", headers=bearer(tenants.bob))
    names = {entry["name"] for entry in (await response.json())["data"]}
    assert "secret" in names and not names & {"news", "spam"}


async def test_adapter_by_name(client, tenants) -> None:
    response = await client.get("/v1/adapters/news", headers=bearer(tenants.acme))
    assert response.status == 200
    body = await response.json()
    assert body["model"] == "acme/news" and body["labels"] == ["business", "sport", "tech"]

    own_missing = await client.get("/v1/adapters/nosuch", headers=bearer(tenants.acme))
    other_tenants = await client.get("/v1/adapters/secret", headers=bearer(tenants.acme))
    assert own_missing.status == other_tenants.status == 404
    missing_body, other_body = await own_missing.json(), await other_tenants.json()
    assert missing_body["error"]["type"] == other_body["error"]["type"] == "not_found"
    assert missing_body["error"]["message"].replace("nosuch", "M") == (
        other_body["error"]["message"].replace("secret", "M")
    )


async def test_adapter_by_reference_as_classify_takes_it(client, tenants) -> None:
    """A pinned version shows that version's own details (how an unpromoted version is
    checked before `promote`); the tenant prefix may be the caller's own only."""
    acme = bearer(tenants.acme)
    pinned = await (await client.get("/v1/adapters/spam@1", headers=acme)).json()
    assert (pinned["version"], pinned["versions"], pinned["latest"]) == (1, [1, 2], False)
    assert pinned["metrics"] == {"accuracy": 0.91} and pinned["rank"] == 4
    for ref in ("spam", "acme/spam", "acme/spam@2", "spam@2"):
        shown = await (await client.get(f"/v1/adapters/{ref}", headers=acme)).json()
        assert (shown["version"], shown["latest"], shown["rank"]) == (2, True, 8), ref
    for ref in ("spam@3", "bob/secret", "bob/spam", "spam@0", "a%2Fb%2Fc"):
        response = await client.get(f"/v1/adapters/{ref}", headers=acme)
        assert response.status == 404 and (await response.json())["error"]["type"] == "not_found"


async def test_adapters_need_a_key(client) -> None:
    for path in ("/v1/adapters", "/v1/adapters/spam"):
        response = await client.get(path)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_health_and_ready(client, engine: Engine) -> None:
    health = await client.get("/health")
    assert health.status == 200 and await health.json() == {"status": "ok"}
    ready = await client.get("/ready")
    assert ready.status == 200
    assert await ready.json() == {
        "status": "ready",
        "backbone": engine.backbone.name,
        "backbone_sha256": engine.backbone.sha256,
        "dtype": "float32",
        "quantize": "none",
    }


async def test_plain_answers_carry_server_timing(client, tenants) -> None:
    response = await client.post(
        "/v1/classify",
        json={"model": "spam", "input": ["a", "b"]},
        headers={"Authorization": f"Bearer {tenants.acme}"},
    )
    assert response.status == 200
    timing = response.headers["Server-Timing"]
    assert "queue;dur=" in timing and "compute;dur=" in timing
