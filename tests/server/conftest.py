"""Server fixtures: one real engine per test module, a temp registry, tenants with models.

Every fixture here lives on the module's event loop, so each test module sets
``pytestmark = pytest.mark.asyncio(loop_scope="module")``.
"""

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import torch
from aiohttp.test_utils import TestClient, TestServer

from engine import Engine, EngineConfig
from engine.peft_io import write_peft_adapter
from server.app import create_app

MAX_INPUT_TOKENS = 32  # small, so truncation tests stay cheap on the CPU
MAX_BODY_BYTES = 64 * 1024
SPAM_LABELS = ("ham", "spam")
SPAM_V2_LABELS = ("ham", "spam", "phish")
NEWS_LABELS = ("business", "sport", "tech")

Publish = Callable[..., int]


@dataclass(frozen=True, slots=True)
class Tenants:
    acme: str  # API key; acme owns spam (v1, v2) and news
    bob: str  # API key; bob owns secret


def engine_config(registry_dir: Path) -> EngineConfig:
    # two rows per step: a request of many inputs takes many steps, so streams and
    # cancellation are observable between rows
    return EngineConfig(
        registry_dir=registry_dir, max_batch_rows=2, max_input_tokens=MAX_INPUT_TOKENS
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Engine]:
    async with Engine(engine_config(tmp_path_factory.mktemp("registry"))) as started:
        yield started


@pytest.fixture(scope="module")
def publish(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Publish:
    """publish(tenant, name, labels, seed=0, rank=4) -> the new version's number."""
    staging = tmp_path_factory.mktemp("adapters")

    def publish_adapter(
        tenant: str,
        name: str,
        labels: Sequence[str],
        *,
        seed: int = 0,
        rank: int = 4,
        metrics: dict[str, float] | None = None,
    ) -> int:
        backbone = engine.backbone
        gen = torch.Generator().manual_seed(seed)
        modules = {}
        for module in backbone.linear_names:
            if module.endswith((".query", ".value")):
                linear = backbone.linears[module]
                modules[module] = (
                    torch.randn(rank, linear.in_features, generator=gen) * 0.05,
                    torch.randn(linear.out_features, rank, generator=gen) * 0.05,
                )
        out = staging / f"{tenant}-{name}-{seed}-{len(list(staging.iterdir()))}"
        write_peft_adapter(
            out,
            backbone,
            modules,
            rank=rank,
            alpha=2.0 * rank,
            head_weight=torch.randn(len(labels), backbone.hidden_size, generator=gen),
            head_bias=torch.zeros(len(labels)),
        )
        manifest = {
            "labels": list(labels),
            "base_sha256": backbone.sha256,
            "rank": rank,
            "pooling": "mean",
            "metrics": metrics or {},
        }
        return engine.registry.publish(tenant, name, out, manifest).version

    return publish_adapter


@pytest.fixture(scope="module")
def tenants(engine: Engine, publish: Publish) -> Tenants:
    keys = Tenants(
        acme=engine.registry.create_tenant("acme"), bob=engine.registry.create_tenant("bob")
    )
    publish("acme", "spam", SPAM_LABELS, seed=1, metrics={"accuracy": 0.91})
    publish("acme", "spam", SPAM_V2_LABELS, seed=2, rank=8, metrics={"accuracy": 0.95})
    publish("acme", "news", NEWS_LABELS, seed=3)
    publish("bob", "secret", SPAM_LABELS, seed=4)
    return keys


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(engine: Engine, tenants: Tenants) -> AsyncIterator[TestClient]:
    app = create_app(engine, max_body_bytes=MAX_BODY_BYTES)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def expect_continue(
    address: tuple[str, int],
    path: str,
    key: str,
    length: int,
    body: bytes = b"",
    content_type: str = "application/json",
) -> bytes:
    """Send only the headers of a request that asks ``Expect: 100-continue``; the server's
    first answer line decides whether the body follows."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n"
            "Expect: 100-continue\r\n\r\n"
        )
        writer.write(head.encode())
        await writer.drain()
        first = await asyncio.wait_for(reader.readline(), 10)
        if b" 100 " not in first or not body:
            return first + await asyncio.wait_for(reader.read(4096), 10)
        writer.write(body)
        await writer.drain()
        return first + await asyncio.wait_for(reader.readuntil(b"}}"), 10)  # its JSON
    finally:
        writer.close()


async def until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Until ``condition()`` holds; fails the test past ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)
