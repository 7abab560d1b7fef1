"""Recovery: what crashed writers leave behind is tidied when a registry opens, and nothing
the catalog has no row for is ever removed."""

import fcntl
import os
import pwd
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from registry import AdapterRecord, NotFound, Registry, RegistryError

REPO_ROOT = Path(__file__).resolve().parents[2]

# Publishes once, but dies (no cleanup, no exception handlers) at the chosen point.
_CRASHING_PUBLISHER = textwrap.dedent(
    """
    import os
    import sys

    from registry import Registry
    from registry import catalog

    root, source, base_sha256, crash_point = sys.argv[1:]
    registry = Registry(root)

    def crash(*args, **kwargs):
        os._exit(3)

    if crash_point == "rename":
        os.rename = crash
    else:
        catalog.insert_adapter = crash
    manifest = {"labels": ["ham", "spam"], "base_sha256": base_sha256, "rank": 4}
    registry.publish("acme", "spam", source, manifest)
    """
)


@pytest.mark.parametrize("crash_point", ["rename", "insert"])
def test_crashed_publish_is_cleaned_up_on_open(
    tmp_path: Path,
    make_adapter: Callable[..., Path],
    manifest: dict[str, Any],
    crash_point: str,
) -> None:
    root = tmp_path / "registry"
    with Registry(root) as opened:
        opened.create_tenant("acme")
    command = [
        sys.executable,
        "-c",
        _CRASHING_PUBLISHER,
        str(root),
        str(make_adapter()),
        manifest["base_sha256"],
        crash_point,
    ]
    assert subprocess.run(command, cwd=REPO_ROOT, check=False).returncode == 3
    adapters = root / "adapters"
    if crash_point == "rename":
        assert len(list(adapters.glob(".tmp-*/adapter_model.safetensors"))) == 1
    else:
        assert (adapters / "acme/spam/1/graft_manifest.json").is_file()

    with Registry(root) as reopened:
        assert list(adapters.iterdir()) == []
        with pytest.raises(NotFound):
            reopened.resolve("acme", "spam")
        assert reopened.publish("acme", "spam", make_adapter(), manifest).version == 1
    aside = list((root / "orphaned").glob("acme/spam/1-*/graft_manifest.json"))
    assert len(aside) == (crash_point == "insert")  # complete files, set aside, not removed


