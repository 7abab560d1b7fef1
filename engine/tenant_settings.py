"""Per-tenant scheduling overrides: stored in the registry, applied to the live scheduler."""

import asyncio
import dataclasses
import logging
from collections.abc import Collection
from typing import Any

from engine.config import EngineConfig
from registry import Registry
from scheduler import Scheduler, SchedulerConfig, TenantPolicy, with_stored_weight_in_range

log = logging.getLogger(__name__)


def scheduler_config(config: EngineConfig) -> SchedulerConfig:
    """The scheduler's configuration, derived once from the engine's."""
    return SchedulerConfig(
        max_batch_tokens=config.max_batch_tokens,
        max_batch_rows=config.max_batch_rows,
        max_batch_pages=config.adapter_pages,
        contended_batch_tokens=config.contended_budget_tokens,
        lookahead_rows=config.lookahead_budget_rows,
        lookahead_max_tokens=config.lookahead_max_tokens,
        max_queued_rows=config.max_queued_rows,
        default_policy=TenantPolicy(
            max_queued_rows=config.tenant_max_queued_rows,
            max_tokens_per_step=config.tenant_max_tokens_per_step,
        ),
        is_fair=config.is_fair,
    )


def policy_from_settings(
    defaults: TenantPolicy, settings: dict[str, Any], changing: Collection[str] = ()
) -> TenantPolicy:
    """A tenant's policy: the defaults with its stored fields replaced (ValueError if bad).
    A stored weight out of today's range and not among the fields ``changing`` now is served
    at the nearest bound (``with_stored_weight_in_range``); a new one is refused."""
    known = {f.name for f in dataclasses.fields(TenantPolicy)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known: {sorted(known)}")
    return dataclasses.replace(defaults, **with_stored_weight_in_range(settings, changing))


_CLASS_DEFAULTS = TenantPolicy()


def with_server_defaults(policy: TenantPolicy, defaults: TenantPolicy) -> TenantPolicy:
    """``policy`` with each field it leaves at TenantPolicy's default taken from ``defaults``."""
    given = {
        f.name: getattr(policy, f.name)
        for f in dataclasses.fields(TenantPolicy)
        if getattr(policy, f.name) != getattr(_CLASS_DEFAULTS, f.name)
    }
    return dataclasses.replace(defaults, **given)


@dataclasses.dataclass(frozen=True, slots=True)
class _Stored:
    """The registry's settings, read at once: their stamp, every override, every tenant's
    creation stamp."""

    stamp: tuple[int, float, int, float]
    settings: dict[str, dict[str, Any]]
    born: dict[str, float]


class TenantSettings:
    """Keeps the scheduler's per-tenant policies equal to what the registry stores.

    The CLI (``graft tenants set``) or another engine may change them at any time; ``watch``
    polls a cheap stamp and reloads on change, so no restart is needed.
    """

    def __init__(self, registry: Registry, scheduler: Scheduler, defaults: TenantPolicy) -> None:
        self._registry = registry
        self._scheduler = scheduler
        self._defaults = defaults
        self._stamp: tuple[int, float, int, float] | None = None
        self._born: dict[str, float | None] = {}  # each tenant's stamp when last applied
        self._writes = 0  # this engine's own writes of settings

    def set(self, tenant: str, policy: TenantPolicy | None) -> None:
        """Store and apply at once; None removes the override. A field ``policy`` leaves at
        TenantPolicy's own default takes the server's (``TenantPolicy(weight=2)`` must not
        lift a ``tenant_max_queued_rows`` the operator set)."""
        if policy is None:
            self._registry.set_tenant_settings(tenant, None)
        else:
            policy = with_server_defaults(policy, self._defaults)
            changed = {
                f.name: getattr(policy, f.name)
                for f in dataclasses.fields(TenantPolicy)
                if getattr(policy, f.name) != getattr(self._defaults, f.name)
            }
            self._registry.set_tenant_settings(tenant, changed)
        self._scheduler.set_policy(tenant, policy)
        # reload at the next poll: a reset by the CLI before it would bring the stamp back to
        # the one kept, and the override applied here would stay for good
        self._stamp = None
        self._writes += 1

    def update(self, tenant: str, changes: dict[str, Any]) -> None:
        """Merge ``changes`` into the tenant's stored overrides (as ``graft tenants set``
        does) and apply the result: values equal to any default are kept as given."""

        def policy(merged: dict[str, Any]) -> TenantPolicy:
            return policy_from_settings(self._defaults, merged, changing=changes)

        merged = self._registry.update_tenant_settings(tenant, changes, check=policy)
        self._scheduler.set_policy(tenant, policy(merged))
        self._stamp = None  # as in set
        self._writes += 1

    def apply(self) -> None:
        """Load every stored override into the scheduler; bad ones are logged and skipped."""
        self._apply(self._writes, self._read())

    def _read(self) -> _Stored:
        """What `_apply` takes, read together: on a thread of its own while serving (with
        many tenants the reads scan tables, which the event loop must not wait for)."""
        stamp = self._registry.settings_stamp()
        return _Stored(stamp, self._registry.tenant_settings(), self._registry.tenant_stamps())

    def _apply(self, writes: int, stored: _Stored) -> None:
        # a write of this engine's since the read started: its stamp is not the one to keep
        self._stamp = stored.stamp if writes == self._writes else None
        self._forget_gone_tenants(stored.born)
        for tenant in self._scheduler.policy_overrides():
            if tenant not in stored.settings:
                self._scheduler.set_policy(tenant, None)
        for tenant, settings in stored.settings.items():
            try:
                policy = policy_from_settings(self._defaults, settings)
            except (TypeError, ValueError) as exc:
                log.error("ignoring bad scheduling settings of tenant %s: %s", tenant, exc)
                continue
            if "weight" in settings and policy.weight != settings["weight"]:
                log.warning(
                    "tenant %s: its stored weight %s is outside what graft takes now; "
                    "served as %s (graft tenants set %s --weight W stores a new one)",
                    tenant,
                    settings["weight"],
                    policy.weight,
                    tenant,
                )
            self._scheduler.set_policy(tenant, policy)

    def _forget_gone_tenants(self, born: dict[str, float]) -> None:
        """Drop the scheduler's counters and place of tenants deleted, or deleted and made
        again, since the last look: /metrics listed a deleted tenant for good, and one made
        again under its name carried on from its counts. One with rows still queued (they
        fail as its requests end) keeps its old stamp, to be tried again at the next poll."""
        kept: dict[str, float | None] = dict(born)
        for tenant in self._scheduler.tenants():
            now = born.get(tenant)
            before = self._born.get(tenant, now)
            if (now is None or before != now) and not self._scheduler.forget(tenant):
                kept[tenant] = before
                self._stamp = None
        self._born = kept

    async def watch(self, poll_s: float) -> None:
        """Re-apply whenever the stored settings change; runs until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(poll_s)
            try:
                writes = self._writes
                stamp = await loop.run_in_executor(None, self._registry.settings_stamp)
                if stamp != self._stamp:
                    self._apply(writes, await loop.run_in_executor(None, self._read))
            except Exception:  # a briefly locked catalog must not stop serving
                log.exception("reading tenant settings failed; keeping the current ones")
