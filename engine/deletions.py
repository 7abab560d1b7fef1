"""Deletions made elsewhere reach this engine's memory.

A version deleted by this server's own HTTP route is forgotten at once (`Engine.forget`). One
deleted by the CLI, by an embedder's registry call or by another server on the same registry
is unreachable from the next request on (every request resolves through the catalog), but its
weights would stay in host and device memory until evicted. The watch polls the registry's
deletions, by stamp, and forgets the resident versions among them.
"""

import asyncio
import logging
from collections.abc import Callable

from registry import Registry
from registry.deletion import name_key

log = logging.getLogger(__name__)


class DeletionWatch:
    def __init__(self, registry: Registry, forget_where: Callable[[Callable[[str], bool]], None]):
        self._registry = registry
        self._forget_where = forget_where  # drops every resident key the predicate accepts
        self._stamp = registry.deletion_stamp()

    def check(self) -> None:
        stamp, deleted = self._registry.deletions_since(self._stamp)
        if deleted:
            self._forget_where(lambda key: _deleted_pair(key) in deleted)
        self._stamp = stamp  # only once forgotten: a failure is tried again next time

    async def watch(self, poll_s: float) -> None:
        """Check every ``poll_s`` seconds; runs until cancelled."""
        while True:
            await asyncio.sleep(poll_s)
            try:
                self.check()
            except Exception:  # a briefly locked catalog must not stop serving
                log.exception("reading the registry's deletions failed; trying again later")


def _deleted_pair(key: str) -> tuple[str, int]:
    """``tenant/name@version`` (engine.adapter_store.adapter_key) as deleted_versions holds it."""
    ref, _, version = key.rpartition("@")
    tenant, _, name = ref.partition("/")
    return name_key(tenant, name), int(version)
