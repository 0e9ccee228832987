"""
The coordinator: a batch of recommendations in, conflicts resolved, approvals
asked for, plans made; and people's decisions turned into work.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Final, Protocol, TypeVar

import attrs
import structlog
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime

from optiinfra.coordination.approvals import (
    APPROVED,
    EXPIRED,
    REJECTED,
    Approval,
    ApprovalPolicy,
    approve,
    new_approval,
    reject,
)
from optiinfra.coordination.conflicts import resolve
from optiinfra.coordination.executor import CoordinationMetrics, Executor
from optiinfra.coordination.model import CONTRADICTORY_ACTIONS, Recommendation
from optiinfra.coordination.model import Conflict as ConflictRecord
from optiinfra.coordination.parse import CoordinationRequest
from optiinfra.coordination.plans import (
    DEFAULT_TEMPLATES,
    Plan,
    StepTemplate,
    build_plan,
)
from optiinfra.coordination.views import (
    approval_view,
    conflict_view,
    plan_view,
    recommendation_view,
)
from optiinfra.errors import Conflict, NotFound
from optiinfra.ids import random_id
from optiinfra.store.coordination import CoordinationStore
from optiinfra.timefmt import now, rfc3339_ms

_log = structlog.get_logger("optiinfra.coordination")

T = TypeVar("T")


class Offload(Protocol):
    """Runs a piece of pure work somewhere, and says when it is done."""

    def __call__(self, work: Callable[[], T]) -> Deferred[T]: ...


def _here(work: Callable[[], T]) -> Deferred[T]:
    return maybeDeferred(work)


#: Tries at storing a decision when another one lands at the same moment.
_DECISION_TRIES: Final = 5


@attrs.frozen
class CoordinatorConfig:
    policy: ApprovalPolicy = attrs.field(factory=ApprovalPolicy)
    templates: Mapping[str, tuple[StepTemplate, ...]] = DEFAULT_TEMPLATES
    contradictions: tuple[tuple[str, str], ...] = CONTRADICTORY_ACTIONS


@attrs.frozen
class Decision:
    """What coordinating one batch decided, before anything is stored."""

    document: dict[str, Any]
    approvals: list[Approval]
    plans: list[Plan]
    conflicts: tuple[ConflictRecord, ...]


def decide(
    request: CoordinationRequest,
    coordination_id: str,
    now: float,
    config: CoordinatorConfig,
    new_id: Callable[[], str],
) -> Decision:
    """
    Resolve C{request}'s conflicts, then for each kept recommendation either
    make its plan (low risk, or C{auto_approve}) or ask for approval; and the
    result as the API shows it.  Pure (ids from C{new_id}), so it can run on a
    thread: a crowded batch takes a while.
    """
    live = [
        rec
        for rec in request.recommendations
        if rec.expires_at is None or rec.expires_at > now
    ]
    stale = {
        rec.id: "it expired before coordination"
        for rec in request.recommendations
        if rec not in live
    }
    resolution = resolve(live, request.constraints, config.contradictions, new_id)
    kept_ids = {rec.id for rec in resolution.kept}
    approvals: list[Approval] = []
    plans: list[Plan] = []
    kept: list[Recommendation] = []
    for rec in resolution.kept:
        after = tuple(dep for dep in rec.dependencies if dep in kept_ids)
        if request.auto_approve or not config.policy.needs_approval(rec):
            rec = attrs.evolve(rec, status="approved")
            plans.append(
                build_plan(new_id(), coordination_id, rec, after, now, config.templates)
            )
        else:
            approvals.append(
                new_approval(
                    new_id(),
                    coordination_id,
                    rec,
                    config.policy,
                    request.execute_now,
                    after,
                    now,
                )
            )
        kept.append(rec)
    dropped = {**stale, **resolution.dropped}
    document = {
        "id": coordination_id,
        "customer_id": request.customer_id,
        "total_recommendations": len(request.recommendations),
        "conflicts_detected": len(resolution.conflicts),
        "conflicts_resolved": len(resolution.conflicts),
        "recommendations_kept": len(kept),
        "approvals_required": len(approvals),
        "auto_approved": len(plans),
        "conflicts": [conflict_view(c, now) for c in resolution.conflicts],
        "recommendations": [recommendation_view(rec) for rec in kept],
        "dropped": [
            {"id": rec_id, "reason": reason}
            for rec_id, reason in sorted(dropped.items())
        ],
        "approvals": [approval_view(a, now) for a in approvals],
        "execution_plans": [plan_view(plan) for plan in plans],
        "created_at": rfc3339_ms(now),
    }
    return Decision(document, approvals, plans, resolution.conflicts)


class Coordinator:
    def __init__(
        self,
        store: CoordinationStore,
        executor: Executor,
        clock: IReactorTime,
        config: CoordinatorConfig,
        metrics: CoordinationMetrics,
        offload: Offload = _here,
    ) -> None:
        """
        C{offload} runs L{decide}: a thread in the service, as a crowded batch
        takes long enough to hold up every other request on the reactor.
        """
        self.store = store
        self.executor = executor
        self.config = config
        self._clock = clock
        self._metrics = metrics
        self._offload = offload
        #: Called with each approval this process made or changed, and what
        #: happened: C{created}, C{decided} or C{expired} (the feed).
        self.approval_listeners: list[Callable[[Approval, str], object]] = []

    def _approval_changed(self, approval: Approval, kind: str) -> None:
        for listener in self.approval_listeners:
            listener(approval, kind)

    def now(self) -> float:
        return now(self._clock)

    async def coordinate(
        self,
        request: CoordinationRequest,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """
        L{decide} for C{request} (on the offload thread), store what it decided,
        and start the plans with C{execute_now}; (the result, whether it is
        new).  An C{idempotency_key} already used for the same request gives
        the result made then, and nothing is done again.
        """
        now = self.now()
        coordination_id = random_id()
        decision = await self._offload(
            partial(decide, request, coordination_id, now, self.config, random_id)
        )
        document, approvals, plans = (
            decision.document,
            decision.approvals,
            decision.plans,
        )
        replayed = await self.store.save_result(
            coordination_id,
            request.customer_id,
            now,
            document,
            approvals,
            plans,
            idempotency_key,
            request_hash,
        )
        if replayed is not None:
            earlier, earlier_hash = replayed
            if earlier_hash != request_hash:
                raise Conflict(
                    "Idempotency-Key was already used for another request",
                    coordination_id=earlier["id"],
                )
            return earlier, False
        for approval in approvals:
            self._approval_changed(approval, "created")
        for plan in plans:
            self.executor.announce(plan)
        for conflict in decision.conflicts:
            self._metrics.conflicts.labels(conflict.type).inc()
        if plans:
            self._metrics.approvals.labels("auto_approved").inc(len(plans))
        _log.info(
            "recommendations coordinated",
            coordination_id=coordination_id,
            customer_id=request.customer_id,
            total=len(request.recommendations),
            conflicts=len(decision.conflicts),
            kept=document["recommendations_kept"],
            approvals_required=len(approvals),
            auto_approved=len(plans),
        )
        if request.execute_now and plans:
            started = [await self.executor.start(plan) for plan in plans]
            document = {
                **document,
                "execution_plans": [plan_view(plan) for plan in started],
            }
        return document, True

    async def list_approvals(
        self, customer_id: str | None, status: str | None, limit: int, offset: int
    ) -> tuple[list[Approval], float]:
        now = self.now()
        found = await self.store.list_approvals(
            now, customer_id=customer_id, status=status, limit=limit, offset=offset
        )
        return found, now

    async def get_approval(self, approval_id: str) -> tuple[Approval, float]:
        return await self._approval(approval_id), self.now()

    async def get_result(self, coordination_id: str) -> dict[str, Any]:
        """A coordination's result, with its approvals and plans as they are now."""
        found = await self.store.get_result(coordination_id)
        if found is None:
            raise NotFound("Coordination not found", coordination_id=coordination_id)
        now = self.now()
        approvals = await self.store.list_approvals(
            now, coordination_id=coordination_id
        )
        plans = await self.store.plans_of(coordination_id)
        # In the order the coordination gave: dependencies first.
        order = {rec["id"]: n for n, rec in enumerate(found["recommendations"])}
        approvals.sort(key=lambda a: order.get(a.recommendation.id, len(order)))
        plans.sort(key=lambda p: order.get(p.recommendation.id, len(order)))
        return {
            **found,
            "approvals": [approval_view(a, now) for a in approvals],
            "execution_plans": [plan_view(plan) for plan in plans],
        }

    async def _approval(self, approval_id: str) -> Approval:
        found = await self.store.get_approval(approval_id)
        if found is None:
            raise NotFound("Approval not found", approval_id=approval_id)
        return found

    async def approve(
        self, approval_id: str, user_id: str
    ) -> tuple[Approval, Plan | None]:
        """
        Record C{user_id}'s approval.  Once enough people agree, the plan is
        made in the same transaction, and started at once with C{execute_now}.
        """
        for _ in range(_DECISION_TRIES):
            approval = await self._approval(approval_id)
            now = self.now()
            decided = approve(approval, user_id, now)
            plan = None
            if decided.status == APPROVED:
                rec = attrs.evolve(decided.recommendation, status="approved")
                plan = build_plan(
                    random_id(),
                    decided.coordination_id,
                    rec,
                    decided.after,
                    now,
                    self.config.templates,
                )
                decided = attrs.evolve(decided, plan_id=plan.id)
            stored = await self.store.change_approval(decided, plan)
            if stored is None:
                continue  # someone else decided meanwhile: read it again
            _log.info(
                "approval given",
                approval_id=approval_id,
                user_id=user_id,
                approvals=len(stored.approved_by),
                required=stored.required,
                status=stored.status,
            )
            self._approval_changed(stored, "decided")
            if plan is not None:
                self.executor.announce(plan)
                self._metrics.approvals.labels(APPROVED).inc()
                if stored.execute_now:
                    plan = await self.executor.start(plan)
            return stored, plan
        raise Conflict(
            "approval is changing too fast; try again", approval_id=approval_id
        )

    async def reject(self, approval_id: str, user_id: str, reason: str) -> Approval:
        for _ in range(_DECISION_TRIES):
            approval = await self._approval(approval_id)
            stored = await self.store.change_approval(
                reject(approval, user_id, reason, self.now())
            )
            if stored is None:
                continue
            self._metrics.approvals.labels(REJECTED).inc()
            self._approval_changed(stored, "decided")
            _log.info(
                "approval rejected",
                approval_id=approval_id,
                user_id=user_id,
                reason=reason,
            )
            await self._wake_dependents(stored)
            return stored
        raise Conflict(
            "approval is changing too fast; try again", approval_id=approval_id
        )

    async def expire_due(self) -> int:
        """Record expiries (the sweep); dependents of expired changes learn of it."""
        expired = await self.store.expire_approvals(self.now())
        for approval in expired:
            self._metrics.approvals.labels(EXPIRED).inc()
            self._approval_changed(approval, "expired")
            _log.warn(
                "approval expired",
                approval_id=approval.id,
                recommendation_id=approval.recommendation.id,
                risk_level=approval.recommendation.risk_level,
            )
            await self._wake_dependents(approval)
        return len(expired)

    async def _wake_dependents(self, approval: Approval) -> None:
        for plan in await self.store.plans_of(approval.coordination_id):
            if approval.recommendation.id in plan.after:
                self.executor.poke(plan.id)

    async def purge(self, retention: float) -> int:
        """Forget coordinations older than C{retention} seconds that are done."""
        purged = await self.store.purge_done(self.now() - retention)
        if purged:
            _log.info("old coordinations purged", count=purged)
        return purged

    async def list_plans(self, statuses: tuple[str, ...]) -> list[Plan]:
        """Plans in C{statuses}, newest first."""
        found = await self.store.plans_in(statuses)
        return sorted(found, key=lambda plan: plan.created_at, reverse=True)

    async def get_plan(self, plan_id: str) -> Plan:
        found = await self.store.get_plan(plan_id)
        if found is None:
            raise NotFound("Plan not found", plan_id=plan_id)
        return found

    async def execute(self, plan_id: str) -> Plan:
        return await self.executor.start(await self.get_plan(plan_id))