def test_stale_temp_dirs_are_removed_on_open(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    Registry(root).close()
    adapters = root / "adapters"
    crashed = [adapters / f".tmp-{os.getpid()}-{'0' * 32}", adapters / ".tmp-anything"]
    live = adapters / f".tmp-{os.getpid()}-{'1' * 32}"
    for directory in [*crashed, live]:
        directory.mkdir()
        (directory / "adapter_model.safetensors").write_bytes(b"partial")
    # A live writer holds a flock on its temp dir until it is done; the kernel drops it on a crash.
    live_fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(live_fd, fcntl.LOCK_EX)
        Registry(root).close()
        assert [path.name for path in adapters.iterdir()] == [live.name]
    finally:
        os.close(live_fd)
    Registry(root).close()
    assert list(adapters.iterdir()) == []


def test_unrecorded_version_dirs_are_set_aside_on_open(
    tmp_path: Path, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    root = tmp_path / "registry"
    (kept,) = _published(root, make_adapter, manifest, 1)
    # What a publisher killed between its rename and its commit leaves behind, or what a
    # catalog restored from an older copy does not know
    for orphan in (root / "adapters/acme/spam/2", root / "adapters/acme/ham/1"):
        orphan.mkdir(parents=True)
        (orphan / "graft_manifest.json").write_text("{}")
    with Registry(root) as reopened:
        assert sorted(path.name for path in (root / "adapters/acme").iterdir()) == ["spam"]
        assert [path.name for path in (root / "adapters/acme/spam").iterdir()] == ["1"]
        assert reopened.read_verified(kept).record == kept
        assert reopened.publish("acme", "spam", make_adapter(), manifest).version == 2
    aside = sorted(
        str(p.relative_to(root / "orphaned").parent)
        for p in (root / "orphaned").glob("*/*/*/graft_manifest.json")
    )
    assert [a.rsplit("-", 1)[0] for a in aside] == ["acme/ham/1", "acme/spam/2"]
    for _ in range(2):  # the same number left twice within a second: kept apart, both
        (root / "adapters/acme/ham/1").mkdir(parents=True)
        (root / "adapters/acme/ham/1/graft_manifest.json").write_text("{}")
        Registry(root).close()
    assert len(list((root / "orphaned/acme/ham").iterdir())) == 3


def test_files_of_a_deleted_version_that_outlived_its_commit_are_removed_on_open(
    tmp_path: Path, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    root = tmp_path / "registry"
    gone, _ = _published(root, make_adapter, manifest, 2)
    with Registry(root) as opened:
        saved = tmp_path / "saved"
        os.rename(gone.path, saved)  # back after the delete: as if it died after its commit
        opened.delete("acme", "spam", 1)
        os.rename(saved, gone.path)
    with Registry(root) as reopened:
        assert not gone.path.exists() and not (root / "orphaned").exists()
        assert [r.version for r in reopened.list_adapters("acme")] == [2]


@pytest.mark.parametrize("how", ["emptied", "removed", "replaced"])
def test_a_lost_catalog_is_refused_and_no_version_is_touched(
    tmp_path: Path, make_adapter: Callable[..., Path], manifest: dict[str, Any], how: str
) -> None:
    """A catalog SQLite finds empty (a zero-byte file, a missing one) beside stored versions
    was lost: opening it as new used to remove every version as a crashed publish."""
    root = tmp_path / "registry"
    _published(root, make_adapter, manifest, 2)
    for path in root.glob("catalog.sqlite3*"):
        path.unlink()
    if how == "emptied":
        (root / "catalog.sqlite3").write_bytes(b"")
    elif how == "replaced":  # by another registry's, which has no tenant
        Registry(tmp_path / "other").close()
        for path in (tmp_path / "other").glob("catalog.sqlite3*"):
            shutil.copy(path, root / path.name)
    stale = root / "adapters" / ".tmp-1-0"  # a crashed publish's: left, as everything is
    stale.mkdir()
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    what = {"emptied": "is empty", "removed": "is missing", "replaced": "records no tenant"}[how]
    for _ in range(2):  # the second refusal as the first: no empty catalog made in between
        with pytest.raises(RegistryError, match=f"{what}, yet 2 adapter version"):
            Registry(root)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before


def test_opening_while_others_publish_removes_nothing_live(
    registry: Registry, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    sources = [make_adapter(seed=seed) for seed in range(10)]
    is_done = threading.Event()

    def keep_opening() -> int:
        num_opened = 0
        while not is_done.is_set():
            Registry(registry.root).close()
            num_opened += 1
        return num_opened

    with ThreadPoolExecutor(max_workers=4) as pool:
        opener = pool.submit(keep_opening)
        try:
            publishes = [
                pool.submit(registry.publish, "acme", "spam", source, manifest)
                for source in sources
            ]
            records = [publish.result() for publish in publishes]
        finally:
            is_done.set()
        assert opener.result() > 0
    assert sorted(record.version for record in records) == list(range(1, 11))
    for record in records:
        assert registry.read_verified(record).record == record


def _published(
    root: Path, make_adapter: Callable[..., Path], manifest: dict[str, Any], count: int
) -> list[AdapterRecord]:
    """A registry at ``root`` with tenant acme and ``count`` versions of acme/spam."""
    with Registry(root) as opened:
        opened.create_tenant("acme")
        return [
            opened.publish("acme", "spam", make_adapter(seed=seed), manifest)
            for seed in range(count)
        ]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to be root in another's registry")
def test_root_is_refused_another_users_registry_and_changes_nothing(
    tmp_path: Path, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    """``sudo graft adapters import`` into a service account's registry left root-owned
    directories the service could not publish into, remove or, once root had set a leftover
    aside, even open. Root now opens only a registry root owns, and says how to go on."""
    root = tmp_path / "registry"
    _published(root, make_adapter, manifest, 1)
    leftover = root / "adapters" / "acme" / "spam" / "7"  # a crashed publish's, no catalog row
    shutil.copytree(root / "adapters" / "acme" / "spam" / "1", leftover)
    for path in (root, *root.rglob("*")):
        os.chown(path, 65534, 65534, follow_symlinks=False)  # nobody's
    before = sorted((str(p.relative_to(root)), p.lstat().st_uid) for p in root.rglob("*"))
    with pytest.raises(RegistryError, match=r"belongs to nobody, not root.*sudo -u nobody graft"):
        Registry(root)
    after = sorted((str(p.relative_to(root)), p.lstat().st_uid) for p in root.rglob("*"))
    assert after == before  # the leftover not set aside, no catalog file touched


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to be root in another's registry")
def test_the_refusal_of_a_registry_of_an_unnamed_uid_gives_a_command_that_works(
    tmp_path: Path, make_adapter: Callable[..., Path], manifest: dict[str, Any]
) -> None:
    """ "sudo -u uid 54321" is no command; sudo takes a bare uid as '#54321'."""
    root = tmp_path / "registry"
    _published(root, make_adapter, manifest, 1)
    uid = next(u for u in range(54321, 60000) if u not in {e.pw_uid for e in pwd.getpwall()})
    os.chown(root, uid, uid)
    with pytest.raises(RegistryError, match=rf"belongs to uid {uid}, not root.*sudo -u '#{uid}' "):
        Registry(root)


def test_a_registry_this_user_may_not_write_is_refused_by_name(
    tmp_path: Path, make_adapter: Callable[..., Path], manifest: dict[str, Any], monkeypatch
) -> None:
    """Opening writes (leftovers tidied, the schema kept current): said so up front, not as
    SQLite's "attempt to write a readonly database". (Root may write anywhere, so the check
    is simulated.)"""
    root = tmp_path / "registry"
    _published(root, make_adapter, manifest, 1)
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    monkeypatch.setattr("registry.registry.os.access", lambda path, mode: False)
    with pytest.raises(RegistryError, match="no write access to the registry .*run as the"):
        Registry(root)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before
