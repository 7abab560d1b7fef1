"""The planner looking past a tenant's head, and its heap of tenants against a plain scan."""

import collections

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import Batch, Row, Scheduler, SchedulerConfig, TenantPolicy
from scheduler.forming import first_fit
from tests.scheduler.rows import drain as _drain
from tests.scheduler.rows import make_row as _row


def test_a_step_looks_past_a_head_of_another_length_and_the_head_leads_the_next() -> None:
    lengths = [10, 100, 12, 90, 11, 95, 9, 120] * 4  # one tenant, alternating in arrival order

    def steps(lookahead: int) -> list[list[int]]:
        s = Scheduler(SchedulerConfig(contended_batch_tokens=None, lookahead_rows=lookahead))
        for i, tokens in enumerate(lengths):
            s.add(_row("acme", tokens=tokens, arrival=i))
        return [sorted(r.num_tokens for r in b.rows) for b in _drain(s)]

    assert len(steps(0)) == 32  # the head only: each step closes at the first misfit
    looked = steps(64)
    assert len(looked) == 2
    assert looked[0] == sorted(t for t in lengths if t < 20)  # the head (10) led: short rows
    assert looked[1] == sorted(t for t in lengths if t >= 90)
    assert 2 < len(steps(3)) < 32  # a window of 3 rows: fewer rows found a step than with 64


def test_a_head_looked_past_leads_the_next_step_even_when_tenants_tie() -> None:
    """Two tenants of 100 closed-loop clients each, served alike, tie in the planner's heap
    at every step, and the one that connected first is popped first. The other's long head
    (512 tokens) cannot share a step with 16-token rows, and its later rows kept running
    past it through lookahead: the head waited until its deadline, 3,000 steps later."""
    s = Scheduler(SchedulerConfig(lookahead_rows=64, contended_batch_tokens=None))
    now = 0.0
    for _ in range(100):
        s.add(_row("B", tokens=16, arrival=now, deadline=now + 60))
    s.add(_row("A", tokens=512, arrival=now, deadline=now + 60))
    for _ in range(99):
        s.add(_row("A", tokens=16, arrival=now, deadline=now + 60))
    ran_at = None
    for step in range(1, 50):
        now += 0.02
        plan = s.plan(now)
        assert not plan.expired
        if any(r.num_tokens == 512 for r in plan.batch.rows):
            ran_at = step
            break
        for row in plan.batch.rows:  # each client sends again once answered
            s.add(_row(row.tenant, tokens=16, arrival=now, deadline=now + 60))
    assert ran_at is not None and ran_at <= 2, ran_at


def test_a_head_looked_past_gives_its_tenant_no_lead_in_interludes() -> None:
    """An interlude's budget may never fit the long head its tenant's later rows were found
    past: leading there, the tenant took a short row first in every interlude, whatever its
    counters, until a regular step ran the head."""
    s = Scheduler(SchedulerConfig(contended_batch_tokens=None, lookahead_rows=64))
    s.set_policy("B", TenantPolicy(weight=10.0))  # B's rows cost its counter a tenth
    s.add(_row("A", tokens=200))
    for _ in range(20):
        s.add(_row("A", tokens=12))
    running = Batch.of(["c"], [300], tenant="C")
    first = s.plan_between(0.0, running, max_tokens=24, max_pages=None).batch
    assert [r.num_tokens for r in first.rows] == [12, 12]  # A's head (200) looked past
    for _ in range(20):
        s.add(_row("B", tokens=12))
    taken = collections.Counter()
    for _ in range(6):
        plan = s.plan_between(0.0, running, max_tokens=24, max_pages=None)
        taken.update(r.tenant for r in plan.batch.rows)
    assert taken["B"] >= 10, taken  # by the counters; A, leading, took one row of every two


