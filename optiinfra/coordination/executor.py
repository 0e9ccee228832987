"""
Carrying out plans: each step is a task through the router, and the plan moves
on when that task ends.

Everything a plan has done is in the store, so the executor holds nothing that
a restart could lose: a plan is driven by reading it, doing the one thing
L{next_move} says, and storing the result with a compare-and-set.  Tasks are
submitted with an idempotency key per step, so a crash between submitting and
storing (or two replicas driving one plan) can never send a step twice.  A
task ending in this process wakes its plan at once; a periodic pass over the
active plans picks up the rest (other replicas' tasks, restarts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import attrs
import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime

from optiinfra.coordination.approvals import EXPIRED, REJECTED
from optiinfra.coordination.plans import (
    ACTIVE,
    CANCELLED,
    COMPLETED,
    PENDING,
    ROLLBACK_FAILED,
    RUNNING,
    WAITING,
    Await,
    Done,
    Plan,
    Send,
    Step,
    finished,
    next_move,
    sent,
    settled,
    step_parameters,
)
from optiinfra.errors import Conflict, NotFound
from optiinfra.routing import model as tasks
from optiinfra.routing.model import Task
from optiinfra.routing.router import Router, TaskRequest
from optiinfra.store.coordination import CoordinationStore
from optiinfra.timefmt import now

_log = structlog.get_logger("optiinfra.coordination")

#: Rollbacks go ahead of everything else in the queue.
_ROLLBACK_PRIORITY: Final = 15
#: Step durations, seconds: agent calls take from milliseconds to minutes.
_STEP_BUCKETS: Final = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300)


class CoordinationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.conflicts = Counter(
            "optiinfra_coordination_conflicts",
            "Conflicts found between recommendations, by type.",
            ("type",),
            registry=registry,
        )
        self.approvals = Counter(
            "optiinfra_coordination_approvals",
            "Approvals decided, by outcome (auto_approved, approved, rejected,"
            " expired).",
            ("outcome",),
            registry=registry,
        )
        self.plans = Counter(
            "optiinfra_coordination_plans_finished",
            "Execution plans that ended, by final status.",
            ("status",),
            registry=registry,
        )
        self.steps = Histogram(
            "optiinfra_coordination_step_duration_seconds",
            "From a plan step's task being sent to its end, by task type and outcome.",
            ("task_type", "outcome"),
            buckets=_STEP_BUCKETS,
            registry=registry,
        )


class Executor:
    """Drives plans from C{waiting} to their end."""

    def __init__(
        self,
        plans: CoordinationStore,
        router: Router,
        clock: IReactorTime,
        metrics: CoordinationMetrics,
        step_retries: int = 1,
        wait_limit: float = 48 * 3600.0,
    ) -> None:
        """
        C{wait_limit}: seconds a plan may wait for its dependencies' plans
        before it is cancelled, so that no plan waits without end (by default
        the longest an approval may stay open).
        """
        self._plans = plans
        self._router = router
        self._clock = clock
        self._metrics = metrics
        self._step_retries = step_retries
        self._wait_limit = wait_limit
        self._driving: dict[str, Deferred[None]] = {}
        self._again: set[str] = set()
        router.finished_listeners.append(self._task_finished)
        #: Called with each plan made, or changed by this process (the feed).
        self.plan_listeners: list[Callable[[Plan], object]] = []

    def announce(self, plan: Plan) -> None:
        """Tell the listeners of C{plan}: made, or changed."""
        for listener in self.plan_listeners:
            listener(plan)

    async def _change_plan(self, plan: Plan) -> Plan | None:
        """Store a change to C{plan}; the plan as stored, or None if it moved."""
        changed = await self._plans.change_plan(plan)
        if changed is not None:
            self.announce(changed)
        return changed

    def now(self) -> float:
        return now(self._clock)

    async def start(self, plan: Plan) -> Plan:
        """Ask for C{plan} to run (once its dependencies are done)."""
        if plan.status != PENDING:
            raise Conflict(
                f"plan is already {plan.status}", plan_id=plan.id, status=plan.status
            )
        started = await self._change_plan(
            attrs.evolve(plan, status=WAITING, requested_at=self.now())
        )
        if started is None:  # another request (or replica) got there first
            current = await self._plans.get_plan(plan.id)
            if current is None:  # purged meanwhile
                raise NotFound("Plan not found", plan_id=plan.id)
            raise Conflict(
                f"plan is already {current.status}",
                plan_id=plan.id,
                status=current.status,
            )
        _log.info("plan execution requested", plan_id=plan.id)
        self.poke(plan.id)
        return started

    def poke(self, plan_id: str) -> None:
        """Move C{plan_id} along now, or right after the pass already doing so."""
        if plan_id in self._driving:
            self._again.add(plan_id)
            return
        driving = ensureDeferred(self._drive(plan_id))
        self._driving[plan_id] = driving
        driving.addErrback(
            lambda failure: _log.warn(
                "plan could not move on; trying again on the next pass",
                plan_id=plan_id,
                error=failure.getErrorMessage(),
            )
        )
        driving.addBoth(lambda _: self._driven(plan_id))

    def _driven(self, plan_id: str) -> None:
        del self._driving[plan_id]
        if plan_id in self._again:
            self._again.discard(plan_id)
            self.poke(plan_id)

    async def reconcile(self) -> None:
        """Pick up every active plan: after a restart, or another replica's."""
        for plan in await self._plans.plans_in(ACTIVE):
            self.poke(plan.id)

    async def idle(self) -> None:
        """Wait for the passes under way (for a clean stop, and for tests)."""
        while self._driving:
            for driving in list(self._driving.values()):
                await driving

    def _task_finished(self, task: Task) -> None:
        plan_id = task.metadata.get("plan_id")
        if isinstance(plan_id, str):
            self.poke(plan_id)

    async def _drive(self, plan_id: str) -> None:
        while True:
            plan = await self._plans.get_plan(plan_id)
            if plan is None or plan.status not in ACTIVE:
                return
            if plan.status == WAITING:
                if not await self._begin(plan):
                    return
                continue
            move = next_move(plan)
            if isinstance(move, Done):
                ended = await self._change_plan(finished(plan, move.status, self.now()))
                if ended is not None:
                    await self._ended(ended)
                    return
            elif isinstance(move, Send):
                task_id = await self._send(plan, move.step, move.rollback)
                await self._change_plan(
                    sent(plan, move.step, task_id, move.rollback, self.now())
                )
            else:
                if not await self._settle(plan, move):
                    return

    async def _begin(self, plan: Plan) -> bool:
        """Start a waiting plan when its dependencies are done; False to wait."""
        blocker = await self._blocker(plan)
        now = self.now()
        if blocker is None:
            waited = now - (plan.requested_at or now)
            if waited < self._wait_limit:
                return False
            blocker = (
                f"its dependencies' plans did not complete within "
                f"{self._wait_limit:g} s of the request to execute it"
            )
        if blocker == "":
            changed = attrs.evolve(plan, status=RUNNING, started_at=now)
            _log.info("plan started", plan_id=plan.id, steps=len(plan.steps))
        else:
            changed = finished(attrs.evolve(plan, error=blocker), CANCELLED, now)
        await self._change_plan(changed)
        return True

    async def _blocker(self, plan: Plan) -> str | None:
        """
        "" when every dependency's plan has completed; why the plan can never
        run; or None while a dependency is still on its way.
        """
        if not plan.after:
            return ""
        siblings = {
            p.recommendation.id: p
            for p in await self._plans.plans_of(plan.coordination_id)
        }
        approvals = {
            a.recommendation.id: a
            for a in await self._plans.list_approvals(
                self.now(), coordination_id=plan.coordination_id
            )
        }
        waiting = False
        for rec_id in plan.after:
            sibling = siblings.get(rec_id)
            if sibling is not None:
                if sibling.status == COMPLETED:
                    continue
                if sibling.finished:
                    return f"dependency {rec_id} ended {sibling.status}"
                waiting = True
                continue
            approval = approvals.get(rec_id)
            if approval is None:
                return f"dependency {rec_id} has no plan"
            status = approval.status_at(self.now())
            if status in (REJECTED, EXPIRED):
                return f"dependency {rec_id} was {status}"
            waiting = True
        return None if waiting else ""

    async def _send(self, plan: Plan, step: Step, rollback: bool) -> str:
        rec = plan.recommendation
        kind = "rollback" if rollback else "run"
        key = f"plan:{plan.id}:{step.index}:{kind}"
        task, _ = await self._router.submit(
            TaskRequest(
                task_type=(step.rollback_task_type or "")
                if rollback
                else step.task_type,
                agent_type=step.agent_type,
                parameters=step_parameters(plan, step, rollback),
                priority=_ROLLBACK_PRIORITY
                if rollback
                else min(15, max(1, rec.priority)),
                timeout_seconds=step.timeout_seconds,
                max_retries=self._step_retries,
                metadata={"plan_id": plan.id, "step": step.index, "rollback": rollback},
            ),
            idempotency_key=key,
            request_hash=key,
        )
        _log.info(
            "plan step sent",
            plan_id=plan.id,
            step=step.index,
            task_type=task.task_type,
            rollback=rollback,
            task_id=task.id,
        )
        return task.id

    async def _settle(self, plan: Plan, move: Await) -> bool:
        """Record the end of the awaited task; False while it is still going."""
        found = await self._router.tasks.get_task(move.task_id)
        now = self.now()
        if found is None:
            succeeded, result, error = False, None, "its task was purged"
        else:
            task = found[0]
            if not task.finished:
                return False
            succeeded = task.status == tasks.COMPLETED
            result = task.result
            error = task.error or f"task {task.status}"
            if task.started_at is not None and not move.rollback:
                self._metrics.steps.labels(
                    move.step.task_type, "completed" if succeeded else task.status
                ).observe(max(0.0, now - (move.step.started_at or task.started_at)))
        changed = settled(plan, move.step, move.rollback, succeeded, result, error, now)
        if await self._change_plan(changed) is not None:
            if not succeeded:
                (_log.error if move.rollback else _log.warn)(
                    "plan step failed",
                    plan_id=plan.id,
                    step=move.step.index,
                    task_type=move.step.task_type,
                    rollback=move.rollback,
                    critical=move.step.critical,
                    error=error,
                )
            if changed.status == ROLLBACK_FAILED:
                await self._ended(changed)
                return False
        return True

    async def _ended(self, plan: Plan) -> None:
        self._metrics.plans.labels(plan.status).inc()
        if plan.status == COMPLETED:
            _log.info("plan completed", plan_id=plan.id)
        elif plan.status == ROLLBACK_FAILED:
            _log.critical(
                "plan rollback failed: the change is half done; a person must act",
                plan_id=plan.id,
                recommendation_id=plan.recommendation.id,
                customer_id=plan.customer_id,
                error=plan.error,
            )
        else:
            _log.warn(
                "plan ended", plan_id=plan.id, status=plan.status, error=plan.error
            )
        # Plans of the same batch may have been waiting for this one.
        for sibling in await self._plans.plans_of(plan.coordination_id):
            if sibling.status == WAITING:
                self.poke(sibling.id)
