"""A scratch registry full of random adapters, for load tests that need many tenants' models.

Adapter ``i`` is ``a{i}`` of tenant ``t{i % num_tenants}``: rank 8, LoRA on every encoder
linear outside the pooler (what ``graft train`` makes), a random two-label head. Popularity
ranks follow the adapter index, so the hottest adapters belong to different tenants.
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

RANK = 8
LABELS = ("ham", "spam")
_PUBLISH_CHUNK = 250  # adapters staged on disk before one bulk publish


@dataclass(frozen=True, slots=True)
class Fleet:
    """What a load run needs to address the adapters of a registry."""

    registry_dir: Path  # the registry root
    models: tuple[tuple[str, str], ...]  # (tenant, model name) per adapter index
    keys: dict[str, str]  # tenant -> API key
    adapter_dirs: tuple[Path, ...]  # PEFT-format version directory per adapter index

    def subset(self, num_adapters: int) -> "Fleet":
        """The first ``num_adapters`` adapters (the most popular ones) and their tenants."""
        if not 1 <= num_adapters <= len(self.models):
            raise ValueError(f"the fleet has {len(self.models)} adapters, asked for {num_adapters}")
        models = self.models[:num_adapters]
        tenants = {tenant for tenant, _ in models}
        return Fleet(
            self.registry_dir,
            models,
            {t: k for t, k in self.keys.items() if t in tenants},
            self.adapter_dirs[:num_adapters],
        )


def build_fleet(
    root: Path,
    num_adapters: int,
    num_tenants: int,
    *,
    seed: int = 0,
    backbone_dir: str | Path | None = None,
) -> Fleet:
    """Create a registry under ``root`` with ``num_adapters`` adapters over ``num_tenants``, for
    ``backbone_dir`` (None: the packaged backbone)."""
    from engine import load_backbone

    if num_adapters < 1 or num_tenants < 1:
        raise ValueError(f"need >= 1 adapter and tenant, got {num_adapters}, {num_tenants}")
    num_tenants = min(num_tenants, num_adapters)
    backbone = load_backbone(backbone_dir)
    registry = _open_scratch_registry(root / "registry")
    try:
        keys = {f"t{j}": registry.create_tenant(f"t{j}") for j in range(num_tenants)}
        models = tuple((f"t{i % num_tenants}", f"a{i}") for i in range(num_adapters))
        gen = torch.Generator().manual_seed(seed)
        staging = root / "staging"
        for lo in range(0, num_adapters, _PUBLISH_CHUNK):
            chunk = models[lo : lo + _PUBLISH_CHUNK]
            sources = [_write_random(backbone, staging / name, gen) for _, name in chunk]
            _publish(registry, chunk, sources, _manifest(backbone.sha256))
            shutil.rmtree(staging, ignore_errors=True)
        dirs = tuple(registry.resolve(tenant, name).path for tenant, name in models)
    finally:
        registry.close()
    return Fleet(root / "registry", models, keys, dirs)


def _open_scratch_registry(path: Path):
    from registry import Registry

    try:  # no fsyncs: a scratch registry need not survive a power cut
        return Registry(path, durable=False)
    except TypeError:  # a registry without the durable switch
        return Registry(path)


def _manifest(base_sha256: str) -> dict:
    return {
        "labels": list(LABELS),
        "base_sha256": base_sha256,
        "rank": RANK,
        "pooling": "mean",
        "metrics": {},
    }


def _write_random(backbone, out_dir: Path, gen: torch.Generator) -> Path:
    from engine import write_peft_adapter

    # what graft's own training targets by default: every linear outside the pooler
    names = [n for n in backbone.linear_names if not n.startswith("pooler")]
    modules = {
        n: (
            torch.randn(RANK, backbone.linears[n].in_features, generator=gen) * 0.02,
            torch.randn(backbone.linears[n].out_features, RANK, generator=gen) * 0.02,
        )
        for n in names
    }
    write_peft_adapter(
        out_dir,
        backbone,
        modules,
        rank=RANK,
        alpha=2 * RANK,
        head_weight=torch.randn(len(LABELS), backbone.hidden_size, generator=gen) * 0.1,
        head_bias=torch.zeros(len(LABELS)),
    )
    return out_dir


def _publish(registry, models, sources: list[Path], manifest: dict) -> None:
    """One bulk publish where the registry has it, else one publish per adapter."""
    try:
        from registry import PublishItem
    except ImportError:
        for (tenant, name), src in zip(models, sources, strict=True):
            registry.publish(tenant, name, src, manifest)
        return
    items = [
        PublishItem(tenant, name, src, manifest)
        for (tenant, name), src in zip(models, sources, strict=True)
    ]
    registry.publish_many(items)
