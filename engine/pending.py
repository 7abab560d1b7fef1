"""Requests in flight, as the step loop sees them: whose rows, which pins, where answers go."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from engine.inputs import Tokenized
from engine.job import BaseJob, Job, Prediction
from engine.runner import RowOutput
from registry import AdapterRecord
from scheduler import Row


class Pending(Protocol):
    """A request whose rows are queued or running."""

    @property
    def job(self) -> "BaseJob[Any]":  # Job or MultiJob
        ...

    @property
    def tokens(self) -> Tokenized: ...

    @property
    def keys(self) -> tuple[str, ...]:
        """Adapter keys pinned in the host tier while the request lives."""
        ...

    def deliver(self, rows: Sequence[Row], outputs: Sequence[RowOutput]) -> None:
        """Turn this request's rows of one step into answers."""
        ...


@dataclass(slots=True)
class SinglePending:
    """A one-model request: every row is that model's, every output its probabilities."""

    job: Job
    record: AdapterRecord
    keys: tuple[str, ...]  # the adapter's resolved identity, pinned while pending
    tokens: Tokenized

    def deliver(self, rows: Sequence[Row], outputs: Sequence[RowOutput]) -> None:
        for row, probs in zip(rows, outputs, strict=True):
            if not isinstance(probs, np.ndarray):
                raise TypeError(f"row {row.index} of {self.job.model} came back without a head")
            self.job.deliver(self._prediction(row.index, probs))

    def _prediction(self, index: int, probs: np.ndarray) -> Prediction:
        labels = self.record.labels
        return Prediction(
            index=index,
            label=labels[int(probs.argmax())],
            scores=dict(zip(labels, probs.tolist(), strict=True)),  # 2x faster than float(p)
            truncated=self.tokens.truncated[index],
            num_tokens=len(self.tokens.ids[index]),
        )


@dataclass(slots=True)
class StepPart:
    """One request's rows of a step, with their outputs, in step order."""

    pending: Pending
    rows: list[Row]
    outputs: list[RowOutput]


def by_request(
    rows: Sequence[tuple[Pending | None, Row]], outputs: Sequence[RowOutput]
) -> list[StepPart]:
    """A step's rows grouped by request (rows of finished requests dropped), so a request
    turns all of its rows of the step into answers at once."""
    parts: dict[int, StepPart] = {}
    for (pending, row), output in zip(rows, outputs, strict=True):
        if pending is None:
            continue
        part = parts.setdefault(id(pending), StepPart(pending, [], []))
        part.rows.append(row)
        part.outputs.append(output)
    return list(parts.values())
