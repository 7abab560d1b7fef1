"""What the registry refuses, how it detects tampering, and that failures leave nothing behind."""

import contextlib
import json
import math
import os
import pickle
import sqlite3
import struct
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from registry import (
    IntegrityError,
    InvalidAdapter,
    NotFound,
    PublishItem,
    Registry,
    RegistryError,
)
from registry import catalog as registry_catalog
from registry import verify as registry_verify


def assert_nothing_stored(opened: Registry) -> None:
    """No catalog row and no directory for any adapter of a registry that had none."""
    assert opened.list_adapters("acme") == []
    with pytest.raises(NotFound):
        opened.resolve("acme", "spam")
    with sqlite3.connect(opened.root / "catalog.sqlite3") as conn:
        assert conn.execute("SELECT COUNT(*) FROM adapters").fetchone()[0] == 0
    assert list((opened.root / "adapters").iterdir()) == []


def tamper(path: Path, data: bytes) -> None:
    path.chmod(0o644)
    path.write_bytes(data)


# tampering, detected on read


def test_modified_file_is_detected(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    record = registry.publish("acme", "spam", make_adapter(), manifest)
    weights = record.path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    tamper(weights, bytes(data))
    message = "adapter acme/spam@1: adapter_model.safetensors does not match its recorded SHA-256"
    with pytest.raises(IntegrityError, match=message):
        registry.read_verified(record)


@pytest.mark.parametrize("change", [-1, +1])
def test_a_file_that_changes_size_while_read_is_refused(
    registry: Registry,
    make_adapter: Callable[..., Path],
    manifest: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    change: int,
) -> None:
    """The reader trusts the size it saw when it opened the file, and checks it at the end."""
    record = registry.publish("acme", "spam", make_adapter(), manifest)
    real_fstat = os.fstat

    def resized(fd: int) -> SimpleNamespace:
        stat = real_fstat(fd)
        return SimpleNamespace(st_mode=stat.st_mode, st_size=stat.st_size + change)

    monkeypatch.setattr(os, "fstat", resized)
    with pytest.raises(IntegrityError, match="changed size while it was read"):
        registry.read_verified(record)


def test_files_are_read_and_hashed_across_many_chunks(
    registry: Registry,
    make_adapter: Callable[..., Path],
    manifest: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = make_adapter()
    record = registry.publish("acme", "spam", source, manifest)
    monkeypatch.setattr(registry_verify, "_CHUNK_BYTES", 7)
    files = registry.read_verified(record).files
    assert dict(files) == {path.name: path.read_bytes() for path in source.iterdir()}


def test_a_reader_that_names_its_files_reads_and_verifies_only_those(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    """The engine reads the weights and config, not the held-out rows: a changed eval.jsonl
    does not stop it, while the version's listing is still checked in full."""
    record = registry.publish("acme", "spam", make_adapter(), manifest)
    served = ("adapter_config.json", "adapter_model.safetensors")
    tamper(record.path / "eval.jsonl", b'{"text": "changed", "label": "ham"}\n')
    assert set(registry.read_verified(record, served).files) == set(served)
    with pytest.raises(IntegrityError, match="eval.jsonl does not match its recorded SHA-256"):
        registry.read_verified(record)
    with pytest.raises(IntegrityError, match="notes.txt is not one of its files"):
        registry.read_verified(record, ("adapter_model.safetensors", "notes.txt"))
    with pytest.raises(TypeError, match="not one string"):  # not its characters, one by one
        registry.read_verified(record, "adapter_model.safetensors")
    (record.path / "extra.json").write_text("{}")
    with pytest.raises(IntegrityError, match="unexpected file extra.json"):
        registry.read_verified(record, served)


def test_removed_file_is_detected(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    record = registry.publish("acme", "spam", make_adapter(), manifest)
    (record.path / "eval.jsonl").unlink()
    with pytest.raises(IntegrityError, match="eval.jsonl is missing"):
        registry.read_verified(record)


def test_added_file_is_detected(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    record = registry.publish("acme", "spam", make_adapter(), manifest)
    (record.path / "extra.json").write_text("{}")
    with pytest.raises(IntegrityError, match="unexpected file extra.json"):
        registry.read_verified(record)


def test_file_replaced_by_symlink_is_refused(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    record = registry.publish("acme", "spam", make_adapter(), manifest)
    stored = record.path / "adapter_config.json"
    copy = record.path.parent / "elsewhere.json"
    copy.write_bytes(stored.read_bytes())  # same bytes, so only the symlink check can catch it
    stored.unlink()
    stored.symlink_to(copy)
    with pytest.raises(IntegrityError, match="adapter_config.json is a symlink"):
        registry.read_verified(record)


def test_file_replaced_by_a_directory_is_refused_by_name(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    record = registry.publish("acme", "spam", make_adapter(), manifest)
    stored = record.path / "adapter_config.json"
    stored.unlink()
    stored.mkdir()  # an IsADirectoryError naming a descriptor number, before
    with pytest.raises(IntegrityError, match="adapter_config.json is not a regular file"):
        registry.read_verified(record)


def test_edited_manifest_is_detected(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    record = registry.publish("acme", "spam", make_adapter(), manifest)
    stored = record.path / "graft_manifest.json"
    edited = {**json.loads(stored.read_text()), "labels": ["spam", "ham"]}
    tamper(stored, json.dumps(edited).encode())
    with pytest.raises(IntegrityError, match="graft_manifest.json"):
        registry.read_verified(record)


def test_removed_version_directory_is_detected(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    record = registry.publish("acme", "spam", make_adapter(), manifest)
    for path in record.path.iterdir():
        path.unlink()
    record.path.rmdir()
    with pytest.raises(IntegrityError, match="missing"):
        registry.read_verified(record)


def test_record_of_another_registry_is_refused(
    tmp_path: Path, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    with Registry(tmp_path / "one") as one, Registry(tmp_path / "two") as two:
        one.create_tenant("acme")
        record = one.publish("acme", "spam", make_adapter(), manifest)
        with pytest.raises(RegistryError, match="not stored in this registry"):
            two.read_verified(record)


# refused publishes leave nothing behind


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_missing_required_file_is_refused(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any], missing: str
) -> None:
    source = make_adapter()
    (source / missing).unlink()
    with pytest.raises(InvalidAdapter, match=missing):
        registry.publish("acme", "spam", source, manifest)
    assert_nothing_stored(registry)


def test_missing_source_directory_is_refused(
    registry: Registry, tmp_path: Path, manifest: dict[str, Any]
) -> None:
    with pytest.raises(InvalidAdapter, match="does not exist"):
        registry.publish("acme", "spam", tmp_path / "nowhere", manifest)
    assert_nothing_stored(registry)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"labels": None}, "labels"),
        ({"labels": []}, "labels"),
        ({"labels": "ham,spam"}, "labels"),
        ({"labels": ["ham", "ham"]}, "labels"),
        ({"labels": ["ham", 1]}, "labels"),
        ({"labels": ["ham", ""]}, "labels"),
        ({"labels": ["ham", "  "]}, "labels"),  # blank: no label a client could tell apart
        ({"labels": ["ham", "sp\ud800am"]}, r"labels'\]\[1\] holds an unpaired surrogate"),
        ({"base_sha256": "ab" * 31}, "base_sha256"),
        ({"base_sha256": "AB" * 32}, "base_sha256"),
        ({"base_sha256": "zz" * 32}, "base_sha256"),
        ({"rank": -1}, "rank"),
        ({"rank": "4"}, "rank"),
        ({"rank": 4.0}, "rank"),
        ({"rank": True}, "rank"),
        ({"metrics": [0.9]}, "metrics"),
        ({"metrics": {"f1": math.nan}}, "metrics"),
        ({"metrics": {"f1": np.float32(0.5)}}, "metrics"),
        ({"notes": object()}, "notes"),
    ],
)
def test_bad_manifest_is_refused(
    registry: Registry,
    make_adapter: Callable[..., Path],
    manifest: dict[str, Any],
    change: dict[str, Any],
    key: str,
) -> None:
    bad = {**manifest, **change}
    bad = {name: value for name, value in bad.items() if value is not None}
    with pytest.raises(ValueError, match=key):
        registry.publish("acme", "spam", make_adapter(), bad)
    assert_nothing_stored(registry)


def test_bad_manifest_error_is_a_registry_error(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    with pytest.raises(InvalidAdapter, match="rank"):
        registry.publish("acme", "spam", make_adapter(), {**manifest, "rank": -2})


def test_registry_keys_in_a_manifest_are_overwritten(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    spoofed = {**manifest, "tenant": "globex", "version": 99, "files": {}}
    record = registry.publish("acme", "spam", make_adapter(), spoofed)
    assert (record.manifest["tenant"], record.manifest["version"]) == ("acme", 1)
    assert "adapter_model.safetensors" in record.manifest["files"]
    assert registry.read_verified(record).record == record


@pytest.mark.parametrize(
    "file_name",
    [
        "adapter_model.bin",
        "pytorch_model.bin",
        "head.pt",
        "weights.pth",
        "state.pkl",
        "graft_manifest.json",
    ],
)
def test_pickle_formats_and_the_manifest_name_are_refused(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any], file_name: str
) -> None:
    source = make_adapter()
    (source / file_name).write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))
    with pytest.raises(InvalidAdapter, match=file_name):
        registry.publish("acme", "spam", source, manifest)
    assert_nothing_stored(registry)


def test_subdirectories_and_symlinks_are_refused(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    with_subdir = make_adapter()
    (with_subdir / "checkpoint-10").mkdir()
    with pytest.raises(InvalidAdapter, match="subdirectory"):
        registry.publish("acme", "spam", with_subdir, manifest)
    with_link = make_adapter()
    (with_link / "notes.txt").symlink_to(with_link / "eval.jsonl")
    with pytest.raises(InvalidAdapter, match="symlink"):
        registry.publish("acme", "spam", with_link, manifest)
    assert_nothing_stored(registry)


def _safetensors_bytes(header: object, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize(
    "weights",
    [
        pickle.dumps({"lora_A": [[0.0] * 4] * 4}),
        b"PK\x03\x04" + b"\x00" * 64,  # a zip, like torch.save's format
        b"\x01\x02",
        struct.pack("<Q", 1 << 40) + b"{}",
        _safetensors_bytes([1, 2, 3]),
        _safetensors_bytes(
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4
        ),
        _safetensors_bytes(
            {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8
        ),
        _safetensors_bytes(
            {"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, b"\0" * 8
        ),
    ],
    ids=[
        "pickle",
        "zip",
        "short",
        "huge-header",
        "list-header",
        "out-of-range",
        "bad-size",
        "bad-shape",
    ],
)
def test_weights_that_are_not_safetensors_are_refused(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any], weights: bytes
) -> None:
    source = make_adapter()
    (source / "adapter_model.safetensors").write_bytes(weights)
    with pytest.raises(InvalidAdapter, match="adapter_model.safetensors"):
        registry.publish("acme", "spam", source, manifest)
    assert_nothing_stored(registry)


def test_adapter_config_must_be_a_json_object(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    source = make_adapter()
    (source / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(InvalidAdapter, match="adapter_config.json"):
        registry.publish("acme", "spam", source, manifest)
    assert_nothing_stored(registry)


# failures mid-publish leave nothing behind


def test_failed_rename_leaves_nothing(
    registry: Registry,
    make_adapter: Callable[..., Path],
    manifest: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken_rename(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "rename", broken_rename)
    with pytest.raises(OSError, match="disk on fire"):
        registry.publish("acme", "spam", make_adapter(), manifest)
    monkeypatch.undo()
    assert_nothing_stored(registry)
    assert registry.publish("acme", "spam", make_adapter(), manifest).version == 1


def test_failed_insert_leaves_nothing(
    registry: Registry,
    make_adapter: Callable[..., Path],
    manifest: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken_insert(*args: Any, **kwargs: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(registry_catalog, "insert_adapter", broken_insert)
    with pytest.raises(sqlite3.OperationalError):
        registry.publish("acme", "spam", make_adapter(), manifest)
    monkeypatch.undo()
    assert_nothing_stored(registry)
    assert registry.publish("acme", "spam", make_adapter(), manifest).version == 1


class _Connection:
    """A catalog connection whose commit is replaced (sqlite3's own methods cannot be)."""

    def __init__(self, conn: sqlite3.Connection, commit: Callable[[sqlite3.Connection], None]):
        self._conn, self._commit = conn, commit

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def commit(self) -> None:
        self._commit(self._conn)


def _interrupted_after(conn: sqlite3.Connection) -> None:
    conn.commit()
    raise KeyboardInterrupt  # a SIGINT during the fsync raises once the commit returns


def _rolled_back(conn: sqlite3.Connection) -> None:
    conn.rollback()  # as SQLite does on some failed commits
    raise sqlite3.OperationalError("disk I/O error")


@pytest.mark.parametrize("commit", [_interrupted_after, _rolled_back])
def test_a_publish_interrupted_at_its_commit_is_whole_or_gone(
    registry: Registry,
    make_adapter: Callable[..., Path],
    manifest: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    commit: Callable[[sqlite3.Connection], None],
) -> None:
    """Committed, its directories were removed all the same: a latest version with no files,
    refused on every read, that a fresh open did not repair."""
    registry.publish("acme", "spam", make_adapter(), manifest)
    database = registry._publisher._catalog
    fresh = database._fresh

    @contextlib.contextmanager
    def replaced_commit():
        with fresh() as conn:
            yield _Connection(conn, commit)

    monkeypatch.setattr(database, "_fresh", replaced_commit)
    with pytest.raises((KeyboardInterrupt, sqlite3.OperationalError)):
        registry.publish("acme", "spam", make_adapter(seed=2), manifest)
    monkeypatch.undo()
    latest = registry.resolve("acme", "spam")
    assert latest.version == (2 if commit is _interrupted_after else 1)
    assert registry.read_verified(latest).files  # whole: every file there, every hash right
    assert registry._store.version_dir("acme", "spam", 2).exists() == (latest.version == 2)


def test_a_manifest_that_understates_the_lora_rank_is_refused(
    registry: Registry, make_adapter, manifest
) -> None:
    """Servers budget pool pages from the manifest's rank and refuse weights above it at
    every load; such a version must not become latest in the first place."""
    rank8 = make_adapter(rank=8)
    for stated in (4, 0):
        with pytest.raises(InvalidAdapter, match=f"manifest\\['rank'\\] is {stated}, but .*rank-8"):
            registry.publish("acme", "spam", rank8, {**manifest, "rank": stated})
    with pytest.raises(InvalidAdapter, match=r"item 1 \(acme/spam\): manifest\['rank'\] is 4"):
        registry.publish_many(
            [
                PublishItem("acme", "spam", make_adapter(rank=4), manifest),
                PublishItem("acme", "spam", rank8, manifest),
            ]
        )
    assert registry.list_adapters("acme") == []
    assert registry.publish("acme", "spam", rank8, {**manifest, "rank": 16}).rank == 16
