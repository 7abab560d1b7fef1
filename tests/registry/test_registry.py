"""Registry behaviour: tenants and keys, publish/resolve/read round trips, versions, concurrency."""

import hashlib
import json
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load as load_safetensors

from registry import AdapterRecord, AlreadyExists, InvalidName, NotFound, Registry, RegistryError

REPO_ROOT = Path(__file__).resolve().parents[2]
OTHER_BASE_SHA256 = "cd" * 32


# the root's mode


def test_a_root_graft_creates_is_its_owners_alone(tmp_path: Path) -> None:
    """Stored versions hold tenants' held-out texts; under umask 022 they were readable by
    every local user."""
    with Registry(tmp_path / "made" / "registry") as created:
        assert created.root.stat().st_mode & 0o777 == 0o700


def test_a_root_open_to_every_user_is_kept_but_warned_of(tmp_path: Path, caplog) -> None:
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(0o755)
    with Registry(root):
        pass
    assert root.stat().st_mode & 0o777 == 0o755  # the operator's choice stands
    assert "open to every local user (mode 0755)" in caplog.text
    assert f"chmod o-rwx {root}" in caplog.text


# tenants and keys


def test_created_tenant_key_authenticates(registry: Registry) -> None:
    key = registry.create_tenant("globex")
    assert key.startswith("gk_") and len(key) > 40
    assert registry.authenticate(key) == "globex"
    assert registry.tenants() == ["acme", "globex"]
    assert registry.has_tenant("globex")
    assert not registry.has_tenant("initech")
    assert not registry.has_tenant("../etc")


def test_creating_a_tenant_twice_fails(registry: Registry) -> None:
    with pytest.raises(AlreadyExists, match="acme"):
        registry.create_tenant("acme")


def test_issue_and_revoke_keys(registry: Registry) -> None:
    first = registry.create_tenant("globex")
    second = registry.issue_key("globex")
    assert first != second
    assert registry.authenticate(second) == "globex"
    assert registry.revoke_keys("globex") == 2
    assert registry.authenticate(first) is None
    assert registry.authenticate(second) is None
    assert registry.revoke_keys("globex") == 0
    assert registry.authenticate(registry.issue_key("globex")) == "globex"


def test_one_leaked_key_is_revoked_alone(registry: Registry) -> None:
    leaked, kept = registry.create_tenant("globex"), registry.issue_key("globex")
    other = registry.create_tenant("hooli")
    with pytest.raises(NotFound, match="not one of the keys of tenant 'globex'"):
        registry.revoke_key("globex", other)  # another tenant's key stays valid
    assert registry.authenticate(other) == "hooli"
    registry.revoke_key("globex", leaked + "\n")  # as read from stdin
    assert registry.authenticate(leaked) is None and registry.authenticate(kept) == "globex"
    with pytest.raises(NotFound):
        registry.revoke_key("globex", leaked)  # already gone
    for malformed in (None, "", "gk_\u00e9" * 8, "not a key"):
        with pytest.raises(NotFound, match="not one of the keys of tenant 'globex'"):
            registry.revoke_key("globex", malformed)


def test_key_operations_on_unknown_tenants_fail(registry: Registry) -> None:
    with pytest.raises(NotFound, match="initech"):
        registry.issue_key("initech")
    with pytest.raises(NotFound, match="initech"):
        registry.revoke_keys("initech")


@pytest.mark.parametrize(
    "api_key",
    ["", "gk_", "gk_" + "A" * 43, "nope", "gk_" + "a" * 500, "gk_ä" * 20, None, 42, b"gk_x"],
)
def test_authenticate_returns_none_for_bad_keys(registry: Registry, api_key: Any) -> None:
    assert registry.authenticate(api_key) is None


