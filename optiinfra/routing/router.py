"""
The router's rules: which agent gets a task, what each answer means, when to try
again, and when to give up.

Tasks live in the store and every status change is a compare-and-set there, so
several replicas can route from one PostgreSQL without sending a task twice.
This process keeps only what is about work it has in flight: the calls, their
timers, the outstanding count per agent and the circuit breakers.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Final

import attrs
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    FirstError,
    ensureDeferred,
    gatherResults,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from optiinfra.bounded import bounded
from optiinfra.errors import Conflict, NotFound, Overloaded
from optiinfra.ids import random_id, time_ordered_id
from optiinfra.metrics import LATENCY_BUCKETS
from optiinfra.registry.model import AGENT_TYPES, Agent, AgentQuery
from optiinfra.registry.service import Registry
from optiinfra.routing.admission import RETRY_AFTER, Admission, Backlog
from optiinfra.routing.balancer import Outstanding, pick
from optiinfra.routing.breaker import HALF_OPEN, OPEN, Breakers
from optiinfra.routing.dispatch import (
    Completed,
    Dispatcher,
    Failed,
    Outcome,
    Retryable,
    Throttled,
)
from optiinfra.routing.model import (
    CANCELLED,
    COMPLETED,
    FAILED,
    IN_FLIGHT,
    PENDING,
    QUEUED,
    RETRYING,
    SENT,
    TIMEOUT,
    WAITING,
    Task,
    TaskEvent,
    TaskQuery,
)
from optiinfra.routing.recording import record_until_stored
from optiinfra.store.interface import StoreUnavailable
from optiinfra.store.tasks import Claim, TaskStore
from optiinfra.timefmt import now

_log = structlog.get_logger("optiinfra.routing")

#: Why this process cut a call short.
_DEADLINE: Final = "deadline"
_ATTEMPT: Final = "attempt"
_CANCELLED: Final = "cancelled"
_DRAIN: Final = "drain"

#: The least wait after a busy agent's C{Retry-After}: a C{0} must not make a
#: tight loop of calls.
_MIN_RETRY_AFTER: Final = 0.05
#: Seconds between looks for late or abandoned tasks during dispatch passes.
_SETTLE_EVERY: Final = 0.25
#: Due tasks read beyond the free slots, for tasks that cannot go after all
#: (their agent is busy after all, or offers nothing they ask for).
_SLACK: Final = 8
#: Seconds a pass may reuse the agents read by an earlier one.
_AGENTS_FOR: Final = 1.0
#: Seconds a submission may still use agents read that long ago, while they
#: are read again in the background (past that it leaves the task to a pass).
_AGENTS_STALE: Final = 2 * _AGENTS_FOR


@attrs.frozen
class RouterConfig:
    """The contract's defaults; every one configurable."""

    default_timeout: float = 30.0
    max_timeout: float = 300.0
    default_retries: int = 3
    #: The first back-off; each retry doubles it, with jitter.
    retry_delay: float = 5.0
    #: One attempt's share of the deadline, at most.
    attempt_timeout: float = 10.0
    per_agent_limit: int = 8
    lease: float = 15.0
    result_ttl: float = 3600.0
    breaker_threshold: int = 5
    breaker_cooldown: float = 30.0
    batch: int = 200
    #: Beyond this many waiting tasks (every replica's), submissions get 429.
    max_waiting: int = 10_000
    #: Seconds between periodic passes (L{Router.housekeeping}).
    pass_interval: float = 1.0
    #: Periodic passes without a completed dispatch pass, while work waits and
    #: an agent is free, before the dispatcher is reported stalled.
    stall_passes: int = 3
    #: Task types allowed besides the built-in ones and what agents offer.
    task_types: frozenset[str] = frozenset()


