"""Pure, synchronous batch planning: which waiting rows run in the next engine step.

No torch, no asyncio: time is a parameter, so every decision is reproducible in a test.
"""

from scheduler.batch import Batch, Plan, Row
from scheduler.planner import Scheduler, SchedulerConfig, TenantCounters
from scheduler.policy import Admission, TenantPolicy, with_stored_weight_in_range

__all__ = [
    "Admission",
    "Batch",
    "Plan",
    "Row",
    "Scheduler",
    "SchedulerConfig",
    "TenantCounters",
    "TenantPolicy",
    "with_stored_weight_in_range",
]
