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
from concurrent.futures import Future

from registry import Registry
from registry.deletion import name_key

log = logging.getLogger(__name__)


ForgetWhere = Callable[[Callable[[str], bool]], "Future[None] | None"]


class DeletionWatch:
    def __init__(self, registry: Registry, forget_where: ForgetWhere) -> None:
        self._registry = registry
        # drops every resident key the predicate accepts: the host's now, and returns the
        # model thread's part (the device pool's) as a future, None if there is none
        self._forget_where = forget_where
        self._stamp = registry.deletion_stamp()

    async def check(self) -> None:
        stamp, deleted = self._registry.deletions_since(self._stamp)
        if deleted:
            device = self._forget_where(lambda key: _deleted_pair(key) in deleted)
            if device is not None:
                await asyncio.wrap_future(device)
        self._stamp = stamp  # only once forgotten: a failure is tried again next time

    async def watch(self, poll_s: float) -> None:
        """Check every ``poll_s`` seconds; runs until cancelled."""
        while True:
            await asyncio.sleep(poll_s)
            try:
                await self.check()
            except Exception:  # a briefly locked catalog must not stop serving
                log.exception("reading the registry's deletions failed; trying again later")


def _deleted_pair(key: str) -> tuple[str, int]:
    """``tenant/name@version`` (engine.adapter_store.adapter_key) as deleted_versions holds it."""
    ref, _, version = key.rpartition("@")
    tenant, _, name = ref.partition("/")
    return name_key(tenant, name), int(version)