@attrs.frozen
class TaskRequest:
    task_type: str
    agent_type: str
    parameters: dict[str, Any]
    priority: int
    timeout_seconds: float
    max_retries: int
    metadata: dict[str, Any]
    agent_id: str | None = None


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry, breakers: Breakers) -> None:
        self.finished = Counter(
            "optiinfra_tasks_finished",
            "Tasks that reached a final status, by type, agent and status.",
            ("task_type", "agent", "status"),
            registry=registry,
        )
        self.submitted = Counter(
            "optiinfra_tasks_submitted",
            "Tasks accepted, by type.",
            ("task_type",),
            registry=registry,
        )
        self.dispatch_latency = Histogram(
            "optiinfra_task_dispatch_latency_seconds",
            "From submission to the first call to an agent.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.attempts = Counter(
            "optiinfra_task_attempts",
            "Calls to agents, by outcome.",
            ("outcome",),
            registry=registry,
        )
        self.queue_depth = Gauge(
            "optiinfra_tasks_waiting",
            "Tasks waiting for an agent or a retry, as of the last count.",
            registry=registry,
        )
        self.oldest_wait = Gauge(
            "optiinfra_oldest_waiting_task_seconds",
            "How long the longest-waiting due task had waited, as of the last count.",
            registry=registry,
        )
        self.refused = Counter(
            "optiinfra_tasks_refused",
            "Submissions refused at the door (429), by reason: backlog (too many"
            " waiting) or queue_delay (it would time out before its turn).",
            ("reason",),
            registry=registry,
        )
        self.pass_failures = Counter(
            "optiinfra_dispatch_pass_failures",
            "Dispatch passes that failed; their reserved slots were released.",
            registry=registry,
        )
        self._breakers = breakers
        #: Agent -> the (task type, status) series of L{finished} it has.
        self._finished_series: dict[str, set[tuple[str, str]]] = {}
        registry.register(self)

    def task_finished(self, task_type: str, agent: str, status: str) -> None:
        self.finished.labels(task_type, agent, status).inc()
        self._finished_series.setdefault(agent, set()).add((task_type, status))

    def forget_agent(self, agent: str) -> None:
        """Drop a removed agent's series: agent ids must not pile up as labels."""
        for task_type, status in self._finished_series.pop(agent, ()):
            self.finished.remove(task_type, agent, status)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        family = GaugeMetricFamily(
            "optiinfra_agent_circuit_state",
            "Circuit breaker per agent: 0 closed, 1 half-open, 2 open.",
            labels=("agent",),
        )
        code = {HALF_OPEN: 1, OPEN: 2}
        for agent_id, state in sorted(self._breakers.states().items()):
            family.add_metric((agent_id,), code.get(state, 0))
        return [family]


