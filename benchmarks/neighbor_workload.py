"""The noisy-neighbour benchmark's workload: two tenants, their adapters and their texts.

Split out of ``benchmarks.noisy_neighbor`` so that the driver reads as phases, not setup: this
is what every phase and both transports share, built once per run (a registry holding tenant
A's and tenant B's random adapters, B's short SMS texts and A's long BBC bodies) and handed to
each fresh engine.
"""

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import Backbone, load_backbone, write_peft_adapter
from registry import Registry

MODELS = {"a": "news", "b": "sms"}  # tenant -> its one model


@dataclass(frozen=True, slots=True)
class Workload:
    registry_dir: Path  # registry with tenants "a" and "b", one adapter each
    api_keys: dict[str, str]  # tenant -> API key, for HTTP mode
    b_texts: tuple[str, ...]  # SMS texts, one per B request
    a_bodies: tuple[tuple[str, ...], ...]  # A's requests: --a-inputs long texts each
    a_row_tokens: int  # tokens of every A row after truncation (the backbone's limit)


def build_workload(work: Path, args: argparse.Namespace) -> Workload:
    from training import load_bbc_news, load_sms_spam

    backbone = load_backbone()
    registry = Registry(work / "registry", durable=False)
    api_keys = {tenant: registry.create_tenant(tenant) for tenant in MODELS}
    for seed, (tenant, model) in enumerate(MODELS.items()):
        source = work / model
        _write_random_adapter(backbone, source, seed)
        manifest = {"labels": ["x", "y"], "base_sha256": backbone.sha256, "rank": 8}
        registry.publish(tenant, model, source, {**manifest, "pooling": "mean", "metrics": {}})
    registry.close()
    rng = random.Random(0)
    sms = [e.text for e in load_sms_spam() if e.text.strip()]
    limit = backbone.max_tokens
    candidates = [e.text for e in load_bbc_news(max_chars=5000) if len(e.text) >= 2000]
    lengths = backbone.tokenizer(candidates)["input_ids"]
    long_texts = [t for t, ids in zip(candidates, lengths, strict=True) if len(ids) >= limit]
    return Workload(
        registry_dir=work / "registry",
        api_keys=api_keys,
        b_texts=tuple(rng.sample(sms, min(len(sms), args.num_b_texts))),
        a_bodies=tuple(tuple(rng.sample(long_texts, args.a_inputs)) for _ in range(4)),
        a_row_tokens=limit,
    )


def _write_random_adapter(backbone: Backbone, out_dir: Path, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    modules = {
        name: (
            torch.randn(8, backbone.linears[name].in_features, generator=gen) * 0.02,
            torch.randn(backbone.linears[name].out_features, 8, generator=gen) * 0.02,
        )
        for name in backbone.linear_names
        if not name.startswith("pooler")
    }
    head = torch.randn(2, backbone.hidden_size, generator=gen)
    write_peft_adapter(
        out_dir, backbone, modules, rank=8, alpha=16, head_weight=head, head_bias=torch.zeros(2)
    )
