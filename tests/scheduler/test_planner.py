"""The planner alone, on a fake clock: segments, budgets, fairness, deadlines, admission."""

import collections
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import Batch, Row, Scheduler, SchedulerConfig, TenantPolicy
from tests.scheduler.rows import drain as _drain
from tests.scheduler.rows import make_row as _row


def test_batch_groups_rows_into_contiguous_segments() -> None:
    s = Scheduler(SchedulerConfig())
    for i, adapter in enumerate(["b", "a", "b", "c", "a"]):
        s.add(_row(f"t{i % 2}", adapter))
    batch = s.plan(0.0).batch
    assert batch is not None
    assert batch.seg_adapter == ("a", "b", "c")
    assert batch.seg_starts == (0, 2, 4, 5)
    for k, adapter in enumerate(batch.seg_adapter):
        rows = batch.rows[batch.seg_starts[k] : batch.seg_starts[k + 1]]
        assert {r.adapter_key for r in rows} == {adapter}
    assert s.plan(0.0).batch is None and s.num_waiting == 0


def test_every_step_respects_every_budget() -> None:
    config = SchedulerConfig(
        max_batch_tokens=1000,
        max_batch_rows=16,
        max_batch_pages=24,
        contended_batch_tokens=400,
        default_policy=TenantPolicy(max_tokens_per_step=150),
    )
    s = Scheduler(config)
    rng = random.Random(0)
    for i in range(600):
        s.add(_row(f"t{i % 5}", adapter=f"a{rng.randrange(12)}", tokens=rng.randint(3, 120)))
    s.add(_row("giant", tokens=5000))
    ran = 0
    for batch in _drain(s):
        ran += len(batch.rows)
        if len(batch.rows) == 1:
            continue  # a row larger than every budget runs alone
        assert batch.padded_tokens <= 1000
        assert len(batch.rows) <= 16
        pages = {r.adapter_key: r.num_pages for r in batch.rows}
        assert sum(pages.values()) <= 24
        per_tenant: dict[str, list[int]] = {}
        for r in batch.rows:
            per_tenant.setdefault(r.tenant, []).append(r.num_tokens)
        for tokens in per_tenant.values():
            assert len(tokens) == 1 or sum(tokens) <= 150
    assert ran == 601


def test_contended_steps_use_the_smaller_budget() -> None:
    s = Scheduler(SchedulerConfig(max_batch_tokens=4096, contended_batch_tokens=512))
    for _ in range(100):
        s.add(_row("flood", tokens=64))
    assert s.plan(0.0).batch.padded_tokens == 4096  # alone: the full budget
    s.add(_row("small", tokens=64))
    batch = s.plan(0.0).batch
    assert batch.padded_tokens <= 512 and "small" in {r.tenant for r in batch.rows}


@pytest.mark.parametrize("weights", [(1, 1, 1), (1, 2, 4), (3, 1, 1)])
def test_shares_follow_weights_over_ten_thousand_steps(weights) -> None:
    s = Scheduler(SchedulerConfig(max_batch_tokens=512, contended_batch_tokens=512))
    rng = random.Random(1)
    tenants = [f"t{i}" for i in range(len(weights))]
    for tenant, weight in zip(tenants, weights, strict=True):
        s.set_policy(tenant, TenantPolicy(weight=weight, max_queued_rows=10**6))
    served = dict.fromkeys(tenants, 0)
    for step in range(10_000):
        for tenant in tenants:  # keep every tenant backlogged
            while s.num_waiting_for(tenant) < 20:
                s.add(_row(tenant, tokens=rng.randint(8, 64), arrival=step))
        batch = s.plan(float(step)).batch
        for r in batch.rows:
            served[r.tenant] += r.num_tokens
    total = sum(served.values())
    for tenant, weight in zip(tenants, weights, strict=True):
        expected = weight / sum(weights)
        assert abs(served[tenant] / total - expected) < 0.03 * expected + 0.005, served


