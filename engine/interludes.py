"""When a long step pauses for an interlude, and the slot a planned one waits in.

engine/step_loop.py says what an interlude is: a short step of other tenants' rows run between
two encoder blocks of a long one.
"""

import threading
from typing import Generic, TypeVar

from scheduler import Batch

T = TypeVar("T")


class InterludeSlot(Generic[T]):
    """Holds at most one planned interlude; the loop offers, the model thread takes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._item: T | None = None

    @property
    def is_empty(self) -> bool:
        with self._lock:
            return self._item is None

    def offer(self, item: T) -> None:
        with self._lock:
            if self._item is not None:
                raise RuntimeError("an interlude is already waiting")
            self._item = item

    def take(self) -> T | None:
        """The waiting interlude, now owned by the caller, or None."""
        with self._lock:
            item, self._item = self._item, None
            return item


def interlude_budget(
    running: Batch, interlude_tokens: int, contended_tokens: int | None, packed: bool = False
) -> int | None:
    """Tokens an interlude may take while ``running`` runs, or None when the step is not to
    be paused: it costs no more than one interlude, or it is a step of short rows no bigger
    than a contended one (``contended_tokens``; None: no such bound).

    Interludes are for a step a neighbour should not wait for whole: one long document, or a
    big step formed while nobody else waited. A step of short rows within the contended budget
    is already short, and pausing it costs every row in it a nested step: a closed loop's
    16-SMS steps (480 tokens) paused for other tenants' SMS split into 6.7-row ones and lost
    7-24% of the rate. Where steps run packed a step costs its rows' own tokens: judged by
    its padded ones, a short SMS beside a 124-token one was paused at every block (its rows
    waited 70-140 ms instead of 20)."""
    cost = running.cost_tokens(packed)
    if interlude_tokens <= 0 or cost <= interlude_tokens:
        return None
    short_rows = running.max_tokens <= interlude_tokens  # max_tokens: its longest row
    if contended_tokens is not None and cost <= contended_tokens and short_rows:
        return None
    return interlude_tokens


def pages_left(running: Batch, pool_pages: int) -> int:
    """Pool pages the running step's adapters leave to an interlude."""
    held = {row.adapter_key: row.num_pages for row in running.rows}
    return max(0, pool_pages - sum(held.values()))
