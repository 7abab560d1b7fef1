"""The batch being formed: the budgets each candidate row must fit, and which of a tenant's
waiting rows is the next to fit."""

import math
from collections import deque
from typing import TYPE_CHECKING

from scheduler.batch import Batch, Row

if TYPE_CHECKING:
    from scheduler.planner import SchedulerConfig


def first_fit(
    queue: deque[Row],
    forming: "Forming",
    misfits: dict[str, int],
    tenant: str,
    cap: int | None,
    used: int,
    config: "SchedulerConfig",
) -> int | None:
    """The first of the tenant's next ``lookahead_rows`` waiting rows (at least its head)
    that joins the step; ``misfits`` remembers per tenant how many leading rows did not,
    since each row added only tightens the budgets. A row past the head also keeps the
    step's real tokens within ``lookahead_max_tokens``.

    Looking past a head that does not fit keeps a step from closing at the first row of
    another length: with SMS lengths (3 to 186 tokens) in arrival order, a step that stopped
    at the head's first misfit held 3.9 rows on average, whatever was waiting (an H200 ran
    4 rows a step at saturation; ``benchmarks.plan_cost``). A head looked past leads the
    next step (``Scheduler._lead``), so no later row of its tenant can keep it waiting.
    """
    start = misfits.get(tenant, 0)
    end = min(len(queue), max(1, config.lookahead_rows))
    most = config.lookahead_max_tokens
    for index in range(start, end):
        row = queue[index]
        over_cap = cap is not None and used > 0 and used + row.num_tokens > cap
        too_many = index > 0 and most is not None and forming.real_tokens + row.num_tokens > most
        if not over_cap and not too_many and forming.fits(row):
            misfits[tenant] = index
            return index
    misfits[tenant] = end
    return None


# rows whose lengths differ by more than this factor do not share a step
_MAX_PAD_RATIO = 4


class Forming:
    """The batch being filled: checks each candidate row against every step budget."""

    def __init__(
        self,
        config: "SchedulerConfig",
        max_tokens: int,
        *,
        max_pages: int | None = None,
        strict: bool = False,
    ) -> None:
        self._config = config
        self._max_tokens = max_tokens
        self._max_pages = config.max_batch_pages if max_pages is None else max_pages
        self._strict = strict  # even the first row must fit (no lone over-long row)
        self.rows: list[Row] = []
        self.real_tokens = 0  # unpadded
        self._longest = 0
        self._shortest = math.inf
        self._pages: dict[str, int] = {}

    @property
    def is_full(self) -> bool:
        return len(self.rows) >= self._config.max_batch_rows

    def fits(self, row: Row) -> bool:
        """Whether ``row`` joins without breaking a budget; the first row always fits
        unless the batch is strict."""
        if not self.rows and not self._strict:
            return True
        if self._config.packed_steps:  # a row costs its own tokens, whatever its neighbours'
            return self.real_tokens + row.num_tokens <= self._max_tokens and self._has_pages(row)
        width = max(self._longest, row.num_tokens)
        if width * (len(self.rows) + 1) > self._max_tokens:
            return False
        if width > _MAX_PAD_RATIO * min(self._shortest, row.num_tokens):
            return False  # keep short rows out of long rows' steps: padding would swamp them
        return self._has_pages(row)

    def _has_pages(self, row: Row) -> bool:
        limit = self._max_pages
        if limit is not None and row.adapter_key not in self._pages:
            return sum(self._pages.values()) + row.num_pages <= limit
        return True

    def add(self, row: Row) -> None:
        self.rows.append(row)
        self.real_tokens += row.num_tokens
        self._longest = max(self._longest, row.num_tokens)
        self._shortest = min(self._shortest, row.num_tokens)
        self._pages[row.adapter_key] = row.num_pages

    def build(self) -> Batch | None:
        """Sort rows by adapter (stable) and cut them into segments, ordered by rank so that
        adapters of one rank are neighbours (the CPU gather runs one matmul pair per rank)."""
        if not self.rows:
            return None
        ordered = tuple(sorted(self.rows, key=lambda r: (r.num_pages, r.adapter_key)))
        starts = [0]
        adapters: list[str] = []
        for i, row in enumerate(ordered):
            if adapters and row.adapter_key != adapters[-1]:
                starts.append(i)
            if not adapters or row.adapter_key != adapters[-1]:
                adapters.append(row.adapter_key)
        starts.append(len(ordered))
        return Batch(
            rows=ordered,
            seg_starts=tuple(starts),
            seg_adapter=tuple(adapters),
            max_tokens=self._longest,
        )
