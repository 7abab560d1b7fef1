"""Per-tenant scheduling policy and the admission decision."""

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

# Shares up to a million to one. A weight of 5e-324 made a tenant's virtual tokens infinite,
# and every tenant's after it, which left the planner ordering tenants by queue length alone
# until a restart (a review session's repro).
MIN_WEIGHT = 1e-3
MAX_WEIGHT = 1e3


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """How much of the backbone one tenant may use; defaults apply to every tenant."""

    weight: float = 1.0  # share of capacity relative to other waiting tenants
    max_tokens_per_step: int | None = None  # tenant's tokens in one step; None = batch budget
    max_queued_rows: int = 1024  # rows waiting before the tenant is told to back off (429)

    def __post_init__(self) -> None:
        # a policy is stored in the registry: a wrong type there would fail every later
        # request of the tenant, in every engine on the registry
        if isinstance(self.weight, bool) or not isinstance(self.weight, int | float):
            raise ValueError(f"tenant weight must be a number, got {self.weight!r}")
        for name in ("max_tokens_per_step", "max_queued_rows"):
            value = getattr(self, name)
            if name == "max_tokens_per_step" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if not MIN_WEIGHT <= self.weight <= MAX_WEIGHT:  # also refuses nan
            raise ValueError(
                f"tenant weight must be from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}, got {self.weight}"
            )
        if self.max_tokens_per_step is not None and self.max_tokens_per_step < 1:
            raise ValueError(f"max_tokens_per_step must be >= 1, got {self.max_tokens_per_step}")
        if self.max_queued_rows < 1:
            raise ValueError(f"max_queued_rows must be >= 1, got {self.max_queued_rows}")


@dataclass(frozen=True, slots=True)
class Admission:
    """Whether a request of ``num_rows`` rows may queue now, and if not, why and when."""

    is_admitted: bool
    reason: str | None  # None, "tenant" (its own queue is full) or "server" (all queues are)
    retry_after_s: float  # a hint for Retry-After; 0 when admitted


ADMITTED = Admission(is_admitted=True, reason=None, retry_after_s=0.0)


def with_stored_weight_in_range(
    settings: dict[str, Any], changing: Collection[str] = ()
) -> dict[str, Any]:
    """``settings`` as stored, with a weight an older graft stored outside MIN_WEIGHT..
    MAX_WEIGHT (and not being changed now) brought to the nearest bound: refused as a whole,
    it took the tenant's other fields with it (a queue bound silently lifted to the
    default). A new value out of range is still refused, by TenantPolicy."""
    weight = settings.get("weight")
    if "weight" in changing or isinstance(weight, bool) or not isinstance(weight, int | float):
        return settings
    if not MIN_WEIGHT <= weight <= MAX_WEIGHT and weight > 0 and weight == weight:
        return {**settings, "weight": min(max(weight, MIN_WEIGHT), MAX_WEIGHT)}
    return settings
