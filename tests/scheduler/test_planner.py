"""The planner alone: segments, budgets, round robin, abort."""

import pytest

from scheduler import Row, Scheduler, SchedulerConfig


def _row(rid: int, index: int, tenant: str, adapter: str, tokens: int = 10) -> Row:
    return Row(
        request_id=rid,
        index=index,
        tenant=tenant,
        adapter_key=adapter,
        num_tokens=tokens,
        arrival_s=0.0,
    )


def test_batch_groups_rows_into_contiguous_segments() -> None:
    s = Scheduler(SchedulerConfig())
    for i, adapter in enumerate(["b", "a", "b", "c", "a"]):
        s.add(_row(i, 0, f"t{i % 2}", adapter))
    batch = s.plan(0.0)
    assert batch is not None
    assert batch.seg_adapter == ("a", "b", "c")
    assert batch.seg_starts == (0, 2, 4, 5)
    for k, adapter in enumerate(batch.seg_adapter):
        rows = batch.rows[batch.seg_starts[k] : batch.seg_starts[k + 1]]
        assert {r.adapter_key for r in rows} == {adapter}
    assert s.plan(0.0) is None


def test_padded_token_budget_is_respected_and_long_row_runs_alone() -> None:
    s = Scheduler(SchedulerConfig(max_batch_tokens=100))
    s.add(_row(1, 0, "t", "a", tokens=500))
    for i in range(20):
        s.add(_row(2, i, "u", "a", tokens=10))
    seen = 0
    while (batch := s.plan(0.0)) is not None:
        assert batch.padded_tokens <= 100 or len(batch.rows) == 1
        seen += len(batch.rows)
    assert seen == 21


def test_tenants_alternate_within_a_batch() -> None:
    s = Scheduler(SchedulerConfig(max_batch_rows=4))
    for i in range(10):
        s.add(_row(1, i, "flood", "a"))
    s.add(_row(2, 0, "small", "b"))
    batch = s.plan(0.0)
    assert batch is not None
    assert "small" in {r.tenant for r in batch.rows}


def test_abort_removes_waiting_rows() -> None:
    s = Scheduler(SchedulerConfig())
    for i in range(3):
        s.add(_row(7, i, "t", "a"))
    s.add(_row(8, 0, "t", "a"))
    assert s.abort(7) == 3
    batch = s.plan(0.0)
    assert batch is not None and [r.request_id for r in batch.rows] == [8]


def test_bad_config_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="max_batch_tokens"):
        SchedulerConfig(max_batch_tokens=0)
