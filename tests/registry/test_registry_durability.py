"""Durability: scratch registries (durable=False) skip every fsync and are still complete
when reopened durable; closing checkpoints the write-ahead log."""

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from registry import PublishItem, Registry
from registry.catalog import Catalog


def test_scratch_registry_skips_every_fsync(
    tmp_path: Path,
    make_adapter: Callable[..., Path],
    manifest: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    num_fsyncs = 0
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        nonlocal num_fsyncs
        num_fsyncs += 1
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    with Registry(tmp_path / "scratch", durable=False) as scratch:
        scratch.create_tenant("acme")
        scratch.publish("acme", "spam", make_adapter(), manifest)
        scratch.publish_many([PublishItem("acme", "spam", make_adapter(), manifest)] * 3)
    assert num_fsyncs == 0
    with Registry(tmp_path / "durable") as durable:
        durable.create_tenant("acme")
        durable.publish("acme", "spam", make_adapter(), manifest)
    assert num_fsyncs > 0


def test_scratch_catalog_does_not_sync(tmp_path: Path) -> None:
    for is_durable, expected in [(True, 2), (False, 0)]:  # FULL is 2, OFF is 0
        database = Catalog(tmp_path / f"{is_durable}.sqlite3", 1.0, is_durable=is_durable)
        try:
            with database.connect() as conn:
                assert conn.execute("PRAGMA synchronous").fetchone()[0] == expected
        finally:
            database.close()


def test_scratch_registry_reopened_durable_sees_everything(
    tmp_path: Path, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    root = tmp_path / "registry"
    with Registry(root, durable=False) as scratch:
        key = scratch.create_tenant("acme")
        scratch.register_base(manifest["base_sha256"], "minilm")
        single = scratch.publish("acme", "spam", make_adapter(), manifest)
        batch = scratch.publish_many(
            [PublishItem("acme", name, make_adapter(), manifest) for name in ("spam", "ham")]
        )
    with Registry(root) as durable:
        assert durable.authenticate(key) == "acme"
        assert durable.list_adapters("acme") == sorted(
            [single, *batch], key=lambda record: (record.name, record.version)
        )
        for record in [single, *batch]:
            assert durable.read_verified(record).record == record
        assert durable.publish("acme", "spam", make_adapter(), manifest).version == 3


def test_durable_must_be_a_bool(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="durable"):
        Registry(tmp_path / "registry", durable="no")  # type: ignore[arg-type]


def test_closing_checkpoints_the_log(
    tmp_path: Path, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    root = tmp_path / "registry"
    with Registry(root) as opened:
        opened.create_tenant("acme")
        opened.publish("acme", "spam", make_adapter(), manifest)
        # The idle connection keeps the log between calls, so commits need no checkpoint.
        assert (root / "catalog.sqlite3-wal").exists()
    assert not (root / "catalog.sqlite3-wal").exists()
    with sqlite3.connect(root / "catalog.sqlite3") as conn:
        assert conn.execute("SELECT COUNT(*) FROM adapters").fetchone()[0] == 1
