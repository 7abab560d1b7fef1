"""Who owns what graft creates in a registry: its root's owner, also when root runs graft.

A service account owns its registry; an operator may still run ``sudo graft adapters import``
there. Whatever root creates belongs to root (directories 0755), so the service could then
neither rename into a new name's directory, nor remove a deleted version, nor open the registry
once root had set a leftover aside. SQLite gives its log files the catalog's owner for the same
reason; this does the same for graft's own files and directories.
"""

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Owner:
    """The user and group that what graft creates must belong to."""

    uid: int
    gid: int


def owner_to_keep(root: Path) -> Owner | None:
    """``root``'s owner, where this process is root and that owner is another user; else None
    (each creation already belongs to the user creating it)."""
    if os.geteuid() != 0:
        return None
    found = root.stat()
    return None if found.st_uid == 0 else Owner(found.st_uid, found.st_gid)


def give(path: Path, owner: Owner | None) -> None:
    """Hand ``path`` (never a link it names) to ``owner``; nothing when None."""
    if owner is not None:
        os.chown(path, owner.uid, owner.gid, follow_symlinks=False)


def give_tree(path: Path, owner: Owner | None) -> None:
    """``give`` for ``path`` and everything below it (links not followed)."""
    if owner is None:
        return
    give(path, owner)
    for parent, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            give(Path(parent, name), owner)


def make_dirs(path: Path, top: Path, owner: Owner | None) -> None:
    """``path.mkdir(parents=True, exist_ok=True)`` for a ``path`` below ``top`` (which exists),
    each directory it creates given to ``owner``."""
    missing = []
    for parent in (path, *path.parents):
        if parent == top or parent.is_dir():
            break
        missing.append(parent)
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:  # another writer made it meanwhile: theirs to own
            continue
        give(directory, owner)
    if not path.is_dir():  # a file where a directory belongs: say so as mkdir does
        path.mkdir(parents=True, exist_ok=True)


def give_catalog(path: Path, owner: Owner | None) -> None:
    """The catalog and the files beside it (SQLite's log and index, graft's change signal), where
    root made them in another user's registry: SQLite hands its log files to the catalog's
    owner, but a catalog root created is root's."""
    if owner is None:
        return
    for name in ("", "-wal", "-shm", "-changes"):
        beside = path.with_name(path.name + name)
        try:
            found = beside.lstat()
        except FileNotFoundError:
            continue
        if (found.st_uid, found.st_gid) != (owner.uid, owner.gid):
            give(beside, owner)
