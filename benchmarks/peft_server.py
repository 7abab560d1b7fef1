"""The common alternative to graft, as a baseline: Hugging Face PEFT behind a minimal aiohttp app.

    python -m benchmarks.peft_server --registry DIR [--tenant T ...] [--port 8081]

One ``PeftModel`` over the same backbone (``AutoModelForSequenceClassification``) holds every
adapter of the registry (``load_adapter``, ``task_type=SEQ_CLS``); a batcher collects requests
for up to ``--max-wait-ms`` and runs each mixed batch in one forward with
``adapter_names=[...]``. It speaks the subset of graft's ``POST /v1/classify`` the load test
uses: ``model`` must be ``tenant/name``, any bearer key is accepted, no streaming, no
admission control or deadlines (an overloaded PEFT server just queues). ``GET /v1/adapters``
lists every model, so ``benchmarks.load --url ... --key anything`` can drive it.
"""

import argparse
import asyncio
import logging
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from aiohttp import web

from benchmarks.batcher import MicroBatcher, pad

log = logging.getLogger(__name__)

BATCHER = web.AppKey("batcher", MicroBatcher)
TOKENIZER = web.AppKey("tokenizer", object)
ADAPTERS = web.AppKey("adapters", dict)  # "tenant/name" -> PEFT adapter name
LABELS = web.AppKey("labels", tuple)
MAX_TOKENS = 512


def peft_adapter_name(tenant: str, name: str) -> str:
    """PEFT keys adapters by module-dict names: no dots, no slashes."""
    return f"{tenant}__{name}".replace(".", "_").replace("-", "_")


def build_peft_model(
    backbone_dir: Path,
    adapter_dirs: Mapping[str, Path],
    num_labels: int,
    device: str = "cpu",
    dtype: str = "float32",
):
    """A ``PeftModel`` holding every adapter of ``adapter_dirs`` (PEFT name -> directory)."""
    import peft
    import torch
    from transformers import AutoModelForSequenceClassification

    if not adapter_dirs:
        raise ValueError("the PEFT server needs at least one adapter")
    base = AutoModelForSequenceClassification.from_pretrained(
        str(backbone_dir), num_labels=num_labels, local_files_only=True, dtype=getattr(torch, dtype)
    )
    names = list(adapter_dirs)
    with warnings.catch_warnings():
        # graft's adapters leave the pooler's dense out; PEFT's "dense" target wraps it too
        # and warns that its (zero-initialised, so inert) LoRA keys are missing
        warnings.filterwarnings("ignore", message="Found missing adapter keys")
        model = peft.PeftModel.from_pretrained(
            base, str(adapter_dirs[names[0]]), adapter_name=names[0]
        )
        for name in names[1:]:
            model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
    return model.to(device).eval()


def forward_fn(model, pad_id: int) -> Callable[[list[Sequence[int]], list[str | None]], np.ndarray]:
    """The batcher's forward: one mixed batch, ``adapter_names`` per row, softmaxed."""
    import torch

    device = next(model.parameters()).device

    def forward(token_ids: list[Sequence[int]], adapters: list[str | None]) -> np.ndarray:
        input_ids, mask = pad(token_ids, pad_id)
        input_ids, mask = input_ids.to(device), mask.to(device)
        with torch.inference_mode():
            logits = model(input_ids=input_ids, attention_mask=mask, adapter_names=adapters).logits
        return torch.softmax(logits.float(), dim=-1).cpu().numpy()

    return forward


def create_app(
    batcher: MicroBatcher, tokenizer: Any, adapters: dict[str, str], labels: Sequence[str]
) -> web.Application:
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app[BATCHER], app[TOKENIZER], app[ADAPTERS], app[LABELS] = (
        batcher,
        tokenizer,
        adapters,
        tuple(labels),
    )
    app.router.add_post("/v1/classify", classify)
    app.router.add_get("/health", health)
    app.router.add_get("/stats", stats)
    app.router.add_get("/v1/adapters", list_adapters)
    return app


async def list_adapters(request: web.Request) -> web.Response:
    """Every model, whatever the key: ``name`` is the full ``tenant/name`` to send."""
    names = sorted(request.app[ADAPTERS])
    return _json({"data": [{"model": full, "name": full} for full in names]})


async def stats(request: web.Request) -> web.Response:
    """The batcher's counters, for the load test's footer (as graft's step clock gives)."""
    return _json(request.app[BATCHER].counters())


