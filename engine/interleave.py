"""Short steps between the layers of a long one: a neighbour waits one layer, not one step.

A step cannot be split by rows (one 512-token row is already the whole step), but an encoder
can pause between two layers. While a long step runs on the model thread, the event loop
plans a short batch of other tenants' rows (``Scheduler.plan_between``) and leaves it in an
``InterludeSlot``; the backbone's layer hook (``StepLora.between_layers``) takes it and runs it
as a complete nested step, then the long step resumes where it paused. At most one interlude
is planned at a time, and none nests inside another.
"""

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.runner import RowOutput
from scheduler import Batch, Row


@dataclass(slots=True)
class Interlude:
    """One short batch: planned on the event loop, run on the model thread, delivered back."""

    batch: Batch
    rows: list[tuple[object, Row]]  # (pending request or None if it went away, row)
    token_ids: list[Sequence[int]]
    outputs: list[RowOutput] = field(default_factory=list)
    error: Exception | None = None
    started_s: float = 0.0
    ended_s: float = 0.0


class InterludeSlot:
    """Holds at most one planned interlude; the loop offers, the model thread takes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._item: Interlude | None = None

    @property
    def is_empty(self) -> bool:
        with self._lock:
            return self._item is None

    def offer(self, item: Interlude) -> None:
        with self._lock:
            if self._item is not None:
                raise RuntimeError("an interlude is already waiting")
            self._item = item

    def take(self) -> Interlude | None:
        """The waiting interlude, now owned by the caller, or None."""
        with self._lock:
            item, self._item = self._item, None
            return item


def interlude_budget(running: Batch, interlude_tokens: int) -> int | None:
    """Padded tokens an interlude may take while ``running`` runs, or None when the running
    step is too short to be worth pausing (under four interludes' worth of tokens)."""
    if interlude_tokens <= 0 or running.padded_tokens < 4 * interlude_tokens:
        return None
    return interlude_tokens


def pages_left(running: Batch, pool_pages: int) -> int:
    """Pool pages the running step's adapters leave to an interlude."""
    held = {row.adapter_key: row.num_pages for row in running.rows}
    return max(0, pool_pages - sum(held.values()))
