"""Reading a stored version back, trusting nothing on disk.

The catalog is the source of truth: the record's manifest (the catalog's copy) lists the files and
their SHA-256s. A version directory must hold exactly those files plus an identical manifest, each
a regular file (no symlinks), each matching its hash; otherwise IntegrityError names the file.
"""

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from typing import BinaryIO

from registry.errors import IntegrityError
from registry.formats import is_plain_file_name
from registry.fsio import NotRegularFile, open_regular
from registry.manifest import MANIFEST_FILE, content_sha256, is_sha256_hex
from registry.records import AdapterRecord


def read_version_files(record: AdapterRecord) -> dict[str, bytes]:
    """Read every content file of `record` once, check it, and return name -> bytes."""
    file_sha256 = _recorded_files(record)
    _check_listing(record, set(file_sha256) | {MANIFEST_FILE})
    names = [MANIFEST_FILE, *sorted(file_sha256)]
    with contextlib.ExitStack() as stack:
        opened = {name: stack.enter_context(_open(record, name)) for name in names}
        for file in opened.values():
            _prefetch(file)
        data = {name: file.read() for name, file in opened.items()}
    _check_manifest_copy(record, data.pop(MANIFEST_FILE))
    for name, expected in sorted(file_sha256.items()):
        if hashlib.sha256(data[name]).hexdigest() != expected:
            raise _fail(record, f"{name} does not match its recorded SHA-256")
    return data


def _fail(record: AdapterRecord, problem: str) -> IntegrityError:
    return IntegrityError(f"adapter {record.ref}: {problem}")


def _recorded_files(record: AdapterRecord) -> Mapping[str, str]:
    files = record.manifest.get("files")
    if not isinstance(files, Mapping) or not all(
        is_plain_file_name(name) and is_sha256_hex(digest) for name, digest in files.items()
    ):
        raise _fail(record, "the recorded file list is malformed")
    if content_sha256(files) != record.content_sha256:
        raise _fail(record, "the recorded file list does not match the content SHA-256")
    return files


def _check_listing(record: AdapterRecord, expected: set[str]) -> None:
    try:
        with os.scandir(record.path) as entries:
            found = {entry.name for entry in entries}
    except FileNotFoundError:
        raise _fail(record, f"version directory {record.path} is missing") from None
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing:
        raise _fail(record, f"{missing[0]} is missing")
    if unexpected:
        raise _fail(record, f"unexpected file {unexpected[0]} in the version directory")


def _check_manifest_copy(record: AdapterRecord, data: bytes) -> None:
    try:
        on_disk = json.loads(data)
    except ValueError:
        on_disk = None
    if on_disk != record.manifest:
        raise _fail(record, f"{MANIFEST_FILE} does not match the catalog's copy")


def _open(record: AdapterRecord, name: str) -> BinaryIO:
    try:
        return open_regular(record.path / name)
    except FileNotFoundError:
        raise _fail(record, f"{name} is missing") from None
    except NotRegularFile as error:
        raise _fail(record, str(error)) from None


def _prefetch(file: BinaryIO) -> None:
    """Ask the kernel for the whole file now: every file of a version is then read from the
    disk at once, in one round trip instead of one readahead window after another."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
