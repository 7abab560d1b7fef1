"""Round-robin batch former under a padded-token budget."""

from collections import OrderedDict, deque
from dataclasses import dataclass

from scheduler.batch import Batch, Row


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_batch_tokens: int = 8192  # padded tokens (rows x longest row) per step
    max_batch_rows: int = 128  # rows per step, whatever their length
    max_batch_pages: int | None = None  # adapter pool pages the step's adapters may take

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")
        if self.max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {self.max_batch_rows}")
        if self.max_batch_pages is not None and self.max_batch_pages < 1:
            raise ValueError(f"max_batch_pages must be >= 1, got {self.max_batch_pages}")


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
        batch = _Forming(self._config)
        blocked: set[str] = set()
        while len(blocked) < len(self._queues) and not batch.is_full:
            for tenant in list(self._queues):
                if tenant in blocked or batch.is_full:
                    continue
                if not batch.fits(self._queues[tenant][0]):
                    blocked.add(tenant)
                    continue
                batch.add(self._queues[tenant].popleft())
                self._rotate(tenant)
        return batch.build()

    def _rotate(self, tenant: str) -> None:
        """Send the tenant to the back of the round, or drop its empty queue."""
        queue = self._queues.pop(tenant)
        self._set_queue(tenant, queue)

    def _set_queue(self, tenant: str, queue: deque[Row]) -> None:
        if queue:
            self._queues[tenant] = queue
        else:
            self._queues.pop(tenant, None)


class _Forming:
    """The batch being filled: checks each candidate row against every step budget."""

    def __init__(self, config: SchedulerConfig) -> None:
        self._config = config
        self.rows: list[Row] = []
        self._longest = 0
        self._pages: dict[str, int] = {}

    @property
    def is_full(self) -> bool:
        return len(self.rows) >= self._config.max_batch_rows

    def fits(self, row: Row) -> bool:
        """Whether ``row`` joins without breaking a budget; the first row always fits."""
        if not self.rows:
            return True
        width = max(self._longest, row.num_tokens)
        if width * (len(self.rows) + 1) > self._config.max_batch_tokens:
            return False
        limit = self._config.max_batch_pages
        if limit is not None and row.adapter_key not in self._pages:
            return sum(self._pages.values()) + row.num_pages <= limit
        return True

    def add(self, row: Row) -> None:
        self.rows.append(row)
        self._longest = max(self._longest, row.num_tokens)
        self._pages[row.adapter_key] = row.num_pages

    def build(self) -> Batch | None:
        """Sort rows by adapter (stable) and cut them into segments."""
        if not self.rows:
            return None
        ordered = tuple(sorted(self.rows, key=lambda r: r.adapter_key))
        starts = [0]
        adapters: list[str] = []
        for i, row in enumerate(ordered):
            if adapters and row.adapter_key != adapters[-1]:
                starts.append(i)
            if not adapters or row.adapter_key != adapters[-1]:
                adapters.append(row.adapter_key)
        starts.append(len(ordered))
        return Batch(rows=ordered, seg_starts=tuple(starts), seg_adapter=tuple(adapters),
                     max_tokens=self._longest)