def test_a_small_request_behind_a_flood_runs_in_the_next_step() -> None:
    s = Scheduler(SchedulerConfig(max_batch_tokens=8192, contended_batch_tokens=1024))
    for i in range(5000):
        s.add(_row("flood", tokens=512, rid=1, index=i))
    assert s.plan(0.0).batch is not None  # the flood is already running
    s.add(_row("small", tokens=12, rid=2))
    assert "small" in {r.tenant for r in s.plan(1.0).batch.rows}


def test_fifo_baseline_lets_a_flood_starve_a_neighbour() -> None:
    s = Scheduler(SchedulerConfig(max_batch_tokens=1024, is_fair=False))
    for i in range(200):
        s.add(_row("flood", tokens=256, rid=1, index=i, arrival=0.0))
    s.add(_row("small", tokens=12, rid=2, arrival=1.0))
    steps_before_small = 0
    for batch in _drain(s):
        if "small" in {r.tenant for r in batch.rows}:
            break
        steps_before_small += 1
    assert steps_before_small >= 40  # it waits for the whole flood: what fairness fixes


def test_expired_rows_are_returned_and_never_run() -> None:
    s = Scheduler(SchedulerConfig(max_batch_rows=1))
    s.add(_row("a", rid=1, deadline=5.0))
    s.add(_row("a", rid=2, deadline=0.5))
    s.add(_row("b", rid=3))
    assert s.next_deadline_in(0.0) == 0.5
    plan = s.plan(1.0)
    assert [r.request_id for r in plan.expired] == [2]
    ran = [plan.batch.rows[0].request_id] + [b.rows[0].request_id for b in _drain(s, 1.0)]
    assert sorted(ran) == [1, 3]
    assert s.counters()["a"].expired_rows == 1


def test_late_rows_are_found_after_the_row_due_first_has_left() -> None:
    """Planning looks for late rows only once the earliest deadline it knows of has passed;
    each look sets that bound anew from every queue, not from the last one it read."""
    s = Scheduler(SchedulerConfig())
    s.add(_row("c", rid=1, deadline=0.5))
    s.add(_row("b", rid=2, deadline=2.0))
    s.add(_row("a", rid=3, deadline=3.0))
    assert s.abort(1) == 1  # the row due first leaves: the bound (0.5) is stale now
    assert s.expire(0.4) == ()  # before the bound: nothing looked at
    assert s.expire(1.0) == ()  # past it: every queue scanned, nothing late yet
    assert s.next_deadline_in(1.0) == 1.0  # b's row, the earliest still waiting
    assert [r.request_id for r in s.expire(2.5)] == [2]
    assert [r.request_id for r in s.expire(3.5)] == [3]
    assert s.next_deadline_in(3.5) is None


def test_abort_removes_waiting_rows() -> None:
    s = Scheduler(SchedulerConfig())
    for i in range(3):
        s.add(_row("t", rid=7, index=i))
    s.add(_row("t", rid=8))
    assert s.abort(7) == 3
    assert s.num_waiting == 1
    batch = s.plan(0.0).batch
    assert [r.request_id for r in batch.rows] == [8]
    assert s.counters()["t"].aborted_rows == 3


def test_padded_tokens_count_the_longest_row() -> None:
    s = Scheduler(SchedulerConfig(max_batch_tokens=300, contended_batch_tokens=None))
    s.add(_row("t", tokens=100))
    for _ in range(5):
        s.add(_row("t", tokens=30))
    batch = s.plan(0.0).batch
    assert len(batch.rows) == 3 and batch.padded_tokens == 300  # 3 x 100, not 100 + 30 + 30