async def health(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def classify(request: web.Request) -> web.Response:
    app = request.app
    try:
        body = msgspec.json.decode(await request.read())
        model, texts = body["model"], body["input"]
    except (msgspec.DecodeError, KeyError, TypeError):
        return _json(_error("invalid_request", "expected JSON with model and input"), 422)
    texts = [texts] if isinstance(texts, str) else texts
    adapter = app[ADAPTERS].get(model)
    if adapter is None:
        return _json(_error("not_found", f"model {model!r} not found"), 404)
    if not texts or not all(isinstance(t, str) and t for t in texts):
        return _json(_error("invalid_request", "input must be non-empty text"), 422)
    tokenizer = app[TOKENIZER]  # off the event loop, as graft tokenizes

    def tokenize() -> list[list[int]]:
        return tokenizer(texts, truncation=True, max_length=MAX_TOKENS)["input_ids"]

    ids = await asyncio.get_running_loop().run_in_executor(None, tokenize)
    probs = await app[BATCHER].run(ids, adapter)
    labels = app[LABELS]
    data = [
        {
            "index": i,
            "label": labels[int(row.argmax())],
            "scores": dict(zip(labels, row.tolist(), strict=True)),
            "tokens": len(ids[i]),
        }
        for i, row in enumerate(probs)
    ]
    tokens = sum(len(x) for x in ids)
    return _json({"model": model, "data": data, "usage": {"inputs": len(ids), "tokens": tokens}})


def _error(error_type: str, message: str) -> dict:
    return {"error": {"type": error_type, "message": message}}


def _json(payload: dict, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(payload), status=status, content_type="application/json"
    )


async def run_peft_server(
    models: Sequence[tuple[str, str]],
    adapter_dirs: Sequence[Path],
    host: str,
    port: int,
    *,
    on_listening: Callable[[str], Awaitable[None]] | None = None,
    max_wait_s: float = 0.002,
    labels: Sequence[str] = ("ham", "spam"),
    device: str = "cpu",
    dtype: str = "float32",
    backbone_dir: str | Path | None = None,
    num_threads: int | None = None,
) -> None:
    """Load the adapters ((tenant, name) with their directories) onto ``backbone_dir`` (None:
    the packaged backbone), serve until cancelled; ``num_threads``: its model thread's torch
    threads (None: the process's)."""
    from transformers import AutoTokenizer

    from engine import packaged_backbone_dir

    backbone_dir = Path(backbone_dir or packaged_backbone_dir())
    names = {f"{t}/{n}": peft_adapter_name(t, n) for t, n in models}
    dirs = {peft_adapter_name(t, n): d for (t, n), d in zip(models, adapter_dirs, strict=True)}
    loop = asyncio.get_running_loop()
    model = await loop.run_in_executor(
        None, build_peft_model, backbone_dir, dirs, len(labels), device, dtype
    )
    tokenizer = AutoTokenizer.from_pretrained(str(backbone_dir), local_files_only=True)
    pad_id = tokenizer.pad_token_id or 0
    batching = MicroBatcher(
        forward_fn(model, pad_id), max_wait_s=max_wait_s, num_threads=num_threads
    )
    async with batching as batcher:
        runner = web.AppRunner(create_app(batcher, tokenizer, names, labels))
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            bound_host, bound_port = runner.addresses[0][:2]
            log.info("PEFT baseline serving %d adapters on %s:%s", len(names), host, bound_port)
            if on_listening is not None:
                await on_listening(f"http://{bound_host}:{bound_port}")
            await asyncio.Event().wait()  # until cancelled
        finally:
            await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    from registry import Registry

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", required=True, type=Path)
    parser.add_argument("--tenant", action="append", help="only these tenants (repeatable)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the head is new by design: no "MISSING" report
    with Registry(args.registry) as registry:
        latest = {  # the newest version of each model, as graft serves an unpinned name
            r.full_name: r
            for t in (args.tenant or registry.tenants())
            for r in sorted(registry.list_adapters(t), key=lambda r: r.version)
        }
    records = list(latest.values())
    labels = records[0].labels if records else ("ham", "spam")
    mismatched = [r.full_name for r in records if r.labels != labels]
    if mismatched:  # one classifier head shape per PeftModel
        raise SystemExit(f"adapters with other labels than {labels}: {mismatched[:5]}")

    async def announce(url: str) -> None:
        print(f"PEFT baseline serving {len(records)} adapters on {url}", flush=True)

    asyncio.run(
        run_peft_server(
            [(r.tenant, r.name) for r in records],
            [r.path for r in records],
            args.host,
            args.port,
            on_listening=announce,
            max_wait_s=args.max_wait_ms / 1000,
            labels=labels,
        )
    )


if __name__ == "__main__":
    main()
