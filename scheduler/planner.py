"""Virtual token counters over tenants under step budgets: the fair batch former."""

import dataclasses
import heapq
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from scheduler.batch import Batch, Plan, Row
from scheduler.forming import Forming, first_fit
from scheduler.policy import ADMITTED, Admission, TenantPolicy


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_batch_tokens: int = 8192  # padded tokens (rows x longest row) per step, or real ones
    # with packed_steps
    max_batch_rows: int = 128  # rows per step, whatever their length
    max_batch_pages: int | None = None  # adapter pool pages the step's adapters may take
    contended_batch_tokens: int | None = 512  # step budget while several tenants are active
    contention_window_s: float = 1.0  # a tenant that sent rows this recently counts as active
    # rows of a tenant's queue a step looks through for ones that fit (0: the head only)
    lookahead_rows: int = 0
    # a row found past its tenant's head joins only while the step's real (unpadded) tokens
    # stay within this; None: no such limit
    lookahead_max_tokens: int | None = None
    max_queued_rows: int = 8192  # rows waiting server-wide before new requests get 503
    # steps run unpadded (the CPU engine packs them, each row attending apart): a row costs
    # its own tokens, so step budgets count real tokens and rows of any lengths share a step
    packed_steps: bool = False
    default_policy: TenantPolicy = field(default_factory=TenantPolicy)
    is_fair: bool = True  # False: one FIFO across tenants (the baseline fairness is measured by)

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_batch_rows", "max_queued_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lookahead_rows < 0:
            raise ValueError(f"lookahead_rows must be >= 0, got {self.lookahead_rows}")
        if self.lookahead_max_tokens is not None and self.lookahead_max_tokens < 1:
            raise ValueError(f"lookahead_max_tokens must be >= 1, got {self.lookahead_max_tokens}")
        for name in ("max_batch_pages", "contended_batch_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass(slots=True)
class TenantCounters:
    """What happened to one tenant's rows: the numbers fairness is judged by."""

    admitted_rows: int = 0  # queued (a request refused after admission counts none)
    rejected_requests: int = 0  # 429: its own queue was full
    overloaded_requests: int = 0  # 503: the server's queues were full
    expired_rows: int = 0  # deadline passed before the row could start
    aborted_rows: int = 0  # cancelled or client went away before running
    run_rows: int = 0
    run_tokens: int = 0


@dataclass(slots=True)
class _Tenant:
    queue: deque[Row] = field(default_factory=deque)
    virtual_tokens: float = 0.0  # tokens served divided by weight: lowest goes next
    reserved_rows: int = 0  # admitted but not yet added (the request is tokenizing/loading)
    last_added_s: float = -math.inf  # when rows last arrived: recent arrivals mean contention
    counters: TenantCounters = field(default_factory=TenantCounters)


class Scheduler:
    """Per-tenant FIFO queues served by virtual token counters (S-LoRA's VTC), weighted.

    Each step: rows past their deadline are expired; then the next row always comes from the
    waiting tenant that has been served the fewest tokens per unit of weight, within its
    per-step token budget and the batch's token (padded, or real with ``packed_steps``), row
    and page budgets. A tenant that
    comes back after idling starts level with the least-served waiting tenant, so idle time
    banks no credit. While several tenants wait, the step budget shrinks to
    ``contended_batch_tokens`` so that no step, and no neighbour's wait, grows long.
    A row longer than every budget still runs, alone, so nothing waits forever.
    """

    def __init__(self, config: SchedulerConfig) -> None:
        self._config = config
        self._tenants: dict[str, _Tenant] = {}
        self._active: OrderedDict[str, None] = OrderedDict()  # tenants with waiting rows
        self._policies: dict[str, TenantPolicy] = {}
        self._num_waiting = 0
        # request id -> its rows still waiting: a finished request (nearly every abort call)
        # is found to have none without a scan of every queue
        self._waiting_of: dict[int, int] = {}
        self._num_reserved = 0
        self._virtual_now = 0.0  # the counter of the last row served: where newcomers start
        self._rows_per_s = 0.0  # recent step throughput, for Retry-After hints
        # tenant -> its head row, which a step looked past to take a later row: it leads the
        # next step, or tenants tied in the heap could pass it over until its deadline
        self._bypassed: dict[str, Row] = {}
        # no waiting row is due before this (a bound, exact after each scan): a plan looks
        # for late rows only once it has passed, not through every queue every step
        self._deadline_floor = math.inf

    # policies and admission ---------------------------------------------------------------

    def set_policy(self, tenant: str, policy: TenantPolicy | None) -> None:
        """Override (or with None, reset to the default) one tenant's policy, effective now."""
        if policy is None:
            self._policies.pop(tenant, None)
        else:
            self._policies[tenant] = policy

    @property
    def packed_steps(self) -> bool:
        return self._config.packed_steps

    def set_packing(self, packed_steps: bool, pack_max_tokens: int = 0) -> None:
        """What the runner does with steps, known once the model has loaded (a backbone may
        fail the packing checks): whether every step with padding runs unpadded
        (``SchedulerConfig.packed_steps``), and how many real tokens it packs at most, which
        bounds a looked-ahead row (``lookahead_max_tokens``) where packing is on."""
        lookahead = self._config.lookahead_max_tokens
        if lookahead is not None and pack_max_tokens > 0:
            lookahead = min(lookahead, pack_max_tokens)
        self._config = dataclasses.replace(
            self._config, packed_steps=packed_steps, lookahead_max_tokens=lookahead
        )

    @property
    def default_policy(self) -> TenantPolicy:
        return self._config.default_policy

    @property
    def max_queued_rows(self) -> int:
        """Rows that may wait server-wide."""
        return self._config.max_queued_rows

    def policy_overrides(self) -> list[str]:
        """Tenants with a policy of their own."""
        return list(self._policies)

    def policy(self, tenant: str) -> TenantPolicy:
        return self._policies.get(tenant, self._config.default_policy)

    def admit(self, tenant: str, num_rows: int) -> Admission:
        """Decide, before any work is spent on it, whether a request may queue.

        An admitted request reserves its rows at once, so concurrent requests that are still
        tokenizing or loading count against the bounds; ``add`` turns the reservation into
        queued rows, ``release`` returns what a failed request never added.
        """
        state = self._tenant(tenant)
        tenant_rows = len(state.queue) + state.reserved_rows
        if tenant_rows + num_rows > self.policy(tenant).max_queued_rows:
            state.counters.rejected_requests += 1
            return Admission(False, "tenant", self._retry_after(tenant_rows))
        server_rows = self._num_waiting + self._num_reserved
        if server_rows + num_rows > self._config.max_queued_rows:
            state.counters.overloaded_requests += 1
            return Admission(False, "server", self._retry_after(server_rows))
        state.reserved_rows += num_rows
        self._num_reserved += num_rows
        return ADMITTED

    def release(self, tenant: str, num_rows: int) -> None:
        """Give back reserved rows of an admitted request that failed before queueing them."""
        state = self._tenant(tenant)
        released = min(num_rows, state.reserved_rows)
        state.reserved_rows -= released
        self._num_reserved -= released

    def record_step(self, num_rows: int, duration_s: float) -> None:
        """Feed the throughput estimate behind Retry-After (exponential moving average)."""
        if duration_s > 0:
            rate = num_rows / duration_s
            self._rows_per_s = (
                rate if self._rows_per_s == 0 else 0.8 * self._rows_per_s + 0.2 * rate
            )

    def _retry_after(self, rows_ahead: int) -> float:
        if self._rows_per_s <= 0:
            return 1.0
        return float(min(60, max(1, math.ceil(rows_ahead / self._rows_per_s))))

    # queues -------------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    def num_waiting_for(self, tenant: str) -> int:
        state = self._tenants.get(tenant)
        return len(state.queue) if state else 0

    def next_deadline_in(self, now_s: float) -> float | None:
        """Seconds until the earliest waiting deadline (0 if one has passed), or None when
        no waiting row has one. At most that: once a row due first has left, this may come
        early; the ``expire`` it prompts finds the exact next one."""
        if not self._num_waiting or self._deadline_floor == math.inf:
            return None
        return max(0.0, self._deadline_floor - now_s)

    def counters(self) -> dict[str, TenantCounters]:
        return {tenant: state.counters for tenant, state in self._tenants.items()}

    def tenants(self) -> list[str]:
        """Every tenant the scheduler keeps counters for."""
        return list(self._tenants)

    def forget(self, tenant: str) -> bool:
        """Drop a tenant's counters and fair-share place (it was deleted); False, keeping
        them, while it has rows waiting or reserved."""
        state = self._tenants.get(tenant)
        if state is None:
            return True
        if state.queue or state.reserved_rows:
            return False
        del self._tenants[tenant]
        self._bypassed.pop(tenant, None)
        return True

    def add(self, row: Row) -> None:
        """Queue a row (consuming one reserved row of its tenant, if any)."""
        state = self._tenant(row.tenant)
        if row.tenant not in self._active:
            # a newcomer starts level with the least-served waiting tenant, or where service
            # stands now if none waits: idle time banks no credit, and old service no debt
            floor = min((self._tenants[t].virtual_tokens for t in self._active), default=None)
            state.virtual_tokens = max(
                state.virtual_tokens, self._virtual_now if floor is None else floor
            )
            self._active[row.tenant] = None
        if state.reserved_rows:
            state.reserved_rows -= 1
            self._num_reserved -= 1
        state.queue.append(row)
        if row.deadline_s is not None and row.deadline_s < self._deadline_floor:
            self._deadline_floor = row.deadline_s
        state.counters.admitted_rows += 1  # counted when queued: a reservation may be given back
        state.last_added_s = row.arrival_s
        self._num_waiting += 1
        self._waiting_of[row.request_id] = self._waiting_of.get(row.request_id, 0) + 1

    def abort(self, request_id: int) -> int:
        """Drop every waiting row of a request; returns how many were dropped."""
        if self._waiting_of.pop(request_id, None) is None:
            return 0
        removed = 0
        for tenant in list(self._active):
            state = self._tenants[tenant]
            kept = deque(r for r in state.queue if r.request_id != request_id)
            dropped = len(state.queue) - len(kept)
            if dropped:
                state.queue = kept
                state.counters.aborted_rows += dropped
                removed += dropped
                self._settle(tenant)
        self._num_waiting -= removed
        return removed

    # planning -----------------------------------------------------------------------------

    def expire(self, now_s: float) -> tuple[Row, ...]:
        """Take out the rows whose deadline has passed, as planning does, between plans."""
        return self._expire(now_s)

    def plan(self, now_s: float) -> Plan:
        """Expire late rows, then form the next batch (None when nothing can run)."""
        expired = self._expire(now_s)
        budget = self._config.max_batch_tokens
        contended = self._config.contended_batch_tokens
        if self._config.is_fair and contended is not None and self._is_contended(now_s):
            budget = min(budget, contended)
        forming = Forming(self._config, budget)
        if self._config.is_fair:
            self._fill_fair(forming, lead=True)
        else:
            self._fill_fifo(forming)
        self._account(forming.rows)
        return Plan(batch=forming.build(), expired=expired)

    def plan_between(
        self, now_s: float, running: Batch, max_tokens: int, max_pages: int | None
    ) -> Plan:
        """Expire late rows, then form a short batch to run inside the long ``running`` step
        (between two of its encoder blocks), or none.

        Only rows of tenants with nothing in ``running`` qualify (the step already serves the
        others), chosen by the same virtual counters, within ``max_tokens`` tokens (padded
        unless steps run packed; a row longer than that never qualifies) and ``max_pages``
        pool pages beyond those the running step holds. This is what bounds a neighbour's
        wait by one layer of a long step instead of the whole step. The FIFO baseline never
        interleaves.
        """
        if not self._config.is_fair:
            return Plan(batch=None, expired=())
        expired = self._expire(now_s)
        busy = {row.tenant for row in running.rows}
        forming = Forming(self._config, max_tokens, max_pages=max_pages, strict=True)
        self._fill_fair(forming, exclude=busy)
        self._account(forming.rows)
        return Plan(batch=forming.build(), expired=expired)

    def _account(self, rows: list[Row]) -> None:
        for row in rows:
            counters = self._tenants[row.tenant].counters
            counters.run_rows += 1
            counters.run_tokens += row.num_tokens
        self._num_waiting -= len(rows)
        self._left_queue(rows)

    def _left_queue(self, rows: "list[Row] | tuple[Row, ...]") -> None:
        for row in rows:
            left = self._waiting_of[row.request_id] - 1
            if left:
                self._waiting_of[row.request_id] = left
            else:
                del self._waiting_of[row.request_id]

    def _is_contended(self, now_s: float) -> bool:
        """Several tenants wait, or one waits and another sent rows within the window: a
        short request is likely to arrive during this step, so keep the step short."""
        if len(self._active) > 1:
            return True
        window = self._config.contention_window_s
        return any(
            now_s - state.last_added_s <= window
            for tenant, state in self._tenants.items()
            if tenant not in self._active
        )

    def _fill_fair(
        self, forming: Forming, exclude: set[str] | None = None, *, lead: bool = False
    ) -> None:
        """Fill ``forming`` with the row of the least-served waiting tenant, again and again.

        Tenants wait in a heap keyed (virtual tokens, queue length, order among the active):
        only the tenant just served changes its key, so each row costs a pop and a push, not
        a scan of every tenant (with 100 tenants a 94-row plan took 3.2 ms by scanning).
        A tenant none of whose rows fit leaves the heap for the rest of this step.
        """
        skip = exclude or set()
        step_tokens: dict[str, int] = {}
        # per tenant, how many leading rows of its queue were found not to fit this step:
        # each row added only tightens the budgets, so they are not checked again
        misfits: dict[str, int] = {}
        # ``lead``: a head looked past opens the step, where a first row always fits; in an
        # interlude (strict) it might not, and its tenant would only jump the counters
        leader = self._lead(skip) if lead and not forming.rows else None
        heap = [
            (
                -math.inf if t == leader else self._tenants[t].virtual_tokens,
                len(self._tenants[t].queue),
                order,
                t,
            )
            for order, t in enumerate(self._active)
            if t not in skip
        ]
        heapq.heapify(heap)
        while heap and not forming.is_full:
            _, _, order, tenant = heapq.heappop(heap)
            state, policy = self._tenants[tenant], self.policy(tenant)
            cap = policy.max_tokens_per_step
            used = step_tokens.get(tenant, 0)
            index = first_fit(state.queue, forming, misfits, tenant, cap, used, self._config)
            if index is None:
                continue  # blocked for this step
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
            if state.queue:
                heapq.heappush(heap, (state.virtual_tokens, len(state.queue), order, tenant))
            else:
                self._settle(tenant)

    def _lead(self, skip: set[str]) -> str | None:
        """The tenant whose head was looked past longest ago, to open the step; entries whose
        row has left the head (run, aborted or expired) are dropped."""
        lead, oldest = None, math.inf
        for tenant, row in list(self._bypassed.items()):
            state = self._tenants.get(tenant)
            if state is None or not state.queue or state.queue[0] is not row:
                del self._bypassed[tenant]
            elif tenant not in skip and row.arrival_s < oldest:
                lead, oldest = tenant, row.arrival_s
        return lead

    def _fill_fifo(self, forming: Forming) -> None:
        """Oldest row first across all tenants, no per-tenant limits: the unfair baseline."""
        while self._active and not forming.is_full:
            tenant = min(self._active, key=lambda t: self._tenants[t].queue[0].arrival_s)
            head = self._tenants[tenant].queue[0]
            if not forming.fits(head):
                return
            forming.add(self._tenants[tenant].queue.popleft())
            self._settle(tenant)

    def _expire(self, now_s: float) -> tuple[Row, ...]:
        if self._deadline_floor >= now_s:  # no row can be late: no scan
            return ()
        expired: list[Row] = []
        floor = math.inf
        for tenant in list(self._active):
            state = self._tenants[tenant]
            late = [r for r in state.queue if r.deadline_s is not None and r.deadline_s < now_s]
            if late:
                state.queue = deque(
                    r for r in state.queue if r.deadline_s is None or r.deadline_s >= now_s
                )
                state.counters.expired_rows += len(late)
                expired.extend(late)
                self._settle(tenant)
            due = (r.deadline_s for r in state.queue if r.deadline_s is not None)
            floor = min(floor, min(due, default=math.inf))
        self._deadline_floor = floor
        self._num_waiting -= len(expired)
        self._left_queue(expired)
        return tuple(expired)

    def _tenant(self, tenant: str) -> _Tenant:
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _Tenant()
        return state

    def _settle(self, tenant: str) -> None:
        """A tenant with nothing left waiting leaves the set the planner chooses from."""
        if not self._tenants[tenant].queue:
            self._active.pop(tenant, None)