def test_admission_bounds_tenant_and_server_queues() -> None:
    s = Scheduler(
        SchedulerConfig(max_queued_rows=100, default_policy=TenantPolicy(max_queued_rows=30))
    )
    assert s.admit("a", 30).is_admitted
    for i in range(30):
        s.add(_row("a", index=i))
    refused = s.admit("a", 1)
    assert not refused.is_admitted and refused.reason == "tenant" and refused.retry_after_s >= 1
    s.set_policy("b", TenantPolicy(max_queued_rows=1000))
    assert s.admit("b", 70).is_admitted
    for i in range(70):
        s.add(_row("b", index=i))
    overloaded = s.admit("c", 1)
    assert not overloaded.is_admitted and overloaded.reason == "server"
    counters = s.counters()
    assert counters["a"].rejected_requests == 1 and counters["c"].overloaded_requests == 1
    s.record_step(num_rows=10, duration_s=1.0)  # 10 rows/s: 100 rows ahead is about 10 s
    assert s.admit("c", 1).retry_after_s == 10


def test_policy_changes_apply_at_once() -> None:
    s = Scheduler(SchedulerConfig(default_policy=TenantPolicy(max_queued_rows=2)))
    assert not s.admit("a", 3).is_admitted
    s.set_policy("a", TenantPolicy(max_queued_rows=5))
    assert s.admit("a", 3).is_admitted
    s.set_policy("a", None)
    assert not s.admit("a", 3).is_admitted


def test_bad_config_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="max_batch_tokens"):
        SchedulerConfig(max_batch_tokens=0)
    # inf failed later, as bad JSON; 5e-324 made every tenant's virtual tokens infinite
    for bad in (0, -1.0, float("inf"), float("nan"), 5e-324, 1e-4, 1e4):
        with pytest.raises(ValueError, match="weight must be from 0.001 to 1000"):
            TenantPolicy(weight=bad)
    assert TenantPolicy(weight=1e-3).weight == 1e-3 and TenantPolicy(weight=1e3).weight == 1e3


def test_rows_of_very_different_lengths_do_not_share_a_step() -> None:
    s = Scheduler(SchedulerConfig(max_batch_tokens=8192, contended_batch_tokens=None))
    s.add(_row("long", tokens=512))
    s.add(_row("short", tokens=20))
    s.add(_row("short", tokens=24))
    widths = sorted(b.max_tokens for b in _drain(s))
    assert widths == [24, 512]  # the short rows are not padded to 512


def test_packed_steps_mix_lengths_and_budget_real_tokens() -> None:
    """Steps that run unpadded cost their rows' own tokens: no length ratio, and the budget
    counts real tokens (padded, 3 x 512 would be over 600); pages still bound a step."""
    config = SchedulerConfig(max_batch_tokens=600, contended_batch_tokens=None, packed_steps=True)
    s = Scheduler(config)
    for tokens in (512, 20, 24, 60):
        s.add(_row("a", tokens=tokens))
    assert [[r.num_tokens for r in b.rows] for b in _drain(s)] == [[512, 20, 24], [60]]
    s = Scheduler(SchedulerConfig(max_batch_pages=8, contended_batch_tokens=None))
    s.set_packing(True)
    s.add(_row("a", adapter="x", tokens=5, pages=8))
    s.add(_row("b", adapter="y", tokens=5, pages=8))
    assert [len(b.rows) for b in _drain(s)] == [1, 1]  # the second adapter's pages do not fit


def test_what_the_runner_packs_bounds_a_looked_ahead_row() -> None:
    """The 50-token row is too short to share a padded step with a 300; looking past it, the
    other 300 would make 600 real tokens, more than a model's own forward packs (512)."""
    firsts = []
    for packs in (None, 512):
        s = Scheduler(SchedulerConfig(lookahead_rows=8, lookahead_max_tokens=8192))
        if packs is not None:
            s.set_packing(False, packs)
        for tokens in (300, 50, 300):
            s.add(_row("a", tokens=tokens))
        firsts.append([r.num_tokens for r in s.plan(0.0).batch.rows])
    assert firsts == [[300, 300], [300]]


