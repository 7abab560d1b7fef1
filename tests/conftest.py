"""Shared fixtures: the packaged backbone (loaded once), synthetic adapters, a registry."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# Triton kernels run under the interpreter on CPU-only machines; it must be set before triton
# is imported anywhere.
if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from engine import Backbone, load_backbone  # noqa: E402
from engine.peft_io import write_peft_adapter  # noqa: E402
from registry import AdapterRecord, Registry  # noqa: E402


@pytest.fixture(scope="session")
def backbone() -> Backbone:
    return load_backbone()


def random_adapter(
    backbone: Backbone,
    out_dir: Path,
    *,
    seed: int,
    rank: int,
    num_labels: int,
    targets: Sequence[str] = ("query", "value"),
    alpha: float = 16.0,
    std: float = 0.05,
) -> None:
    """A PEFT-format adapter with random (non-zero) LoRA factors and head."""
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for name in backbone.linear_names:
        if rank and any(name.endswith("." + t) or name == t for t in targets):
            wrapper = backbone.linears[name]
            a = torch.randn(rank, wrapper.in_features, generator=gen) * std
            b = torch.randn(wrapper.out_features, rank, generator=gen) * std
            modules[name] = (a, b)
    head_w = torch.randn(num_labels, backbone.hidden_size, generator=gen)
    head_b = torch.randn(num_labels, generator=gen)
    write_peft_adapter(
        out_dir,
        backbone,
        modules,
        rank=max(rank, 1),
        alpha=alpha,
        head_weight=head_w,
        head_bias=head_b,
    )


@pytest.fixture
def publish_random(backbone: Backbone, tmp_path: Path) -> Callable[..., AdapterRecord]:
    """Publish a random adapter into a registry: publish_random(registry, tenant, name, ...)."""
    counter = iter(range(10_000))

    def publish(
        registry: Registry,
        tenant: str,
        name: str,
        *,
        seed: int = 0,
        rank: int = 8,
        labels: Sequence[str] = ("neg", "pos"),
        pooling: str = "mean",
        targets: Sequence[str] = ("query", "value"),
        alpha: float = 16.0,
    ) -> AdapterRecord:
        out = tmp_path / f"adapter-{next(counter)}"
        random_adapter(
            backbone,
            out,
            seed=seed,
            rank=rank,
            num_labels=len(labels),
            targets=targets,
            alpha=alpha,
        )
        manifest = {
            "labels": list(labels),
            "base_sha256": backbone.sha256,
            "rank": rank,
            "pooling": pooling,
            "metrics": {},
        }
        return registry.publish(tenant, name, out, manifest)

    return publish


@pytest.fixture
def registry(tmp_path: Path):
    """An empty registry with one tenant, acme; test modules that need more override it."""
    reg = Registry(tmp_path / "reg")
    reg.create_tenant("acme")
    yield reg
    reg.close()


@pytest.fixture(scope="session")
def write_random_adapter() -> Callable[..., None]:
    """``random_adapter`` as a fixture: tests cannot import conftest under importlib mode."""
    return random_adapter
