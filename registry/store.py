"""The registry's blobs: adapter files under ``<root>/adapters/<tenant>/<name>/<version>/``.

A version directory appears in one step: its files are copied, hashed and fsynced into a temporary
directory ``adapters/.tmp-<pid>-<uuid>`` (the slow part, done outside any lock), then the manifest
is written and the directory renamed into place while the caller holds the catalog's write lock.
A directory therefore either is complete or is not there. What a crashed writer leaves is removed
on open: temp dirs nobody holds a lock on (a writer flocks its temp dir for as long as it works
on it, and the kernel drops the lock when the writer dies) and version dirs without a catalog row.
"""

import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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

logger = logging.getLogger(__name__)

_TEMP_PREFIX = ".tmp-"
_MAX_TEMP_DIR_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class StagedVersion:
    """Checked, hashed and fsynced copies of an adapter's files, not yet a version."""

    temp_dir: Path  # adapters/.tmp-<pid>-<uuid>; removed by BlobStore.discard
    lock_fd: int  # descriptor holding the flock on temp_dir; closed by BlobStore.discard
    file_sha256: dict[str, str]  # file name -> hex SHA-256, the manifest excluded
    size_bytes: int  # total bytes of those files
    content_sha256: str  # hex, see manifest.content_sha256


class BlobStore:
    """Owns ``<root>/adapters``: staging, installing, removing and listing version directories."""

    def __init__(self, root: Path) -> None:
        self._dir = root / "adapters"
        self._dir.mkdir(parents=True, exist_ok=True)

    def version_dir(self, tenant: str, name: str, version: int) -> Path:
        """Where version `version` of `tenant/name` lives (whether or not it exists)."""
        return self._dir / tenant / name / str(version)

    def stage(self, source_dir: Path) -> StagedVersion:
        """Copy the adapter files in `source_dir` into a new temp dir, checking names and formats.

        Raises InvalidAdapter (and leaves nothing behind) for a missing or unsafe file.
        """
        names = _list_source_files(source_dir)
        formats.check_file_names(names)
        temp_dir, lock_fd = self._new_temp_dir()
        try:
            file_sha256, size_bytes = _copy_all(source_dir, temp_dir, names)
            _check_formats(temp_dir, names)
            fsync_dir(temp_dir)
        except BaseException:
            remove_tree(temp_dir)
            os.close(lock_fd)
            raise
        digest = content_sha256(file_sha256)
        return StagedVersion(temp_dir, lock_fd, file_sha256, size_bytes, digest)

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

    def install(self, staged: StagedVersion, manifest_text: str, final: Path) -> None:
        """Write the manifest into `staged`, then rename it to `final`, durably.

        The caller holds the catalog's write lock and has checked that no catalog row names
        `final`, so a directory found there is a crashed writer's leftover and is replaced.
        On failure `final` does not exist afterwards; the temp dir is the caller's to discard.
        """
        write_synced(staged.temp_dir / MANIFEST_FILE, manifest_text.encode("utf-8"))
        fsync_dir(staged.temp_dir)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            logger.warning("replacing leftover directory %s that has no catalog row", final)
            remove_tree(final)
        try:
            os.rename(staged.temp_dir, final)
        except BaseException:
            prune_empty_dirs(final.parent, self._dir)
            raise
        try:
            for directory in (final.parent, final.parent.parent, self._dir):
                fsync_dir(directory)
        except BaseException:
            self.remove_version(final)
            raise

    def discard(self, staged: StagedVersion) -> None:
        """Remove a staged temp dir (nothing to remove once installed) and release its lock."""
        remove_tree(staged.temp_dir)
        os.close(staged.lock_fd)

    def remove_version(self, version_dir: Path) -> None:
        """Remove a version directory and the tenant/name directories it leaves empty.

        Only called under the catalog's write lock, so no writer is about to rename into them.
        """
        if not version_dir.is_relative_to(self._dir):
            raise ValueError(f"{version_dir} is not inside {self._dir}")
        remove_tree(version_dir)
        prune_empty_dirs(version_dir.parent, self._dir)

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
                    if version_dir.name.isdigit() and not version_dir.name.startswith("0"):
                        yield tenant_dir.name, name_dir.name, int(version_dir.name), version_dir


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


def _copy_all(source_dir: Path, temp_dir: Path, names: list[str]) -> tuple[dict[str, str], int]:
    file_sha256: dict[str, str] = {}
    size_bytes = 0
    for name in names:
        try:
            file_sha256[name], num_bytes = copy_synced(source_dir / name, temp_dir / name)
        except (NotRegularFile, FileNotFoundError) as error:
            raise InvalidAdapter(f"cannot publish {name}: {error}") from None
        size_bytes += num_bytes
    return file_sha256, size_bytes


def _check_formats(temp_dir: Path, names: list[str]) -> None:
    """Check the copies, not the sources, so what is checked is exactly what is stored."""
    formats.check_adapter_config(temp_dir / "adapter_config.json")
    for name in names:
        if name.endswith(".safetensors"):
            formats.check_safetensors(temp_dir / name)
