"""``make demo``: two real classifiers trained on packaged data, served, and asked once each."""

import argparse
import asyncio
import json
import sys
import time

from engine import EngineConfig

DEMO_TENANT = "demo"
# (model name, dataset loader name, example text, training max_length)
DEMO_MODELS = (
    ("spam", "sms", "WINNER!! You have won a 1000 pound prize. Call 09061701461 to claim now", 64),
    (
        "news",
        "news",
        "The central bank raised interest rates again as inflation hit a "
        "ten-year high, sending shares in lenders higher.",
        128,
    ),
)
DEMO_SAMPLE_ROWS = 1000
DEMO_EPOCHS = 3


def run_demo(args: argparse.Namespace, config: EngineConfig) -> int:
    """Train what is missing, then serve until Ctrl-C, answering one request per model."""
    from registry import Registry

    with Registry(config.registry_dir) as registry:
        if not registry.has_tenant(DEMO_TENANT):
            registry.create_tenant(DEMO_TENANT)
        missing = [m for m in DEMO_MODELS if not _has_model(registry, m[0])]
        if missing:
            _train_missing(registry, config, missing)
        registry.revoke_keys(DEMO_TENANT)  # one live demo key at a time: the one printed below
        api_key = registry.issue_key(DEMO_TENANT)
    from server.app import metrics_key_from_env, run_server
    from server.cli_args import training_config

    bound: list[str] = []  # the URL the socket got (its real port when --port is 0)

    async def on_listening(url: str) -> None:
        bound.append(url)

    async def on_ready(engine) -> None:
        await _ask_examples(bound[0], api_key)
        print(_curl_line(bound[0], api_key), flush=True)
        print("serving until Ctrl-C", flush=True)

    _run(
        run_server(
            config,
            args.host,
            args.port,
            on_listening=on_listening,
            on_ready=on_ready,
            training=training_config(args),
            metrics=args.metrics,
            metrics_key=metrics_key_from_env(),
            workers=args.workers,
        )
    )
    return 0


def _has_model(registry, name: str) -> bool:
    return any(r.name == name for r in registry.list_adapters(DEMO_TENANT))


def _train_missing(registry, config: EngineConfig, missing) -> None:
    from engine import load_backbone
    from training import DATASETS, TrainConfig, train_adapter

    backbone = load_backbone(config.backbone_dir)
    for name, dataset, _, max_length in missing:
        print(f"training demo model {DEMO_TENANT}/{name} on packaged data ({dataset})", flush=True)
        examples = DATASETS[dataset]()
        train_config = TrainConfig(
            epochs=DEMO_EPOCHS, max_length=max_length, max_examples=DEMO_SAMPLE_ROWS
        )
        result = train_adapter(
            backbone, registry, DEMO_TENANT, name, examples, train_config, source=dataset
        )
        m = result.metrics
        print(
            f"  {result.record.full_name}@{result.record.version}: accuracy {m['accuracy']:.3f}, "
            f"macro-F1 {m['macro_f1']:.3f}, {result.train_seconds:.0f} s, "
            f"{result.adapter_bytes} bytes",
            flush=True,
        )


async def _ask_examples(base_url: str, api_key: str) -> None:
    import aiohttp

    url = f"{base_url}/v1/classify"
    headers = {"Authorization": f"Bearer {api_key}"}
    async with aiohttp.ClientSession() as session:
        for name, _, text, _ in DEMO_MODELS:
            started = time.perf_counter()
            async with session.post(url, json={"model": name, "input": text}, headers=headers) as r:
                body = await r.json()
            elapsed_ms = (time.perf_counter() - started) * 1000
            print(f"\nPOST /v1/classify model={name!r} -> {r.status} in {elapsed_ms:.0f} ms")
            print(f"  input: {text}")
            print(f"  {json.dumps(body)}", flush=True)


def _curl_line(base_url: str, api_key: str) -> str:
    body = json.dumps(
        {
            "model": "spam",
            "input": ["Free entry to win a car! Text WIN now", "See you at lunch tomorrow?"],
        }
    )
    return (
        f"\ntry it:\n  curl -s {base_url}/v1/classify "
        f"-H 'Authorization: Bearer {api_key}' -H 'Content-Type: application/json' "
        f"-d '{body}'\n"
    )


def _run(coro) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    if sys.platform != "win32":
        uvloop.run(coro)