def test_rows_found_past_the_head_keep_the_step_within_its_real_token_cap() -> None:
    s = Scheduler(
        SchedulerConfig(contended_batch_tokens=None, lookahead_rows=64, lookahead_max_tokens=100)
    )
    for i, tokens in enumerate([40, 200, 30, 30, 30, 30]):
        s.add(_row("acme", tokens=tokens, arrival=i))
    first = [r.num_tokens for r in s.plan(0.0).batch.rows]
    assert sorted(first) == [30, 30, 40]  # 40 + 30 + 30 = 100 real tokens; a fourth would pass
    assert [r.num_tokens for r in s.plan(0.0).batch.rows] == [200]  # the head leads, alone
    with pytest.raises(ValueError, match="lookahead_max_tokens"):
        SchedulerConfig(lookahead_max_tokens=0)


class _ScanningScheduler(Scheduler):
    """The fair filler as first written, a scan of every waiting tenant per row (with a head
    looked past leading the step): the spec the heap-based filler must match batch for batch."""

    def _fill_fair(self, forming, exclude=None, *, lead=False) -> None:
        blocked, step_tokens, misfits = set(exclude or ()), {}, {}
        order = {tenant: i for i, tenant in enumerate(self._active)}
        lead = self._lead(blocked) if lead and not forming.rows else None
        while not forming.is_full:
            waiting = [t for t in self._active if t not in blocked]
            if not waiting:
                return
            tenant = lead if lead in waiting else None
            tenant = tenant or min(
                waiting,
                key=lambda t: (
                    self._tenants[t].virtual_tokens,
                    len(self._tenants[t].queue),
                    order[t],
                ),
            )
            lead = None
            state, policy = self._tenants[tenant], self.policy(tenant)
            used = step_tokens.get(tenant, 0)
            cap = policy.max_tokens_per_step
            index = first_fit(state.queue, forming, misfits, tenant, cap, used, self._config)
            if index is None:
                blocked.add(tenant)
                continue
            row = state.queue[index]
            if index > 0:
                self._bypassed.setdefault(tenant, state.queue[0])
            elif self._bypassed.get(tenant) is row:
                del self._bypassed[tenant]
            del state.queue[index]
            forming.add(row)
            self._virtual_now = max(self._virtual_now, state.virtual_tokens)
            state.virtual_tokens += row.num_tokens / policy.weight
            step_tokens[tenant] = used + row.num_tokens
            if not state.queue:
                self._settle(tenant)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 4),  # tenant
            st.integers(0, 2),  # adapter of that tenant
            st.sampled_from([3, 9, 19, 34, 60, 186]),  # tokens
            st.sampled_from([4, 8, 64]),  # pages
        ),
        min_size=1,
        max_size=80,
    ),
    st.sampled_from([0, 8, 64]),  # lookahead
    st.sampled_from([None, 40]),  # tenant t1's per-step token cap
    st.sampled_from([2.0, 0.5]),  # tenant t2's weight
)
def test_the_heap_filler_forms_the_same_steps_as_a_scan(rows, lookahead, cap, weight) -> None:
    def steps(cls) -> list[list[tuple[int, int]]]:
        config = SchedulerConfig(
            max_batch_tokens=600, max_batch_rows=12, max_batch_pages=100, lookahead_rows=lookahead
        )
        s = cls(config)
        s.set_policy("t1", TenantPolicy(max_tokens_per_step=cap))
        s.set_policy("t2", TenantPolicy(weight=weight))
        for i, (tenant, adapter, tokens, pages) in enumerate(rows):
            row = Row(
                request_id=i + 1,
                index=0,
                tenant=f"t{tenant}",
                adapter_key=f"t{tenant}/a{adapter}",
                num_tokens=tokens,
                arrival_s=float(i),
                num_pages=pages,
                deadline_s=None,
            )
            s.add(row)
        return [[(r.request_id, r.index) for r in batch.rows] for batch in _drain(s)]

    assert steps(Scheduler) == steps(_ScanningScheduler)