def test_admission_reserves_rows_of_requests_still_being_prepared() -> None:
    s = Scheduler(SchedulerConfig(default_policy=TenantPolicy(max_queued_rows=10)))
    assert s.admit("a", 6).is_admitted
    assert not s.admit("a", 6).is_admitted  # the first request's rows are not queued yet
    s.release("a", 6)  # ...and it failed (e.g. its adapter could not load)
    assert s.admit("a", 6).is_admitted
    for i in range(6):
        s.add(_row("a", index=i))  # queueing consumes the reservation
    assert not s.admit("a", 5).is_admitted and s.admit("a", 4).is_admitted


def test_a_returning_tenant_neither_jumps_nor_waits_behind_history() -> None:
    s = Scheduler(
        SchedulerConfig(
            max_batch_tokens=64,
            contended_batch_tokens=None,
            default_policy=TenantPolicy(max_queued_rows=10**6),
        )
    )
    for i in range(1000):  # b is served alone for a long time
        s.add(_row("b", tokens=32, index=i))
    list(_drain(s))
    for i in range(1000):  # then a floods, alone
        s.add(_row("a", tokens=32, index=i))
    s.plan(0.0)
    s.add(_row("b", tokens=32, rid=999))  # b comes back: served at once, not after a's backlog
    assert "b" in {r.tenant for r in s.plan(0.0).batch.rows}


def test_recent_arrivals_keep_steps_short_even_between_requests() -> None:
    s = Scheduler(
        SchedulerConfig(max_batch_tokens=4096, contended_batch_tokens=256, contention_window_s=1.0)
    )
    s.add(_row("small", tokens=16, arrival=0.0))
    list(_drain(s, 0.0))
    for i in range(100):
        s.add(_row("flood", tokens=64, index=i, arrival=0.5))
    assert s.plan(0.6).batch.padded_tokens <= 256  # small was active 0.6 s ago
    assert s.plan(5.0).batch.padded_tokens > 256  # long idle: the flood gets full steps


def test_plan_between_takes_only_short_rows_of_tenants_outside_the_running_step() -> None:
    s = Scheduler(SchedulerConfig(contended_batch_tokens=None))
    s.add(_row("A", "a", tokens=512))
    running = s.plan(0.0).batch
    assert running is not None
    s.add(_row("A", "a", tokens=20))  # A already has the step: its rows wait for the next
    s.add(_row("B", "b", tokens=30))
    s.add(_row("B", "b", tokens=30))
    s.add(_row("C", "c", tokens=400))  # too long to slip in between two layers
    between = s.plan_between(0.0, running, max_tokens=128, max_pages=None).batch
    assert between is not None
    assert {r.tenant for r in between.rows} == {"B"} and len(between.rows) == 2
    assert s.plan_between(0.0, running, max_tokens=128, max_pages=None).batch is None
    assert s.num_waiting == 2  # A's short row and C's long one stay for regular steps
    rest = [r.tenant for b in _drain(s) for r in b.rows]
    assert sorted(rest) == ["A", "C"]


def test_plan_between_respects_the_pages_left_by_the_running_step() -> None:
    s = Scheduler(SchedulerConfig(max_batch_pages=24))
    s.add(_row("A", "a", tokens=512, pages=16))
    running = s.plan(0.0).batch
    s.add(_row("B", "b", tokens=10, pages=16))
    s.add(_row("C", "c", tokens=10, pages=8))
    between = s.plan_between(0.0, running, max_tokens=128, max_pages=24 - 16).batch
    assert between is not None and [r.tenant for r in between.rows] == ["C"]


def test_fifo_never_interleaves() -> None:
    s = Scheduler(SchedulerConfig(is_fair=False))
    s.add(_row("A", "a", tokens=512))
    running = s.plan(0.0).batch
    s.add(_row("B", "b", tokens=10))
    assert s.plan_between(0.0, running, max_tokens=128, max_pages=None).batch is None
    assert s.num_waiting == 1


