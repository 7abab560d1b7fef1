"""Root in another user's registry: refused, as git refuses a repository of another owner.

A service account owns its registry; an operator may still run ``sudo graft adapters import``
there. Whatever root creates belongs to root, so the service could then neither rename into a
new name's directory, nor remove a deleted version, nor open the registry once root had set a
leftover aside. Handing each creation back to the owner (as SQLite does for its log) would
still leave root creating, renaming and chowning through directories that user controls,
where a swapped-in symlink sends the work elsewhere. So graft run as root opens only a
registry root owns, and says how to go on.
"""

import os
import pwd
from pathlib import Path

from registry.errors import RegistryError


def refuse_another_users(root: Path) -> None:
    """RegistryError where this process is root and ``root`` exists, owned by another user."""
    if os.geteuid() != 0 or not root.exists():
        return
    uid = root.stat().st_uid
    if uid == 0:
        return
    try:
        user = sudo_user = pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid with no name here (a container's volume): sudo takes '#uid'
        user, sudo_user = f"uid {uid}", f"'#{uid}'"
    raise RegistryError(
        f"the registry {root} belongs to {user}, not root: what root wrote there, {user} could "
        f"not change, and root would be working in directories {user} controls. Run graft as "
        f"that user (sudo -u {sudo_user} graft ...), or give the registry to root "
        f"(chown -R root {root})"
    )
