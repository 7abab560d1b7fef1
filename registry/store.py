"""The registry's blobs: adapter files under ``<root>/adapters/<tenant>/<name>/<version>/``.

A version directory appears in one step. A publish call first opens a `Staging`: one temp dir
``adapters/.tmp-<pid>-<uuid>``, flocked for as long as the call works in it. Each adapter's files
are copied, hashed and fsynced into the temp dir itself when the call publishes one adapter, or into
``<temp dir>/<index>`` when it publishes several (one lock and one descriptor per call, whatever
its size). That is the slow part, done outside any lock. Then, while the caller holds the
catalog's write lock, `BlobStore.install` writes each manifest and renames each staged directory
into place. A directory therefore either is complete or is not there. What a crashed writer leaves
is removed on open: temp dirs nobody holds a lock on (the kernel drops the lock when the writer
dies) and version dirs without a catalog row.
"""

import itertools
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from registry import formats
from registry.errors import InvalidAdapter, RegistryError
from registry.fsio import (
    NotRegularFile,
    copy_synced,
    fsync_dir,
    lock_dir,
    prune_empty_dirs,
    remove_tree,
    try_lock_dir,
    write_synced,
)
from registry.manifest import MANIFEST_FILE, content_sha256
from registry.names import is_valid_name
from registry.parallel import map_in_threads

logger = logging.getLogger(__name__)

_TEMP_PREFIX = ".tmp-"
_MAX_TEMP_DIR_ATTEMPTS = 3
# Threads for a batch's blocking file work: fsyncs, and creates and renames that wait for the
# journal. On the development VM's ext4, publish_many of 200 durable adapters took 16 ms each
# with 1 thread and 1.6 ms with 8; scratch ones 1.9 and 1.6 ms.
MAX_IO_THREADS = 8


@dataclass(frozen=True, slots=True)
class StagedVersion:
    """An adapter's files copied, hashed, checked and (if durable) fsynced; not yet a version."""

    temp_dir: Path  # inside (or equal to) its Staging's temp dir; removed with it
    file_sha256: dict[str, str]  # file name -> hex SHA-256, the manifest excluded
    size_bytes: int  # total bytes of those files
    content_sha256: str  # hex, see manifest.content_sha256
    lora_rank: int  # of the weights' LoRA factors, 0 for none


@dataclass(frozen=True, slots=True)
class PendingVersion:
    """A staged version, the manifest to store with it, and where it goes."""

    staged: StagedVersion
    manifest_text: str  # graft_manifest.json, written by install
    final: Path  # the version directory, adapters/<tenant>/<name>/<version>


