"""The plain data the planner consumes and produces."""

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Row:
    """One input text of a request: the unit the planner schedules."""

    request_id: int  # engine-assigned, unique while the request lives
    index: int  # position of this input inside its request
    tenant: str  # owner of the request, the unit of fairness
    adapter_key: str  # resolved adapter identity, "tenant/name@version"
    num_tokens: int  # tokenized length including special tokens
    arrival_s: float  # monotonic seconds when the request was admitted
    num_pages: int = 0  # adapter pool pages its adapter takes (its rank); 0 = no LoRA
    deadline_s: float | None = None  # monotonic seconds by which it must start, or never


@dataclass(frozen=True, slots=True)
class Batch:
    """The rows of one engine step, sorted so that each adapter's rows are contiguous and
    segments come in order of adapter rank (``Row.num_pages``).

    Invariant: ``seg_starts[0] == 0``, ``seg_starts[-1] == len(rows)``, and every row in
    ``rows[seg_starts[s]:seg_starts[s + 1]]`` has ``adapter_key == seg_adapter[s]``.
    """

    rows: tuple[Row, ...]
    seg_starts: tuple[int, ...]  # S + 1 row offsets
    seg_adapter: tuple[str, ...]  # S adapter keys, one per segment
    max_tokens: int  # length every row is padded to

    @classmethod
    def of(cls, row_keys: Sequence[str], row_tokens: Sequence[int], tenant: str = "") -> "Batch":
        """Rows in the order given, each run of one adapter key a segment: a batch for driving
        an engine step directly (tests, benchmarks), where the planner would form one."""
        rows: list[Row] = []
        starts: list[int] = []
        keys: list[str] = []
        for i, (key, num_tokens) in enumerate(zip(row_keys, row_tokens, strict=True)):
            if not keys or keys[-1] != key:
                starts.append(i)
                keys.append(key)
            rows.append(Row(0, i, tenant, key, num_tokens, arrival_s=0.0))
        return cls(tuple(rows), (*starts, len(rows)), tuple(keys), max(row_tokens, default=0))

    @property
    def padded_tokens(self) -> int:
        """Tokens the step computes, padding included: what the budget limits."""
        return len(self.rows) * self.max_tokens

    def cost_tokens(self, packed: bool) -> int:
        """Tokens the step computes: its rows' own where steps run packed, else padded."""
        return sum(row.num_tokens for row in self.rows) if packed else self.padded_tokens


@dataclass(frozen=True, slots=True)
class Plan:
    """One planning decision: the batch to run now, and rows whose deadline has passed."""

    batch: Batch | None  # None when nothing can run
    expired: tuple[Row, ...]  # removed from the queues; their requests fail with a timeout
