"""Round-robin batch former under a padded-token budget."""

from collections import OrderedDict, deque
from dataclasses import dataclass

from scheduler.batch import Batch, Row


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_batch_tokens: int = 8192  # padded tokens (rows x longest row) per step
    max_batch_rows: int = 128  # rows per step, whatever their length

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")
        if self.max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {self.max_batch_rows}")


class Scheduler:
    """Per-tenant FIFO queues, visited round robin, one row per tenant per turn.

    A row longer than the whole budget still runs, alone, so nothing waits forever.
    Fair budgets and deadlines build on this shape later.
    """

    def __init__(self, config: SchedulerConfig) -> None:
        self._config = config
        self._queues: OrderedDict[str, deque[Row]] = OrderedDict()

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def add(self, row: Row) -> None:
        self._queues.setdefault(row.tenant, deque()).append(row)

    def abort(self, request_id: int) -> int:
        """Drop every waiting row of a request; returns how many were dropped."""
        removed = 0
        for tenant in list(self._queues):
            queue = self._queues[tenant]
            kept = deque(r for r in queue if r.request_id != request_id)
            removed += len(queue) - len(kept)
            self._set_queue(tenant, kept)
        return removed

    def plan(self, now_s: float) -> Batch | None:
        """Take the next batch of waiting rows, or None when nothing waits."""
        del now_s  # deadlines arrive with the fair scheduler; the signature is fixed now
        chosen: list[Row] = []
        longest = 0
        blocked: set[str] = set()
        while len(blocked) < len(self._queues) and len(chosen) < self._config.max_batch_rows:
            for tenant in list(self._queues):
                if tenant in blocked or len(chosen) >= self._config.max_batch_rows:
                    continue
                row = self._queues[tenant][0]
                width = max(longest, row.num_tokens)
                if chosen and width * (len(chosen) + 1) > self._config.max_batch_tokens:
                    blocked.add(tenant)
                    continue
                chosen.append(self._queues[tenant].popleft())
                longest = width
                self._rotate(tenant)
        return _group(chosen, longest) if chosen else None

    def _rotate(self, tenant: str) -> None:
        """Send the tenant to the back of the round, or drop its empty queue."""
        queue = self._queues.pop(tenant)
        self._set_queue(tenant, queue)

    def _set_queue(self, tenant: str, queue: deque[Row]) -> None:
        if queue:
            self._queues[tenant] = queue
        else:
            self._queues.pop(tenant, None)


def _group(rows: list[Row], longest: int) -> Batch:
    """Sort rows by adapter (stable) and cut them into segments."""
    ordered = tuple(sorted(rows, key=lambda r: r.adapter_key))
    starts = [0]
    adapters: list[str] = []
    for i, row in enumerate(ordered):
        if not adapters or row.adapter_key != adapters[-1]:
            if adapters:
                starts.append(i)
            adapters.append(row.adapter_key)
    starts.append(len(ordered))
    return Batch(
        rows=ordered, seg_starts=tuple(starts), seg_adapter=tuple(adapters), max_tokens=longest
    )
