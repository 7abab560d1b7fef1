"""What ``graft adapters list`` and ``GET /v1/adapters`` show about a tenant's models."""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from registry import AdapterRecord


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    tenant: str
    name: str
    version: int  # the latest version: the one an unpinned request resolves to
    versions: tuple[int, ...]  # every version, ascending
    rank: int  # of the latest version
    labels: tuple[str, ...]
    size_bytes: int
    base_sha256: str
    content_sha256: str
    metrics: Mapping[str, Any]
    pooling: str
    created_at: float  # unix seconds, latest version
    residency: str  # "device" or "disk" (latest version)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": f"{self.tenant}/{self.name}",
            "version": self.version,
            "versions": list(self.versions),
            "rank": self.rank,
            "labels": list(self.labels),
            "size_bytes": self.size_bytes,
            "base_sha256": self.base_sha256,
            "content_sha256": self.content_sha256,
            "metrics": dict(self.metrics),
            "pooling": self.pooling,
            "created_at": self.created_at,
            "residency": self.residency,
        }


def summarize(records: list[AdapterRecord], residency: Callable[[str], str]) -> list[AdapterInfo]:
    """Collapse version records into one entry per model name, sorted by name."""
    by_name: dict[str, list[AdapterRecord]] = {}
    for record in records:
        by_name.setdefault(record.name, []).append(record)
    infos = []
    for name in sorted(by_name):
        versions = sorted(by_name[name], key=lambda r: r.version)
        # the promoted version (what an unpinned request gets); a name whose only versions
        # were registered without promotion shows its newest
        latest = next((r for r in versions if r.is_latest), versions[-1])
        infos.append(
            AdapterInfo(
                tenant=latest.tenant,
                name=name,
                version=latest.version,
                versions=tuple(r.version for r in versions),
                rank=latest.rank,
                labels=tuple(latest.labels),
                size_bytes=latest.size_bytes,
                base_sha256=latest.base_sha256,
                content_sha256=latest.content_sha256,
                metrics=latest.metrics,
                pooling=str(latest.manifest.get("pooling", "cls_pooler")),
                created_at=latest.created_at,
                residency=residency(f"{latest.full_name}@{latest.version}"),
            )
        )
    return infos
