"""
Turning the domain's changes into the change feed's events.

The registry, the router, the breakers, the coordinator and the executor each
call their listeners with what changed; the L{Recorder} renders each change as
the REST views show it, and writes what arrived in one reactor turn to the
event log in one transaction.  Once that commits, the feed is woken so that
this replica's clients hear of it at once (the others find it on their next
read of the log).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import orjson
import structlog
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from optiinfra.coordination.approvals import Approval
from optiinfra.coordination.executor import Executor
from optiinfra.coordination.plans import FINAL, PENDING, ROLLING_BACK, Plan
from optiinfra.coordination.service import Coordinator
from optiinfra.coordination.views import approval_view, plan_view
from optiinfra.registry.model import Agent, AgentChange
from optiinfra.registry.service import Registry
from optiinfra.routing.model import Task
from optiinfra.routing.router import Router
from optiinfra.routing.routes import task_view
from optiinfra.store.events import IEventLog, NewEvent
from optiinfra.timefmt import rfc3339_ms

_log = structlog.get_logger("optiinfra.events")

#: The feed's topics, in the order the API lists them.
TOPICS: Final = ("agents", "tasks", "approvals", "plans")

#: Events written in one transaction at most.
_BATCH: Final = 500


def agent_view(agent: Agent, status: str) -> dict[str, Any]:
    """An agent as C{GET /agents/{id}} shows it (that view is built in SQL)."""
    return {
        "id": agent.id,
        "name": agent.name,
        "type": agent.type,
        "host": agent.host,
        "port": agent.port,
        "capabilities": list(agent.capabilities),
        "status": status,
        "version": agent.version,
        "registered_at": rfc3339_ms(agent.registered_at),
        "last_seen": rfc3339_ms(agent.last_seen),
        "metadata": dict(agent.metadata),
        "endpoint": agent.endpoint,
        "health_check_endpoint": agent.health_check_endpoint,
    }


def plan_kind(plan: Plan) -> str:
    """What a plan's change was, as the feed names it."""
    if plan.status == PENDING:
        return "created"
    if plan.status in FINAL:
        return "finished"
    if plan.status == ROLLING_BACK:
        return "rollback"
    return "step"


class Recorder:
    """Renders changes as events and writes them to C{log} in batches."""

    def __init__(
        self,
        log: IEventLog,
        clock: IReactorTime,
        recorded: Callable[[], object] = lambda: None,
    ) -> None:
        self._log = log
        self._clock = clock
        self._recorded = recorded
        self._pending: list[NewEvent] = []
        self._flush_call: IDelayedCall | None = None
        self._writing: Deferred[None] | None = None

    def record(
        self,
        topic: str,
        kind: str,
        labels: Mapping[str, str | None],
        body: Mapping[str, Any],
    ) -> None:
        """Queue one event; labels that are None are left out."""
        now = self._clock.seconds()
        document = orjson.dumps(
            {"topic": topic, "kind": kind, "at": rfc3339_ms(now), **body}
        )
        self._pending.append(
            NewEvent(
                at=now,
                topic=topic,
                kind=kind,
                labels={k: v for k, v in labels.items() if v is not None},
                document=document,
            )
        )
        if self._writing is None and (
            self._flush_call is None or not self._flush_call.active()
        ):
            self._flush_call = self._clock.callLater(0, self._flush)

    def _flush(self) -> None:
        batch, self._pending = self._pending[:_BATCH], self._pending[_BATCH:]
        if not batch:
            return
        writing = self._log.append(batch)

        def failed(failure: Failure) -> None:
            _log.warn(
                "change feed events not recorded",
                count=len(batch),
                error=failure.getErrorMessage(),
            )

        def done(_: object) -> None:
            self._writing = None
            self._recorded()
            if self._pending:
                self._flush()

        # Held before done() is added: a store known to be down fails at once,
        # and done() must then find (and clear) this write.
        self._writing = writing.addCallbacks(lambda _: None, failed)
        self._writing.addBoth(done)

    async def idle(self) -> None:
        """Wait until everything queued so far is written (for a clean stop)."""
        while self._writing is not None or self._pending:
            if self._writing is None:
                self._flush()
            if self._writing is not None:
                await self._writing


class Watch:
    """
    The domain's listeners, recording into a L{Recorder}.  Agents whose change
    did not carry their record are read again, so the event shows them whole.
    """

    def __init__(self, recorder: Recorder, registry: Registry) -> None:
        self._recorder = recorder
        self._registry = registry

    def attach(
        self,
        router: Router,
        coordinator: Coordinator,
        executor: Executor,
    ) -> None:
        self._registry.change_listeners.append(self.agent_changed)
        router.breakers.listeners.append(self.circuit_changed)
        router.status_listeners.append(self.task_changed)
        coordinator.approval_listeners.append(self.approval_changed)
        executor.plan_listeners.append(self.plan_changed)

    def _agent_event(
        self, kind: str, agent: Agent | None, agent_id: str, extra: dict[str, Any]
    ) -> None:
        view = None if agent is None else agent_view(agent, self._status(agent))
        self._recorder.record(
            "agents",
            kind,
            {
                "agent_id": agent_id,
                "agent_type": None if agent is None else agent.type,
                "status": None if view is None else view["status"],
            },
            {"agent_id": agent_id, **extra, "agent": view},
        )

    def _status(self, agent: Agent) -> str:
        return self._registry.status_of(agent)

    async def _read_then(
        self, agent_id: str, record: Callable[[Agent | None], None]
    ) -> None:
        try:
            agent = await self._registry.store.get_agent(agent_id)
        except Exception as error:  # the store is down: tell the event without it
            _log.warn("agent not read for its event", error=str(error))
            agent = None
        record(agent)

    def agent_changed(self, change: AgentChange) -> None:
        extra: dict[str, Any] = {}
        if change.kind == "status_changed":
            extra = {
                "previous": change.previous,
                "status": change.status,
                "cause": change.cause,
            }
        elif change.cause is not None:
            extra = {"cause": change.cause}
        if change.agent is not None:
            self._agent_event(change.kind, change.agent, change.agent_id, extra)
            return
        ensureDeferred(
            self._read_then(
                change.agent_id,
                lambda agent: self._agent_event(
                    change.kind, agent, change.agent_id, extra
                ),
            )
        )

    def circuit_changed(self, agent_id: str, state: str) -> None:
        kind = "circuit_opened" if state == "open" else "circuit_closed"
        ensureDeferred(
            self._read_then(
                agent_id,
                lambda agent: self._agent_event(
                    kind, agent, agent_id, {"circuit": state}
                ),
            )
        )

    def task_changed(self, task: Task) -> None:
        self._recorder.record(
            "tasks",
            "status_changed",
            {
                "agent_type": task.agent_type,
                "task_type": task.task_type,
                "agent_id": task.agent_id,
                "status": task.status,
            },
            {"task": task_view(task)},
        )

    def approval_changed(self, approval: Approval, kind: str) -> None:
        view = approval_view(approval, self._clock_now())
        self._recorder.record(
            "approvals",
            kind,
            {"customer_id": approval.customer_id, "status": view["status"]},
            {"approval": view},
        )

    def plan_changed(self, plan: Plan) -> None:
        self._recorder.record(
            "plans",
            plan_kind(plan),
            {"customer_id": plan.customer_id, "status": plan.status},
            {"plan": plan_view(plan)},
        )

    def _clock_now(self) -> float:
        return self._registry.now()
