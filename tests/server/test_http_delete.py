"""DELETE /v1/adapters/{name}[@version]: the caller's own models only, 404 from then on."""

import asyncio

import pytest

from engine import Engine, ModelNotFound
from tests.server.conftest import SPAM_LABELS

pytestmark = pytest.mark.asyncio(loop_scope="module")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def classify(client, key: str, model: str):
    return await client.post(
        "/v1/classify", json={"model": model, "input": "win cash"}, headers=bearer(key)
    )


async def test_delete_a_version_then_the_whole_name(client, tenants, engine: Engine) -> None:
    acme = bearer(tenants.acme)
    assert (await classify(client, tenants.acme, "spam@1")).status == 200  # resident now
    residency = engine._loaded.store.residency
    assert residency("acme/spam@1") == "device"
    response = await client.delete("/v1/adapters/spam@2", headers=acme)
    error = (await response.json())["error"]
    assert response.status == 409 and error["type"] == "conflict", error
    assert "version 2 is what acme/spam serves" in error["message"]
    response = await client.delete("/v1/adapters/spam@1", headers=acme)
    assert response.status == 200
    assert await response.json() == {"model": "acme/spam", "deleted": [1]}
    for _ in range(200):  # its weights leave the server's memory, the device's on the model thread
        if residency("acme/spam@1") == "disk":
            break
        await asyncio.sleep(0.01)
    assert residency("acme/spam@1") == "disk"
    response = await classify(client, tenants.acme, "spam@1")
    error = (await response.json())["error"]
    assert response.status == 404 and "version 1 was deleted" in error["message"], error
    response = await client.get("/v1/adapters/spam@1", headers=acme)
    error = (await response.json())["error"]  # why, as classify says it
    assert response.status == 404 and "version 1 was deleted" in error["message"], error
    assert (await classify(client, tenants.acme, "spam")).status == 200  # v2 still serves
    response = await client.delete("/v1/adapters/acme/spam", headers=acme)
    assert await response.json() == {"model": "acme/spam", "deleted": [2]}
    response = await classify(client, tenants.acme, "spam")
    error = (await response.json())["error"]
    assert response.status == 404 and "acme/spam was deleted" in error["message"], error
    listed = await (await client.get("/v1/adapters", headers=acme)).json()
    assert "spam" not in [model["name"] for model in listed["data"]]


async def test_other_tenants_models_and_bad_requests_delete_nothing(client, tenants) -> None:
    bob, acme = bearer(tenants.bob), bearer(tenants.acme)
    for path, headers, body, status, field in [
        ("/v1/adapters/news", bob, None, 404, None),  # acme's: as absent as a missing one
        ("/v1/adapters/acme/news", bob, None, 404, None),
        ("/v1/adapters/bob/secret", acme, None, 404, None),
        ("/v1/adapters/news@x", acme, None, 404, None),
        ("/v1/adapters/news", acme, {"version": 1}, 422, "version"),
        ("/v1/adapters/news", {}, None, 401, None),
    ]:
        response = await client.delete(path, headers=headers, json=body)
        error = (await response.json())["error"]
        assert response.status == status and error.get("field") == field, (path, error)
    assert (await classify(client, tenants.acme, "news")).status == 200
    assert (await classify(client, tenants.bob, "secret")).status == 200


async def test_a_version_deleted_while_its_load_reads_is_a_404(engine: Engine, publish) -> None:
    """A request resolved just before the delete: its load finds the files gone."""
    version = publish("bob", "brief", SPAM_LABELS, seed=7)
    record = engine.registry.resolve("bob", "brief", version)
    engine.registry.delete("bob", "brief")
    with pytest.raises(ModelNotFound, match="bob/brief version 1 was deleted"):
        engine._loaded.store.read(record)