class Staging:
    """One publish call's locked temp dir; a context manager that removes it and unlocks on exit.

    Made by `BlobStore.staging`. `stage` may be called from several threads at once, each call
    with its own index.
    """

    def __init__(self, temp_dir: Path, lock_fd: int, num_versions: int, is_durable: bool) -> None:
        self._dir = temp_dir
        self._lock_fd = lock_fd
        self._num_versions = num_versions
        self._is_durable = is_durable

    def stage(self, index: int, source_dir: Path) -> StagedVersion:
        """Copy the adapter files in `source_dir` into slot `index`, checking names and formats.

        Raises InvalidAdapter for a missing or unsafe file; what was copied stays until the
        Staging closes. The slot's directory is fsynced later, by `BlobStore.install`, once the
        manifest is in it.
        """
        if not 0 <= index < self._num_versions:
            raise ValueError(f"index {index} is outside 0..{self._num_versions - 1}")
        names = _list_source_files(source_dir)
        formats.check_file_names(names)
        # One version stages in the temp dir itself: the layout single publishes always had.
        slot = self._dir if self._num_versions == 1 else self._dir / str(index)
        if slot != self._dir:
            slot.mkdir()
        file_sha256, size_bytes = _copy_all(source_dir, slot, names, self._is_durable)
        lora_rank = _check_formats(slot, names)
        return StagedVersion(slot, file_sha256, size_bytes, content_sha256(file_sha256), lora_rank)

    def close(self) -> None:
        """Remove the temp dir (whatever was not installed) and release its lock."""
        if self._lock_fd < 0:
            return
        remove_tree(self._dir)
        os.close(self._lock_fd)
        self._lock_fd = -1

    def __enter__(self) -> "Staging":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class BlobStore:
    """Owns ``<root>/adapters``: staging, installing, removing and listing version directories.

    With `is_durable` False nothing is fsynced (see `Registry`); renames stay atomic.
    """

    def __init__(self, root: Path, *, is_durable: bool = True) -> None:
        self._dir = root / "adapters"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._is_durable = is_durable

    def version_dir(self, tenant: str, name: str, version: int) -> Path:
        """Where version `version` of `tenant/name` lives (whether or not it exists)."""
        return self._dir / tenant / name / str(version)

    def staging(self, num_versions: int) -> Staging:
        """A fresh locked temp dir with room for `num_versions` staged versions."""
        if num_versions < 1:
            raise ValueError(f"num_versions must be >= 1, got {num_versions}")
        temp_dir, lock_fd = self._new_temp_dir()
        return Staging(temp_dir, lock_fd, num_versions, self._is_durable)

    def _new_temp_dir(self) -> tuple[Path, int]:
        """Create and lock a fresh temp dir; return it and the descriptor holding its lock."""
        for _ in range(_MAX_TEMP_DIR_ATTEMPTS):
            temp_dir = self._dir / f"{_TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
            temp_dir.mkdir()
            try:
                lock_fd = lock_dir(temp_dir)
            except FileNotFoundError:
                continue
            # A registry opening elsewhere may have removed it before we locked it.
            if os.fstat(lock_fd).st_nlink > 0:
                return temp_dir, lock_fd
            os.close(lock_fd)
        raise RegistryError(f"could not create a temp dir in {self._dir}")

    def install(self, pending: Sequence[PendingVersion]) -> None:
        """Write each manifest into its staged dir, then rename each to its final place, durably.

        The caller holds the catalog's write lock and has checked that no catalog row names any
        `final`, so a directory found there is a crashed writer's leftover and is replaced.
        Every file and staged directory is fsynced once, and every parent directory (adapter,
        tenant, ``adapters``) once per call, after all renames. On failure no `final` exists
        afterwards; the staged dirs are the caller's to discard (by closing its Staging).
        """
        map_in_threads(self._write_manifest, pending, MAX_IO_THREADS)
        installed: list[Path] = []
        try:
            for version in pending:
                self._rename_into_place(version.staged.temp_dir, version.final)
                installed.append(version.final)
            map_in_threads(self._sync_dir, _parent_dirs(installed, self._dir), MAX_IO_THREADS)
        except BaseException:
            self.remove_versions(installed)
            raise

    def _write_manifest(self, version: PendingVersion) -> None:
        manifest_path = version.staged.temp_dir / MANIFEST_FILE
        write_synced(manifest_path, version.manifest_text.encode(), is_durable=self._is_durable)
        self._sync_dir(version.staged.temp_dir)

    def _rename_into_place(self, temp_dir: Path, final: Path) -> None:
        if final.exists():  # no catalog row has it: kept, as on open (Registry._remove_leftovers)
            aside = self.set_aside(final)
            logger.warning(
                "moved leftover directory %s, which has no catalog row, to %s", final, aside
            )
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(temp_dir, final)
        except BaseException:
            prune_empty_dirs(final.parent, self._dir)
            raise

    def _sync_dir(self, directory: Path) -> None:
        if self._is_durable:
            fsync_dir(directory)

    def remove_version(self, version_dir: Path) -> None:
        """Remove a version directory and the tenant/name directories it leaves empty.

        Only called under the catalog's write lock, so no writer is about to rename into them.
        """
        if not version_dir.is_relative_to(self._dir):
            raise ValueError(f"{version_dir} is not inside {self._dir}")
        remove_tree(version_dir)
        prune_empty_dirs(version_dir.parent, self._dir)

    def remove_versions(self, version_dirs: Sequence[Path]) -> None:
        """`remove_version` for each of `version_dirs`, most recently installed first."""
        for version_dir in reversed(version_dirs):
            self.remove_version(version_dir)

    def set_aside(self, version_dir: Path) -> Path:
        """Move a version directory the catalog has no row for out of ``adapters/``, into
        ``<root>/orphaned/<tenant>/<name>/<version>-<unix time>``, and return where. Its
        number is then free for the next publish, and nothing is lost. Call under the
        catalog's write lock."""
        if not version_dir.is_relative_to(self._dir):
            raise ValueError(f"{version_dir} is not inside {self._dir}")
        relative = version_dir.relative_to(self._dir)
        parent = self._dir.parent / "orphaned" / relative.parent
        parent.mkdir(parents=True, exist_ok=True)
        stem = f"{relative.name}-{int(time.time())}"
        aside = parent / stem
        for count in itertools.count(2):  # the same version set aside twice within a second
            if not aside.exists():
                break
            aside = parent / f"{stem}-{count}"
        os.rename(version_dir, aside)
        self._sync_dir(parent)
        self._sync_dir(version_dir.parent)
        prune_empty_dirs(version_dir.parent, self._dir)
        return aside

    def remove_deleted(self, version_dirs: Sequence[Path]) -> None:
        """Remove the directories of versions whose catalog rows a committed transaction deleted.

        Their paths are never reused (deleted version numbers are kept), so this needs no lock;
        a directory that cannot be removed is logged, and the next open removes it (it has no
        row). Empty tenant and name directories are left to `prune_empty_parents`.
        """
        for version_dir in version_dirs:
            if not version_dir.is_relative_to(self._dir):
                raise ValueError(f"{version_dir} is not inside {self._dir}")
            remove_tree(version_dir)

    def prune_empty_parents(self, version_dirs: Sequence[Path]) -> None:
        """Remove the name and tenant directories above `version_dirs` that are now empty; call
        under the catalog's write lock, so that no publisher is about to rename into them."""
        for parent in _parent_dirs(version_dirs, self._dir)[:-1]:
            prune_empty_dirs(parent, self._dir)

    def remove_stale_temp_dirs(self) -> int:
        """Remove temp dirs no writer holds a lock on; return how many were removed."""
        num_removed = 0
        for entry in list(os.scandir(self._dir)):
            if not entry.name.startswith(_TEMP_PREFIX) or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                lock_fd = try_lock_dir(Path(entry.path))
            except FileNotFoundError:
                continue
            if lock_fd is None:
                continue  # a live writer is still staging into it
            try:
                logger.warning("removing stale temp dir %s", entry.path)
                remove_tree(Path(entry.path))
                num_removed += 1
            finally:
                os.close(lock_fd)
        return num_removed

    def remove_empty_dirs(self) -> None:
        """Remove tenant and adapter directories left empty; call under the catalog write lock."""
        for tenant_dir in _subdirs(self._dir, "tenant"):
            for name_dir in _subdirs(tenant_dir, "adapter"):
                prune_empty_dirs(name_dir, self._dir)
            prune_empty_dirs(tenant_dir, self._dir)

    def version_dirs(self) -> Iterator[tuple[str, str, int, Path]]:
        """Yield (tenant, name, version, path) for every directory shaped like a version.

        Directories whose names could not be a tenant, an adapter or a version are skipped.
        """
        for tenant_dir in _subdirs(self._dir, "tenant"):
            for name_dir in _subdirs(tenant_dir, "adapter"):
                for version_dir in _subdirs(name_dir, None):
                    name = version_dir.name
                    if name.isascii() and name.isdigit() and not name.startswith("0"):
                        yield tenant_dir.name, name_dir.name, int(name), version_dir


