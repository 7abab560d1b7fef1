"""What ``graft adapters list`` and ``GET /v1/adapters`` show about a tenant's models."""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from registry import AdapterRecord


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    tenant: str
    name: str
    version: int  # the version shown: the latest (what unpinned requests get) or a pinned one
    versions: tuple[int, ...]  # every version, ascending
    rank: int  # of the version shown, as are the fields below
    labels: tuple[str, ...]
    size_bytes: int
    base_sha256: str
    content_sha256: str
    metrics: Mapping[str, Any]
    pooling: str
    created_at: float  # unix seconds
    residency: str  # "device", "host" (parsed, in the host cache) or "disk"
    is_latest: bool = True  # the version shown is what an unpinned request resolves to

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
            "latest": self.is_latest,
        }


def summarize(
    records: list[AdapterRecord], residency: Callable[[str], str], *, version: int | None = None
) -> list[AdapterInfo]:
    """Collapse version records into one entry per model name, sorted by name: the latest
    version's details, or ``version``'s (names without that version are left out)."""
    by_name: dict[str, list[AdapterRecord]] = {}
    for record in records:
        by_name.setdefault(record.name, []).append(record)
    infos = []
    for name in sorted(by_name):
        versions = sorted(by_name[name], key=lambda r: r.version)
        # the promoted version (what an unpinned request gets); a name whose only versions
        # were registered without promotion shows its newest
        latest = next((r for r in versions if r.is_latest), versions[-1])
        shown = (
            latest if version is None else next((r for r in versions if r.version == version), None)
        )
        if shown is None:
            continue
        infos.append(
            AdapterInfo(
                tenant=shown.tenant,
                name=name,
                version=shown.version,
                versions=tuple(r.version for r in versions),
                rank=shown.rank,
                labels=tuple(shown.labels),
                size_bytes=shown.size_bytes,
                base_sha256=shown.base_sha256,
                content_sha256=shown.content_sha256,
                metrics=shown.metrics,
                pooling=str(shown.manifest.get("pooling", "cls_pooler")),
                created_at=shown.created_at,
                residency=residency(f"{shown.full_name}@{shown.version}"),
                is_latest=shown.is_latest,  # False where no version is promoted yet
            )
        )
    return infos
