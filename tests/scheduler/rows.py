"""Rows and a drain loop for the planner's tests."""

import itertools

from scheduler import Row, Scheduler

_ids = itertools.count(1)


def make_row(
    tenant: str,
    adapter: str = "a",
    tokens: int = 10,
    *,
    rid: int | None = None,
    index: int = 0,
    arrival: float = 0.0,
    deadline: float | None = None,
    pages: int = 8,
) -> Row:
    return Row(
        request_id=next(_ids) if rid is None else rid,
        index=index,
        tenant=tenant,
        adapter_key=adapter,
        num_tokens=tokens,
        arrival_s=arrival,
        num_pages=pages,
        deadline_s=deadline,
    )


def drain(s: Scheduler, now: float = 0.0):
    while (batch := s.plan(now).batch) is not None:
        yield batch