def test_keys_are_stored_only_as_hashes(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    with Registry(root) as opened:
        issued = [opened.create_tenant("acme"), opened.issue_key("acme")]
    stored = b"".join(path.read_bytes() for path in root.glob("catalog.sqlite3*"))
    for key in issued:
        assert key.encode() not in stored
        assert key[3:].encode() not in stored
        assert hashlib.sha256(key.encode()).hexdigest().encode() in stored


# publish, resolve, read


def test_publish_resolve_read_round_trip(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    source = make_adapter()
    record = registry.publish("acme", "spam", source, manifest)

    source_bytes = {path.name: path.read_bytes() for path in source.iterdir()}
    file_sha256 = {name: hashlib.sha256(data).hexdigest() for name, data in source_bytes.items()}
    lines = sorted(f"{name}\t{digest}\n" for name, digest in file_sha256.items())
    assert record.content_sha256 == hashlib.sha256("".join(lines).encode()).hexdigest()
    assert (record.tenant, record.name, record.version) == ("acme", "spam", 1)
    assert (record.full_name, record.ref) == ("acme/spam", "acme/spam@1")
    assert record.labels == ("ham", "spam")
    assert (record.base_sha256, record.rank) == (manifest["base_sha256"], 4)
    assert record.metrics == manifest["metrics"]
    assert record.size_bytes == sum(len(data) for data in source_bytes.values())
    assert record.path == registry.root / "adapters" / "acme" / "spam" / "1"

    on_disk = json.loads((record.path / "graft_manifest.json").read_text())
    assert on_disk == record.manifest
    assert on_disk["files"] == file_sha256
    assert on_disk["data"] == manifest["data"]
    assert {on_disk[key] for key in ("tenant", "name", "version")} == {"acme", "spam", 1}
    assert on_disk["content_sha256"] == record.content_sha256
    assert on_disk["created_at"] == record.created_at

    assert registry.resolve("acme", "spam") == record
    verified = registry.read_verified(registry.resolve("acme", "spam", 1))
    assert verified.record == record
    assert dict(verified.files) == source_bytes
    weights = load_safetensors(bytes(verified.files["adapter_model.safetensors"]))
    assert weights["classifier.weight"].shape == (2, 8)


def test_records_are_frozen_and_hashable(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    record = registry.publish("acme", "spam", make_adapter(), manifest)
    assert {record, registry.resolve("acme", "spam")} == {record}
    with pytest.raises(AttributeError):
        record.version = 2  # type: ignore[misc]


def test_versions_increment_and_stay_immutable(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    sources = [make_adapter(seed=seed) for seed in range(3)]
    records = [registry.publish("acme", "spam", source, manifest) for source in sources]
    assert [record.version for record in records] == [1, 2, 3]
    assert len({record.content_sha256 for record in records}) == 3
    assert registry.resolve("acme", "spam").version == 3
    for source, record in zip(sources, records, strict=True):
        pinned = registry.resolve("acme", "spam", record.version)
        weights = (source / "adapter_model.safetensors").read_bytes()
        assert registry.read_verified(pinned).files["adapter_model.safetensors"] == weights
    stored = records[0].path / "adapter_model.safetensors"
    assert stored.stat().st_mode & 0o222 == 0, "stored files are read-only"


def test_resolve_names_what_is_missing(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    registry.publish("acme", "spam", make_adapter(), manifest)
    with pytest.raises(NotFound, match="tenant 'initech'"):
        registry.resolve("initech", "spam")
    with pytest.raises(NotFound, match="adapter acme/ham not found"):
        registry.resolve("acme", "ham")
    with pytest.raises(NotFound, match=r"no version 7 \(latest is 1\)"):
        registry.resolve("acme", "spam", 7)


def test_a_remembered_resolve_still_refuses_what_it_would_have(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    """Resolving from memory skips the name checks, never what they refuse: True is not
    version 1, though the two hash alike."""
    registry.publish("acme", "spam", make_adapter(), manifest)
    assert registry.resolve("acme", "spam", 1).version == 1  # remembered from here on
    with pytest.raises(ValueError, match="version must be an int, got True"):
        registry.resolve("acme", "spam", True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="version must be an int"):
        registry.resolve("acme", "spam", 1.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidName, match="invalid adapter name 'Spam'"):
        registry.resolve("acme", "Spam")


def test_publish_to_unknown_tenant_fails(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    with pytest.raises(NotFound, match="initech"):
        registry.publish("initech", "spam", make_adapter(), manifest)


@pytest.mark.parametrize("when", ["before", "while staging"])
def test_a_publish_for_a_tenant_made_again_since_is_refused(
    registry: Registry,
    make_adapter: Callable[..., Path],
    manifest: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    when: str,
) -> None:
    """A training job publishes by its tenant's name long after it learnt of the tenant: the
    stamp it knew must still be the tenant's in the commit, or one made again under the name
    gets the deleted one's model."""
    born = registry.tenant_created_at("acme")
    stage = registry._publisher._stage_all

    def remade_then_stage(*args, **kwargs):
        registry.delete_tenant("acme")
        registry.create_tenant("acme")
        return stage(*args, **kwargs)

    if when == "before":
        registry.delete_tenant("acme")
        registry.create_tenant("acme")
    else:
        monkeypatch.setattr(registry._publisher, "_stage_all", remade_then_stage)
    with pytest.raises(NotFound, match="'acme' not found"):
        registry.publish("acme", "spam", make_adapter(), manifest, tenant_created_at=born)
    assert registry.list_adapters("acme") == []
    assert not registry._store.version_dir("acme", "spam", 1).exists()
    monkeypatch.undo()
    now = registry.tenant_created_at("acme")
    record = registry.publish("acme", "spam", make_adapter(), manifest, tenant_created_at=now)
    assert record.version == 1


def test_list_adapters_is_sorted_and_per_tenant(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    registry.create_tenant("globex")
    for tenant, name in [("acme", "spam"), ("acme", "legal"), ("globex", "spam"), ("acme", "spam")]:
        registry.publish(tenant, name, make_adapter(), manifest)
    listed = [(record.name, record.version) for record in registry.list_adapters("acme")]
    assert listed == [("legal", 1), ("spam", 1), ("spam", 2)]
    assert [record.full_name for record in registry.list_adapters("globex")] == ["globex/spam"]
    registry.create_tenant("initech")
    assert registry.list_adapters("initech") == []
    with pytest.raises(NotFound):
        registry.list_adapters("nobody")


def test_dependents_follow_the_base_model(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    base_sha256 = manifest["base_sha256"]
    registry.create_tenant("globex")
    registry.register_base(base_sha256, "minilm-l6")
    registry.register_base(base_sha256, "minilm-l6")  # idempotent
    registry.register_base(OTHER_BASE_SHA256, "minilm-l12")
    on_other = {**manifest, "base_sha256": OTHER_BASE_SHA256}
    registry.publish("globex", "triage", make_adapter(), manifest)
    registry.publish("acme", "spam", make_adapter(), manifest)
    registry.publish("acme", "spam", make_adapter(), on_other)
    registry.publish("acme", "legal", make_adapter(), manifest)

    dependents = [record.ref for record in registry.dependents(base_sha256)]
    assert dependents == ["acme/legal@1", "acme/spam@1", "globex/triage@1"]
    assert [record.ref for record in registry.dependents(OTHER_BASE_SHA256)] == ["acme/spam@2"]
    assert registry.dependents("ef" * 32) == []
    with pytest.raises(ValueError):
        registry.dependents("not-a-hash")
    with pytest.raises(ValueError):
        registry.register_base("AB" * 32, "upper")


def test_reopening_keeps_everything(
    tmp_path: Path, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    root = tmp_path / "registry"
    with Registry(root) as first:
        key = first.create_tenant("acme")
        record = first.publish("acme", "spam", make_adapter(), manifest)
    with pytest.raises(RegistryError, match="closed"):
        first.tenants()
    with Registry(root) as second:
        assert second.tenants() == ["acme"]
        assert second.authenticate(key) == "acme"
        assert second.resolve("acme", "spam") == record
        assert second.read_verified(record).record == record
        assert second.publish("acme", "spam", make_adapter(), manifest).version == 2


def test_concurrent_thread_publishes_get_consecutive_versions(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    sources = [make_adapter(seed=seed) for seed in range(8)]
    start = threading.Barrier(len(sources))

    def publish(source: Path) -> AdapterRecord:
        start.wait()
        return registry.publish("acme", "spam", source, manifest)

    with ThreadPoolExecutor(max_workers=len(sources)) as pool:
        records = list(pool.map(publish, sources))
    assert sorted(record.version for record in records) == list(range(1, 9))
    for record in records:
        assert registry.resolve("acme", "spam", record.version) == record
        assert registry.read_verified(record).record == record
    assert not list((registry.root / "adapters").glob(".tmp-*"))


_PUBLISHER = textwrap.dedent(
    """
    import sys
    from registry import Registry
    root, source, base_sha256 = sys.argv[1:]
    manifest = {"labels": ["ham", "spam"], "base_sha256": base_sha256, "rank": 4}
    with Registry(root) as registry:
        for _ in range(2):
            print(registry.publish("acme", "spam", source, manifest).version)
    """
)


def test_concurrent_process_publishes_get_consecutive_versions(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    source = make_adapter()
    base_sha256 = manifest["base_sha256"]
    command = [sys.executable, "-c", _PUBLISHER, str(registry.root), str(source), base_sha256]
    workers = [subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE) for _ in range(4)]
    versions = []
    for worker in workers:
        stdout, _ = worker.communicate(timeout=120)
        assert worker.returncode == 0
        versions += [int(line) for line in stdout.split()]
    assert sorted(versions) == list(range(1, 9))
    assert [record.version for record in registry.list_adapters("acme")] == list(range(1, 9))


def test_tenant_settings_round_trip_and_stamp(tmp_path) -> None:
    from registry import NotFound, Registry

    with Registry(tmp_path / "reg") as registry:
        registry.create_tenant("acme")
        stamp = registry.settings_stamp()
        registry.set_tenant_settings("acme", {"weight": 2.0})
        assert registry.tenant_settings() == {"acme": {"weight": 2.0}}
        assert registry.settings_stamp() != stamp
        stamp = registry.settings_stamp()
        registry.set_tenant_settings("acme", None)
        assert registry.tenant_settings() == {} and registry.settings_stamp() != stamp
        with pytest.raises(NotFound):
            registry.set_tenant_settings("nobody", {"weight": 1.0})
        with pytest.raises(ValueError):
            registry.set_tenant_settings("acme", ["not", "an", "object"])  # type: ignore[arg-type]


def test_update_tenant_settings_merges_in_one_transaction(tmp_path: Path) -> None:
    with Registry(tmp_path / "reg") as registry:
        registry.create_tenant("acme")
        registry.set_tenant_settings("acme", {"weight": 2.0})
        assert registry.update_tenant_settings("acme", {"max_queued_rows": 5}) == {
            "weight": 2.0,
            "max_queued_rows": 5,
        }

        def refuse(merged: dict) -> None:
            raise ValueError(f"refused {merged}")

        with pytest.raises(ValueError, match="refused"):
            registry.update_tenant_settings("acme", {"weight": -1.0}, check=refuse)
        assert registry.tenant_settings() == {"acme": {"weight": 2.0, "max_queued_rows": 5}}
        with pytest.raises(NotFound):
            registry.update_tenant_settings("nobody", {"weight": 1.0})

    # many writers, each changing its own field: none of them loses another's change
    fields = [f"field_{index}" for index in range(8)]

    def update(field: str) -> None:
        with Registry(tmp_path / "reg", durable=False) as other:
            other.update_tenant_settings("acme", {field: 1})

    with ThreadPoolExecutor(len(fields)) as pool:
        list(pool.map(update, fields))
    with Registry(tmp_path / "reg") as registry:
        assert set(fields) <= set(registry.tenant_settings()["acme"])


def test_a_root_that_is_a_file_is_refused_by_name(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    root.write_text("not a registry")
    with pytest.raises(RegistryError, match=r"registry .*registry is not a directory"):
        Registry(root)
    assert root.read_text() == "not a registry"


@pytest.mark.parametrize("kind", ["not a database", "a directory"])
def test_a_catalog_that_is_no_database_is_refused_by_name(tmp_path: Path, kind: str) -> None:
    catalog = tmp_path / "registry" / "catalog.sqlite3"
    if kind == "a directory":
        catalog.mkdir(parents=True)
    else:
        catalog.parent.mkdir()
        catalog.write_text("not sqlite")
    with pytest.raises(RegistryError, match=r"cannot open the registry's catalog .*sqlite3"):
        Registry(tmp_path / "registry")
    assert catalog.is_dir() or catalog.read_text() == "not sqlite"  # left as it was