class Router:
    """Tasks from submission to their end."""

    def __init__(
        self,
        tasks: TaskStore,
        registry: Registry,
        clock: IReactorTime,
        dispatcher: Dispatcher,
        config: RouterConfig,
        metrics: CollectorRegistry,
        draining: Callable[[], bool] = lambda: False,
        rng: random.Random | None = None,
        stalled: Callable[[str | None], object] = lambda reason: None,
    ) -> None:
        self.tasks = tasks
        self.config = config
        self.owner = random_id()  # this process, for leases
        self._registry = registry
        self._clock = clock
        self._dispatcher = dispatcher
        self._draining = draining
        self._rng = rng or random.Random()  # noqa: S311 - load spreading, not secrets
        self.breakers = Breakers(
            clock, config.breaker_threshold, config.breaker_cooldown
        )
        self.outstanding = Outstanding()
        self._metrics = RouterMetrics(metrics, self.breakers)
        self.admission = Admission(config.max_waiting)
        #: Told why the dispatcher is stalled, or None once it passes again.
        self._stalled = stalled
        self._calls: dict[str, Deferred[Any]] = {}
        #: The agent each call in flight went to: with L{outstanding}, the
        #: slot accounting (see L{unbalanced_slots}).
        self._call_agents: dict[str, str] = {}
        self._cut: dict[str, str] = {}
        self._wake_call: IDelayedCall | None = None
        self._passing = False
        self._again = False
        #: Whether the next pass reads a full batch (see L{dispatch_pass}).
        self._full_pass = False
        #: Whether tasks may be waiting for a free agent: cleared by a pass that
        #: left none, set by anything that may have made some.
        self._maybe_waiting = True
        #: Bumped whenever work may have appeared: a pass begun before does not
        #: clear L{_maybe_waiting}.
        self._work_generation = 0
        #: Agent type -> (when read, its agents).
        self._agent_cache: dict[str, tuple[float, list[Agent]]] = {}
        #: Bumped by every registry change: a read begun before is not kept.
        self._agent_generation = 0
        self._agents_refreshing: set[str] = set()
        self._last_settled = float("-inf")
        #: When a dispatch pass last ran to its end.
        self._last_pass = clock.seconds()
        #: Called with each task that reaches a final status in this process.
        self.finished_listeners: list[Callable[[Task], object]] = []
        #: Called with each task whose status this process changed (the feed).
        self.status_listeners: list[Callable[[Task], object]] = []
        registry.listeners.append(self._agents_changed)
        registry.removal_listeners.append(self._agent_removed)

    def now(self) -> float:
        return now(self._clock)

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    # Submission, reading, cancelling -------------------------------------------

    async def submit(
        self,
        request: TaskRequest,
        *,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        request_id: str | None = None,
        traceparent: str | None = None,
    ) -> tuple[Task, bool]:
        """
        Store a new task and send it; (task as accepted, created).

        When an agent is free the task is stored already claimed for it and
        the call goes out at once, with no dispatch pass between (see
        L{TaskStore.create_task}); otherwise it is stored pending and the
        dispatcher is woken.  Either way the answer says C{pending}, as the
        contract does: that is what the task was when it was accepted.

        A claimed task is committed first, then sent, then synced to disk, and
        only then answered: it is stored before it goes out (a crash loses
        nothing), and accepted only once a power cut cannot lose it either;
        its call need not wait for the disk.

        Any task type an agent offers can be routed: customers' task types
        are checked where they submit (L{optiinfra.routing.parse}), while plan
        steps name the operations of their templates.

        Refused with L{Overloaded} (from memory, without touching the store)
        when it cannot be done in time: see L{optiinfra.routing.admission}.
        """
        now = self.now()
        refusal = self.admission.refuse(
            request.agent_type, request.priority, request.timeout_seconds, now
        )
        if refusal is not None:
            self._metrics.refused.labels(refusal.reason).inc()
            raise Overloaded(refusal.message, RETRY_AFTER, field=refusal.field)
        task = Task(
            id=time_ordered_id(now),
            task_type=request.task_type,
            agent_type=request.agent_type,
            parameters=request.parameters,
            priority=request.priority,
            timeout_seconds=request.timeout_seconds,
            max_retries=request.max_retries,
            metadata=request.metadata,
            status=PENDING,
            created_at=now,
            deadline=now + request.timeout_seconds,
            requested_agent=request.agent_id,
            not_before=now,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            traceparent=traceparent,
            request_id=request_id,
        )
        agent, busy = self._reserve_at_once(task, now)
        claim = (
            None
            if agent is None
            else Claim(
                agent.id, self.owner, now + self.config.lease, f"sent to {agent.id}"
            )
        )
        try:
            stored, created = await self.tasks.create_task(
                task, claim, durable=claim is None, busy=busy
            )
        except BaseException:
            if agent is not None:
                self._unreserve(agent)
            raise
        if agent is not None and (not created or stored.status != SENT):
            # A replay (even of a task in flight: that call holds its own
            # slot), or queued behind another.
            self._unreserve(agent)
        if not created:
            if stored.request_hash != request_hash:
                raise Conflict(
                    "Idempotency-Key was already used for another request",
                    task_id=stored.id,
                )
            # Its first submission may still be waiting for the disk.
            await self.tasks.sync()
            return stored, False
        self._status_changed(stored)
        if agent is not None and stored.status == SENT:
            self._metrics.dispatch_latency.observe(0.0)
            self._start(stored, agent)
        else:
            self.admission.queued(task.agent_type)
            self.wake()
        if claim is not None:
            await self.tasks.sync()
        self._metrics.submitted.labels(task.task_type).inc()
        _log.info(
            "task submitted",
            task_id=task.id,
            task_type=task.task_type,
            priority=task.priority,
            request_id=request_id,
        )
        return task, True

    def _reserve_at_once(self, task: Task, now: float) -> tuple[Agent | None, bool]:
        """
        The agent to claim C{task} for as it is stored, its slot reserved; None
        to leave the task to a dispatch pass (draining, no agent read lately,
        none free, or the task asks for one that cannot take it); and whether
        that is because every agent that could take it is busy.
        """
        if self._draining():
            return None, False
        agents = self._recent_agents(task.agent_type, now)
        if agents is None:
            return None, False
        choice = self._choose(task, agents, now)
        if not isinstance(choice, Agent):
            return None, choice is None
        self._reserve(choice)
        return choice, False

    async def offered(self, agent_type: str) -> frozenset[str]:
        """What the agents of C{agent_type} registered now offer: their capabilities."""
        agents = await self._agents(self.now(), {agent_type})
        return frozenset(c for agent in agents for c in agent.capabilities)

    async def get(self, task_id: str) -> tuple[Task, list[TaskEvent]]:
        found = await self.tasks.get_task(task_id)
        if found is None:
            raise NotFound("Task not found", task_id=task_id)
        return found

    async def list_tasks(self, query: TaskQuery) -> list[Task]:
        return await self.tasks.list_tasks(query)

    async def cancel(self, task_id: str) -> Task:
        """Cancel for real: a waiting task never goes out, a call is aborted."""
        now = self.now()
        task = await self.tasks.change_task(
            task_id,
            (*WAITING, *IN_FLIGHT),
            CANCELLED,
            now,
            detail="cancelled by request",
            changes={"completed_at": now, "owner": None, "lease_until": None},
        )
        if task is None:
            current, _ = await self.get(task_id)
            raise Conflict(
                f"task already {current.status}", task_id=task_id, status=current.status
            )
        if task_id not in self._calls:
            # A guess: it may have been another replica's call.
            self.admission.dequeued(task.agent_type)
        self._ended(task, CANCELLED, None)
        self._cut_short(task_id, _CANCELLED)
        return task

    # Dispatching --------------------------------------------------------------

    def wake(self, full: bool = False) -> None:
        """
        Look for work soon: a task may be waiting (one arrived or is due for a
        retry, an agent appeared or recovered, the periodic pass: C{full}).
        """
        self._work_generation += 1
        self._maybe_waiting = True
        self._full_pass = self._full_pass or full
        self._pass_soon()

    def _freed(self) -> None:
        """
        An agent's slot came free: look for work only when some may wait.  A
        pass for every answer, finding nothing, would cost a store round trip
        per task.  Tasks queued by another replica are found by the periodic
        pass (L{housekeeping}), which always looks.
        """
        if self._maybe_waiting:
            self._pass_soon()

    def _pass_soon(self) -> None:
        if self._wake_call is None or not self._wake_call.active():
            self._wake_call = self._clock.callLater(0, self._run_pass)

    def _run_pass(self) -> None:
        if self._passing:
            self._again = True
            return
        self._passing = True
        full, self._full_pass = self._full_pass, False
        passing = ensureDeferred(self.dispatch_pass(full))
        passing.addCallbacks(self._pass_ok, self._pass_failed)
        passing.addBoth(self._pass_done)

    def _pass_ok(self, _: object) -> None:
        self._last_pass = self._clock.seconds()

    def _pass_failed(self, failure: Failure) -> None:
        """
        Logged once; whatever the pass reserved was released as it failed (see
        L{_claim} and L{_start}), so the next pass starts from a true count.
        """
        self._metrics.pass_failures.inc()
        if isinstance(failure.value, FirstError):
            failure = failure.value.subFailure
        _log.error(
            "dispatch pass failed",
            error=failure.getErrorMessage(),
            exception=failure.getTraceback(),
        )

    def _pass_done(self, _: object) -> None:
        self._passing = False
        if self._again:
            self._again = False
            self._pass_soon()

    async def dispatch_pass(self, full: bool = True) -> None:
        """
        Time out the late, recover the abandoned, send what can be sent.  Not
        C{full}, only tasks that free slots can take are read (see below); the
        periodic pass is full, and so also refuses tasks that can never go
        where they asked and marks those left waiting C{queued}.
        """
        now = self.now()
        if now - self._last_settled >= _SETTLE_EVERY:
            self._last_settled = now
            self._expired(await self.tasks.expire_waiting(now))
            for task in await self.tasks.recover_abandoned(now):
                self._status_changed(task)
                _log.warn("task recovered from a stopped orchestrator", task_id=task.id)
        if self._draining():
            return
        generation = self._work_generation
        if full:
            due = await self.tasks.due_tasks(now, self.config.batch)
            limit = self.config.batch
        else:
            # Read only as many due tasks as there are free slots, of the
            # types that have them: under a backlog a slot frees with every
            # answer, and reading a full batch each time made every completion
            # cost a read of hundreds of rows.
            free = self._free_slots(await self._agents(now, set(AGENT_TYPES)), now)
            if not free:
                return  # nothing can go out; an answer or the next pass looks again
            limit = min(self.config.batch, sum(free.values()) + _SLACK)
            due = await self.tasks.due_tasks(now, limit, sorted(free))
        left_waiting = len(due) >= limit
        if not due:
            self._none_waiting(generation)
            return
        agents = await self._agents(now, {task.agent_type for task in due})
        known = {agent.id for agent in agents}
        asked = {t.requested_agent for t in due if t.requested_agent is not None}
        for requested in asked - known:
            # Asked for by id but not of the right type: found to say so.
            found = await self._registry.store.get_agent(requested)
            if found is not None:
                agents.append(found)
        # Every change is issued at once and awaited together, so the store
        # commits them as one batch.  An agent's slot is reserved as it is
        # chosen and handed to L{_claim}, which releases it on every path that
        # does not end in a call: a failure anywhere leaves no slot behind.
        changes: list[Deferred[None]] = []
        try:
            for task in due:
                choice = self._choose(task, agents, now)
                if isinstance(choice, str):
                    changes.append(ensureDeferred(self._refuse(task, choice, now)))
                elif choice is None:
                    left_waiting = True
                    if task.status == PENDING:
                        changes.append(ensureDeferred(self._queue(task, now)))
                else:
                    self._reserve(choice)
                    changes.append(ensureDeferred(self._claim(task, choice, now)))
        finally:
            await gatherResults(changes, consumeErrors=True)
        if not left_waiting:
            self._none_waiting(generation)

    def _expired(self, tasks: list[Task]) -> None:
        """Tasks that timed out waiting: one log line for all of them."""
        if not tasks:
            return
        for task in tasks:
            self.admission.dequeued(task.agent_type)
            self._ended(task, TIMEOUT, None, log=False)
        _log.warn(
            "tasks timed out waiting for an agent",
            count=len(tasks),
            task_ids=[task.id for task in tasks[:20]],
        )

    def _free_slots(self, agents: list[Agent], now: float) -> dict[str, int]:
        """Free slots by agent type, of the agents a task could be sent to."""
        silent = self._registry.config.unreachable_after
        free: dict[str, int] = {}
        for agent in agents:
            left = self.config.per_agent_limit - self.outstanding[agent.id]
            if (
                left > 0
                and agent.status_at(now, silent) in ("healthy", "degraded")
                and self.breakers.allows(agent.id)
            ):
                free[agent.type] = free.get(agent.type, 0) + left
        return free

    def _none_waiting(self, generation: int) -> None:
        """A pass left nothing waiting; unless work appeared since it began."""
        if generation == self._work_generation:
            self._maybe_waiting = False

    async def _refuse(self, task: Task, reason: str, now: float) -> None:
        failed = await self.tasks.change_task(
            task.id,
            WAITING,
            FAILED,
            now,
            detail=reason,
            changes={"error": reason, "completed_at": now},
            durable=False,
        )
        if failed is not None:
            self.admission.dequeued(task.agent_type)
            self._ended(failed, FAILED, reason)

    async def _queue(self, task: Task, now: float) -> None:
        queued = await self.tasks.change_task(
            task.id, (PENDING,), QUEUED, now, detail="no agent free", durable=False
        )
        if queued is not None:
            self._status_changed(queued)

    async def _claim(self, task: Task, agent: Agent, now: float) -> None:
        """Claim C{task} for C{agent}, whose slot is reserved, and call it."""
        try:
            claimed = await self.tasks.change_task(
                task.id,
                WAITING,
                SENT,
                now,
                detail=f"sent to {agent.id}",
                changes={
                    "agent_id": agent.id,
                    "owner": self.owner,
                    "lease_until": now + self.config.lease,
                    "started_at": task.started_at or now,
                },
                durable=False,
            )
        except BaseException:
            self._unreserve(agent)
            raise
        if claimed is None:  # cancelled, or another replica took it
            self._unreserve(agent)
            return
        self.admission.dequeued(task.agent_type)
        self._status_changed(claimed)
        if task.started_at is None:
            self._metrics.dispatch_latency.observe(max(0.0, now - task.created_at))
        self._start(claimed, agent)

    async def _agents(self, now: float, kinds: set[str]) -> list[Agent]:
        """
        The agents of C{kinds}, read at most once a second: a pass runs for every
        burst of work, and re-reading thousands of agents each time would cost
        more than the dispatching.  A registration or recovery clears the cache.
        """
        found: list[Agent] = []
        for kind in sorted(kinds):
            cached = self._agent_cache.get(kind)
            if cached is not None and now - cached[0] < _AGENTS_FOR:
                found.extend(cached[1])
            else:
                found.extend(await self._read_agents(kind, now))
        return found

    def _recent_agents(self, kind: str, now: float) -> list[Agent] | None:
        """
        The agents of C{kind} for a submission, which must not wait for a read:
        those cached, read again in the background once a second old; None
        when there are none recent enough.
        """
        cached = self._agent_cache.get(kind)
        old = cached is None or now - cached[0] >= _AGENTS_FOR
        if old and kind not in self._agents_refreshing:
            self._agents_refreshing.add(kind)
            reading = ensureDeferred(self._read_agents(kind, now))
            reading.addErrback(lambda _: None)  # a pass reads them again
            reading.addBoth(lambda _: self._agents_refreshing.discard(kind))
        if cached is None or now - cached[0] >= _AGENTS_STALE:
            return None
        return cached[1]

    async def _read_agents(self, kind: str, now: float) -> list[Agent]:
        """Read the agents of C{kind}; cached unless the registry changed since."""
        generation = self._agent_generation
        agents = await self._registry.list(AgentQuery(type=kind))
        if generation == self._agent_generation:
            self._agent_cache[kind] = (now, agents)
        return agents

    def _agent_removed(self, agent_id: str) -> None:
        """An agent is gone: its metric series and its circuit go too."""
        self._metrics.forget_agent(agent_id)
        self.breakers.forget(agent_id)

    def _agents_changed(self) -> None:
        self._agent_cache.clear()
        self._agent_generation += 1
        self.wake()

    def _choose(
        self, task: Task, agents: list[Agent], now: float
    ) -> Agent | str | None:
        """
        The agent for C{task}; None when none is free now; a reason when the
        task can never go where it was asked to.
        """
        silent = self._registry.config.unreachable_after
        if task.requested_agent is not None:
            agent = next((a for a in agents if a.id == task.requested_agent), None)
            reason = _ineligible(task, agent, now, silent)
            if reason is not None:
                return reason
            assert agent is not None  # noqa: S101 - _ineligible checked
            candidates = [agent]
        else:
            candidates = [
                a
                for a in agents
                if a.type == task.agent_type and task.task_type in a.capabilities
            ]
        status = {a.id: a.status_at(now, silent) for a in candidates}
        healthy = [a for a in candidates if status[a.id] == "healthy"]
        usable = healthy or [a for a in candidates if status[a.id] == "degraded"]
        free = [
            a
            for a in usable
            if self.breakers.allows(a.id)
            and self.outstanding[a.id] < self.config.per_agent_limit
        ]
        if not free:
            return None
        untried = [a for a in free if a.id not in task.tried] or free
        by_id: dict[str, Agent] = {a.id: a for a in untried}
        return by_id[pick(tuple(by_id), self.outstanding, self._rng)]

    def _reserve(self, agent: Agent) -> None:
        """A slot of C{agent} (and its breaker's trial), for a call about to go."""
        self.outstanding.started(agent.id)
        self.breakers.sent(agent.id)

    def _unreserve(self, agent: Agent) -> None:
        self.outstanding.finished(agent.id)
        self.breakers.released(agent.id)

    def unbalanced_slots(self) -> dict[str, tuple[int, int]]:
        """
        Agents whose reserved slots differ from the calls in flight to them:
        (slots, calls).  Empty whenever no pass or submission is half done:
        the invariant that keeps a lost slot from starving an agent for good.
        """
        calls: dict[str, int] = {}
        for agent_id in self._call_agents.values():
            calls[agent_id] = calls.get(agent_id, 0) + 1
        agents = set(calls) | set(self.outstanding.agents())
        return {
            agent_id: (self.outstanding[agent_id], calls.get(agent_id, 0))
            for agent_id in agents
            if self.outstanding[agent_id] != calls.get(agent_id, 0)
        }

    def _start(self, task: Task, agent: Agent) -> None:
        """
        Call C{agent} for C{task}, claimed for it; its slot and any breaker
        trial are reserved, and are released however this ends.  A task whose
        deadline passed while it was claimed ends C{timeout} with no call.
        """
        now = self.now()
        seconds_left = task.deadline - now
        if seconds_left <= 0:
            self._unreserve(agent)
            self._background(
                self._finish(
                    task,
                    TIMEOUT,
                    now,
                    error="the deadline passed before the call went out",
                ),
                task,
            )
            return
        budget = min(self.config.attempt_timeout, seconds_left)
        why = _DEADLINE if budget >= seconds_left else _ATTEMPT
        try:
            timer = self._clock.callLater(budget, self._cut_short, task.id, why)
        except BaseException:
            self._unreserve(agent)
            self._background(
                self._requeue(
                    task, now, "not sent: the dispatcher failed; dispatching again"
                ),
                task,
            )
            raise
        self.admission.starts.started(task.agent_type, now)
        call: Deferred[Outcome] = Deferred.fromCoroutine(
            self._dispatcher.send(agent, task, seconds_left)
        )
        self._calls[task.id] = call
        self._call_agents[task.id] = agent.id
        call.addBoth(self._answered, task, agent, timer, budget)

    async def _requeue(self, task: Task, now: float, detail: str) -> None:
        """Put a task this process holds back in the queue, for any replica."""
        back = await self.tasks.change_task(
            task.id,
            IN_FLIGHT,
            RETRYING,
            now,
            owner=self.owner,
            detail=detail,
            changes={"owner": None, "lease_until": None, "not_before": now},
            durable=False,
        )
        if back is not None:
            self.admission.queued(task.agent_type)
            self._status_changed(back)
            self.wake()

    def _background(self, recording: Any, task: Task) -> Deferred[None]:
        """Run a recording of C{task}'s fate; a failure is logged, not lost."""
        recorded: Deferred[None] = ensureDeferred(recording)
        recorded.addErrback(
            lambda failure: _log.error(
                "could not record a task's outcome",
                task_id=task.id,
                error=failure.getErrorMessage(),
            )
        )
        recorded.addBoth(lambda _: self._freed())
        return recorded

    def _cut_short(self, task_id: str, why: str) -> None:
        call = self._calls.get(task_id)
        if call is not None:
            self._cut[task_id] = why
            call.cancel()

    def _answered(
        self,
        outcome: Outcome | Failure,
        task: Task,
        agent: Agent,
        timer: IDelayedCall,
        budget: float,
    ) -> Deferred[None]:
        if timer.active():
            timer.cancel()
        self._calls.pop(task.id, None)
        self._call_agents.pop(task.id, None)
        self.outstanding.finished(agent.id)
        why = self._cut.pop(task.id, None)
        settled = ensureDeferred(
            self._record(task, agent, outcome, why, budget, self.now())
        )
        settled.addBoth(lambda _: self._freed())
        return settled

    async def _record(
        self,
        task: Task,
        agent: Agent,
        outcome: Outcome | Failure,
        why: str | None,
        budget: float,
        answered: float,
    ) -> None:
        """
        Settle C{task}, and never leave an answer unrecorded for lease recovery
        to take for an orchestrator that died: while the store is unreachable
        the outcome is kept and recorded again (as long as the lease would
        have lasted); an outcome the store refuses fails the task, saying why.
        """
        try:
            await record_until_stored(
                lambda: self._settle(task, agent, outcome, why, budget),
                self._clock,
                until=answered + self.config.lease,
                give_up=self._draining,
            )
        except StoreUnavailable as error:
            _log.error(
                "could not record a task's outcome", task_id=task.id, error=str(error)
            )
        except Exception as error:
            reason = bounded(f"its outcome could not be recorded: {error}", 1024)
            _log.error(
                "could not record a task's outcome", task_id=task.id, error=reason
            )
            try:
                await self._finish(task, FAILED, self.now(), error=reason)
            except Exception as again:
                _log.error(
                    "could not record that a task failed",
                    task_id=task.id,
                    error=bounded(str(again), 1024),
                )

    async def _settle(
        self,
        task: Task,
        agent: Agent,
        outcome: Outcome | Failure,
        why: str | None,
        budget: float,
    ) -> None:
        now = self.now()
        if isinstance(outcome, Failure):
            # A call this process cut short fails with whatever the call was
            # doing: CancelledError, or, while connecting, Twisted's
            # ConnectingCancelledError or DNSLookupError.  Each is the cut,
            # never the agent's fault (it must not count against its breaker).
            if why is None and not outcome.check(CancelledError):
                outcome = Retryable(f"dispatch error: {outcome.getErrorMessage()}")
            elif why == _DEADLINE:
                self._metrics.attempts.labels("deadline").inc()
                await self._finish(
                    task,
                    TIMEOUT,
                    now,
                    error=f"the deadline passed while {agent.id} worked",
                )
                return
            elif why == _ATTEMPT:
                outcome = Retryable(f"no answer from {agent.id} within {budget:g} s")
            elif why == _DRAIN:
                await self._requeue(
                    task, now, "the orchestrator stopped; dispatching again"
                )
                return
            else:
                return  # cancelled by request: already recorded
        if isinstance(outcome, Completed):
            self.breakers.succeeded(agent.id)
            self._metrics.attempts.labels("completed").inc()
            await self._finish(task, COMPLETED, now, result=outcome.result)
        elif isinstance(outcome, Failed):
            self.breakers.succeeded(agent.id)  # it answered: healthy enough
            self._metrics.attempts.labels("failed").inc()
            took = outcome.execution_time_ms
            await self._finish(
                task,
                FAILED,
                now,
                error=outcome.error,
                detail=None
                if took is None
                else f"{outcome.error} (the agent's verdict after {took:g} ms)",
            )
        elif isinstance(outcome, Throttled):
            # Alive and answering, only busy: not a failure of the agent.
            self.breakers.released(agent.id)
            self._metrics.attempts.labels("throttled").inc()
            await self._retry_or_fail(
                task, agent, outcome.error, now, after=outcome.after
            )
        else:
            self._metrics.attempts.labels("retryable").inc()
            if self.breakers.failed(agent.id):
                _log.warn(
                    "circuit opened", agent_id=agent.id, cooldown=self.breakers.cooldown
                )
            await self._retry_or_fail(task, agent, outcome.error, now)

    async def _retry_or_fail(
        self,
        task: Task,
        agent: Agent,
        error: str,
        now: float,
        *,
        after: float | None = None,
    ) -> None:
        """
        Send C{task} again after the back-off, or fail it.  C{after} is the wait
        a busy agent asked for (C{Retry-After}): honoured instead of the
        back-off, within the deadline, and not counted against C{max_retries}
        (the attempt was declined, not failed).
        """
        attempt = task.retry_count + 1
        throttled = after is not None
        if throttled:
            delay = max(after or 0.0, _MIN_RETRY_AFTER)
            attempt = task.retry_count
        else:
            delay = (
                self.config.retry_delay
                * 2 ** (attempt - 1)
                * self._rng.uniform(0.5, 1.5)
            )
        out_of_retries = not throttled and task.retry_count >= task.max_retries
        if out_of_retries or now + delay >= task.deadline:
            why = "no retries left" if out_of_retries else "no time left for a retry"
            await self._finish(task, FAILED, now, error=f"{error}; {why}")
            return
        retried = await self.tasks.change_task(
            task.id,
            IN_FLIGHT,
            RETRYING,
            now,
            owner=self.owner,
            detail=f"{error}; retry {attempt} in {delay:.1f} s"
            if not throttled
            else f"{error}; asked to try again in {delay:.1f} s",
            changes={
                "retry_count": attempt,
                "not_before": now + delay,
                "owner": None,
                "lease_until": None,
                "error": error,
                "tried": (*task.tried, agent.id),
            },
            durable=False,
        )
        if retried is not None:
            self.admission.queued(task.agent_type)
            self._status_changed(retried)
            _log.info(
                "task will be retried",
                task_id=task.id,
                attempt=attempt,
                delay_seconds=round(delay, 2),
                error=error,
            )
            self._clock.callLater(delay, self.wake)

    async def _finish(
        self,
        task: Task,
        status: str,
        now: float,
        *,
        result: Any = None,
        error: str | None = None,
        detail: str | None = None,
    ) -> None:
        finished = await self.tasks.change_task(
            task.id,
            IN_FLIGHT,
            status,
            now,
            owner=self.owner,
            detail=detail or error,
            changes={
                "result": result,
                "error": error,
                "completed_at": now,
                "owner": None,
                "lease_until": None,
            },
            durable=False,  # lost to a power cut, the lease sends it again
        )
        if finished is None:
            _log.info("late answer discarded", task_id=task.id, status=status)
            return
        self._ended(finished, status, error)

    def _ended(
        self, task: Task, status: str, error: str | None, *, log: bool = True
    ) -> None:
        self._metrics.task_finished(task.task_type, task.agent_id or "", status)
        self._status_changed(task)
        for listener in self.finished_listeners:
            listener(task)
        if not log:
            return
        write = _log.info if status == COMPLETED else _log.warn
        write(
            "task finished",
            task_id=task.id,
            status=status,
            agent_id=task.agent_id,
            retry_count=task.retry_count,
            error=error,
            request_id=task.request_id,
        )

    def _status_changed(self, task: Task) -> None:
        for listener in self.status_listeners:
            listener(task)

    # Housekeeping ---------------------------------------------------------------

    async def renew(self) -> None:
        """Keep the leases of calls in flight; abort those no longer ours."""
        if not self._calls:
            return
        ids = list(self._calls)
        held = await self.tasks.renew_leases(
            self.owner, ids, self.now() + self.config.lease
        )
        for task_id in ids:
            if task_id not in held:
                self._cut_short(task_id, _CANCELLED)

    async def housekeeping(self) -> None:
        """The periodic pass: purge old results, count the queue, dispatch."""
        now = self.now()
        self._check_stalled()  # first: a failing store must not hide a stall
        purged = await self.tasks.purge_finished(now - self.config.result_ttl)
        if purged:
            _log.info("finished tasks purged", count=purged)
        self.admission.counted(Backlog(await self.tasks.backlog()), now)
        self._metrics.queue_depth.set(self.admission.waiting)
        self._metrics.oldest_wait.set(self.admission.oldest_wait(now))
        self.wake(full=True)  # leases are renewed by optiinfra.routing.leases

    def _check_stalled(self) -> None:
        """
        Report a dispatcher that has not finished a pass for several periodic
        passes while tasks wait and an agent has a free slot; and its recovery.
        """
        since = self._clock.seconds() - self._last_pass
        limit = self.config.stall_passes * self.config.pass_interval
        stalled = (
            since > limit and self.admission.waiting > 0 and self._an_agent_is_free()
        )
        self._stalled(
            f"no dispatch pass has finished for {since:.0f} s while tasks wait"
            if stalled
            else None
        )

    def _an_agent_is_free(self) -> bool:
        return any(
            self.breakers.allows(agent.id)
            and self.outstanding[agent.id] < self.config.per_agent_limit
            for _, agents in self._agent_cache.values()
            for agent in agents
        )

    async def drain(self, grace: float) -> None:
        """Let calls in flight finish for C{grace} seconds, then hand them back."""
        if not self._calls:
            return
        waiting = [call for call in self._calls.values()]
        timer = self._clock.callLater(grace, self._hand_back)
        for call in waiting:
            try:
                await call
            except Exception:  # noqa: S112 - settled by _answered
                continue
        if timer.active():
            timer.cancel()

    def give_up_calls(self) -> None:
        """
        End every call in flight without recording anything: their leases
        could not be renewed, so their tasks go to whoever takes them back.
        """
        for task_id in list(self._calls):
            self._cut_short(task_id, _CANCELLED)

    def _hand_back(self) -> None:
        for task_id in list(self._calls):
            self._cut_short(task_id, _DRAIN)


def _ineligible(
    task: Task, agent: Agent | None, now: float, silent_after: float
) -> str | None:
    """Why the explicitly requested agent can never take C{task}, or None."""
    if agent is None:
        return f"agent {task.requested_agent} is not registered"
    if agent.type != task.agent_type:
        return f"agent {agent.id} is a {agent.type} agent, not {task.agent_type}"
    if task.task_type not in agent.capabilities:
        return f"agent {agent.id} does not offer {task.task_type}"
    status = agent.status_at(now, silent_after)
    if status not in ("healthy", "degraded"):
        return f"agent {agent.id} is {status}"
    return None
