"""Pure, synchronous batch planning: which waiting rows run in the next engine step.

No torch, no asyncio: time is a parameter, so every decision is reproducible in a test.
"""

from scheduler.batch import Batch, Row
from scheduler.planner import Scheduler, SchedulerConfig

__all__ = ["Batch", "Row", "Scheduler", "SchedulerConfig"]