def test_plan_between_expires_late_rows_instead_of_running_them() -> None:
    s = Scheduler(SchedulerConfig())
    s.add(_row("A", "a", tokens=512))
    running = s.plan(0.0).batch
    s.add(_row("B", "b", tokens=10, deadline=1.0))
    s.add(_row("C", "c", tokens=10, deadline=9.0))
    plan = s.plan_between(2.0, running, max_tokens=128, max_pages=None)
    assert [r.tenant for r in plan.expired] == ["B"]
    assert plan.batch is not None and [r.tenant for r in plan.batch.rows] == ["C"]


def test_batch_of_makes_a_segment_of_each_run_of_one_key() -> None:
    batch = Batch.of(["a", "a", "b", "a"], [3, 5, 2, 4])
    assert batch.seg_starts == (0, 2, 3, 4) and batch.seg_adapter == ("a", "b", "a")
    assert batch.max_tokens == 5 and [r.index for r in batch.rows] == [0, 1, 2, 3]
    assert [r.num_tokens for r in batch.rows] == [3, 5, 2, 4]
    assert Batch.of([], []).seg_starts == (0,)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "add", "add", "plan", "between", "abort"]),
            st.integers(0, 9),  # request id; its tenant is one of three, by id
            st.one_of(st.none(), st.floats(0.0, 10.0)),  # deadline
        ),
        max_size=60,
    ),
    st.sampled_from([0, 4]),  # lookahead: rows leave from the middle of a queue too
    st.sampled_from([10, 30, 100]),  # row lengths cycle through these, so some never mix
)
def test_every_row_leaves_once_and_abort_counts_what_still_waits(ops, lookahead, longest) -> None:
    s = Scheduler(SchedulerConfig(max_batch_rows=3, lookahead_rows=lookahead))
    waiting: dict[tuple[int, int], Row] = {}  # the model: (request, index) -> row
    next_index: dict[int, int] = {}
    gone: list[tuple[int, int]] = []
    for clock, (op, rid, deadline) in enumerate(ops):
        now = clock * 0.5
        if op == "add":
            tenant = "abc"[rid % 3]
            index = next_index.get(rid, 0)
            next_index[rid] = index + 1
            tokens = (2, 10, longest)[clock % 3]
            row = _row(tenant, tokens=tokens, rid=rid, index=index, arrival=now, deadline=deadline)
            waiting[(rid, index)] = row
            s.add(row)
        elif op == "abort":
            mine = [key for key in waiting if key[0] == rid]
            assert s.abort(rid) == len(mine)
            for key in mine:
                del waiting[key]
            gone.extend(mine)
        else:
            if op == "plan":
                plan = s.plan(now)
            else:
                running = Batch.of(["x"], [10], tenant="a")  # a's rows wait it out
                plan = s.plan_between(now, running, max_tokens=100, max_pages=None)
            left = list(plan.expired) + (list(plan.batch.rows) if plan.batch else [])
            if plan.batch is not None:  # looked-ahead rows keep the length ratio too
                lengths = [r.num_tokens for r in plan.batch.rows]
                assert len(plan.batch.rows) <= 3 and max(lengths) <= 4 * min(lengths)
            for row in left:
                key = (row.request_id, row.index)
                assert key in waiting  # never run or expired twice, never after an abort
                gone.append(key)
                del waiting[key]
            for row in plan.expired:
                assert row.deadline_s is not None and row.deadline_s < now
            # and every late row did expire: the planner scans only once its bound passed
            assert all(r.deadline_s is None or r.deadline_s >= now for r in waiting.values())
        due = [r.deadline_s for r in waiting.values() if r.deadline_s is not None]
        told = s.next_deadline_in(now)
        if due:  # never later than the earliest waiting deadline: no late row is missed
            assert told is not None and told <= max(0.0, min(due) - now)
        elif not waiting:
            assert told is None
        assert s.num_waiting == len(waiting)
        # the per-request index forgets a request once nothing of it waits (no leak)
        assert s._waiting_of == dict(collections.Counter(rid for rid, _ in waiting))
    assert len(gone) == len(set(gone))