def _subdirs(parent: Path, kind: str | None) -> Iterator[Path]:
    for entry in sorted(os.scandir(parent), key=lambda entry: entry.name):
        if not entry.is_dir(follow_symlinks=False):
            continue
        if kind is None or is_valid_name(kind, entry.name):
            yield Path(entry.path)


def _list_source_files(source_dir: Path) -> list[str]:
    """Names of the plain files in `source_dir`; refuse subdirectories, symlinks and the like."""
    try:
        entries = list(os.scandir(source_dir))
    except (FileNotFoundError, NotADirectoryError):
        raise InvalidAdapter(f"adapter directory {source_dir} does not exist") from None
    for entry in entries:
        if entry.is_symlink():
            raise InvalidAdapter(f"{entry.name} is a symlink; adapter files must be plain files")
        if entry.is_dir(follow_symlinks=False):
            raise InvalidAdapter(f"{entry.name} is a subdirectory; adapter directories are flat")
        if not entry.is_file(follow_symlinks=False):
            raise InvalidAdapter(f"{entry.name} is not a regular file")
    return sorted(entry.name for entry in entries)


def _parent_dirs(version_dirs: Sequence[Path], adapters_dir: Path) -> list[Path]:
    """The adapter, tenant and ``adapters`` directories above `version_dirs`, each once."""
    adapter_dirs = dict.fromkeys(version_dir.parent for version_dir in version_dirs)
    tenant_dirs = dict.fromkeys(adapter_dir.parent for adapter_dir in adapter_dirs)
    return [*adapter_dirs, *tenant_dirs, *([adapters_dir] if version_dirs else [])]


def _copy_all(
    source_dir: Path, temp_dir: Path, names: list[str], is_durable: bool
) -> tuple[dict[str, str], int]:
    file_sha256: dict[str, str] = {}
    size_bytes = 0
    for name in names:
        try:
            file_sha256[name], num_bytes = copy_synced(
                source_dir / name, temp_dir / name, is_durable=is_durable
            )
        except (NotRegularFile, FileNotFoundError) as error:
            raise InvalidAdapter(f"cannot publish {name}: {error}") from None
        size_bytes += num_bytes
    return file_sha256, size_bytes


def _check_formats(temp_dir: Path, names: list[str]) -> int:
    """Check the copies, not the sources, so what is checked is exactly what is stored; return
    the rank of the weights' LoRA factors."""
    formats.check_adapter_config(temp_dir / "adapter_config.json")
    rank = 0
    for name in names:
        if name.endswith(".safetensors"):
            header = formats.check_safetensors(temp_dir / name)
            if name == formats.WEIGHTS_FILE:
                rank = formats.lora_rank(header)
    return rank
