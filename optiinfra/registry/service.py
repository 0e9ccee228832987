"""
The registry's rules: registration, heartbeats, status, expiry.

It knows the store and a clock, nothing about HTTP.  Status is what an agent
last reported, or C{unreachable} once it has been silent too long; the sweep
writes that conclusion down (and removes agents silent for much longer) so that
every replica sees and logs each change once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import attrs
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.internet.interfaces import IHostnameResolver, IReactorTime

from optiinfra.auth import Principal
from optiinfra.destinations import Destinations, registration_refusal
from optiinfra.errors import InvalidField, NotFound
from optiinfra.ids import random_id
from optiinfra.registry.model import (
    AGENT_TYPES,
    STATUSES,
    UNREACHABLE,
    Agent,
    AgentChange,
    AgentQuery,
    AgentState,
    Heartbeat,
)
from optiinfra.registry.ownership import OWNER, Ownership, without_owner
from optiinfra.registry.parse import Beat, Registration
from optiinfra.store.interface import IStore
from optiinfra.timefmt import now

_log = structlog.get_logger("optiinfra.registry")

REGISTER_AGAIN: Final = "Agent not found: register again at /agents/register"


@attrs.frozen
class RegistryConfig:
    """Timing, in seconds; the defaults are the prototype's contract."""

    heartbeat_interval: float = 30.0
    unreachable_after: float = 45.0
    expire_after: float = 600.0
    sweep_interval: float = 5.0
    #: Agents one agent key may have registered at once.
    max_agents_per_key: int = 100


class RegistryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.agents = Gauge(
            "optiinfra_agents",
            "Registered agents by type and status, as of the last sweep.",
            ("type", "status"),
            registry=registry,
        )
        self.registrations = Counter(
            "optiinfra_agent_registrations",
            "Registrations, new or repeated.",
            ("type", "outcome"),
            registry=registry,
        )
        self.removals = Counter(
            "optiinfra_agent_removals",
            "Agents removed, by reason.",
            ("type", "reason"),
            registry=registry,
        )
        self.heartbeats = Counter(
            "optiinfra_agent_heartbeats",
            "Heartbeats received, by outcome.",
            ("outcome",),
            registry=registry,
        )
        self.status_changes = Counter(
            "optiinfra_agent_status_changes",
            "Agent status changes, by new status.",
            ("status",),
            registry=registry,
        )
        self._heartbeat_ok = self.heartbeats.labels("accepted")
        self._heartbeat_unknown = self.heartbeats.labels("unknown_agent")

    def heartbeat(self, known: bool) -> None:
        (self._heartbeat_ok if known else self._heartbeat_unknown).inc()


class Registry:
    """Agents on a store, with time from C{clock}."""

    def __init__(
        self,
        store: IStore,
        clock: IReactorTime,
        config: RegistryConfig,
        metrics: RegistryMetrics,
        destinations: Destinations | None = None,
        resolver: IHostnameResolver | None = None,
    ) -> None:
        self.store = store
        #: Where agents may be, checked as they register (with C{resolver}).
        self.destinations = destinations
        self._resolver = resolver
        self.config = config
        self._clock = clock
        self._metrics = metrics
        self.ownership = Ownership(store, clock, config.max_agents_per_key)
        #: Called with the id of each agent removed (unregistered or expired).
        self.removal_listeners: list[Callable[[str], None]] = []
        #: Called when an agent may have become able to take work.
        self.listeners: list[Callable[[], None]] = []
        #: Called with each change this process made to an agent.
        self.change_listeners: list[Callable[[AgentChange], object]] = []

    def _removed(self, agent_id: str) -> None:
        self.ownership.forget(agent_id)
        for listener in self.removal_listeners:
            listener(agent_id)

    def _notify(self) -> None:
        for listener in self.listeners:
            listener()

    def _changed(self, change: AgentChange) -> None:
        for listener in self.change_listeners:
            listener(change)

    def now(self) -> float:
        return now(self._clock)

    def status_of(self, agent: Agent) -> str:
        return agent.status_at(self.now(), self.config.unreachable_after)

    async def register(
        self, registration: Registration, actor: Principal | None = None
    ) -> tuple[Agent, bool]:
        """
        Register, or refresh the same agent's registration; (agent, created).
        The agent is owned by C{actor}'s key (L{Ownership}).
        """
        await self.ownership.may_register(
            actor,
            registration.agent_id,
            registration.type,
            registration.name,
            registration.host,
            registration.port,
        )
        await self._check_destination(registration)
        metadata = without_owner(registration.metadata)
        if actor is not None:
            metadata[OWNER] = actor.name
        now = self.now()
        candidate = Agent(
            id=registration.agent_id or random_id(),
            name=registration.name,
            type=registration.type,
            host=registration.host,
            port=registration.port,
            capabilities=registration.capabilities,
            status=registration.status,
            version=registration.version,
            registered_at=now,
            last_seen=now,
            metadata=metadata,
            endpoint=registration.endpoint,
            health_check_endpoint=registration.health_check_endpoint,
        )
        agent, created = await self.store.register_agent(
            candidate, by_id=registration.agent_id is not None
        )
        self.ownership.registered(agent)
        self._metrics.registrations.labels(
            agent.type, "registered" if created else "refreshed"
        ).inc()
        _log.info(
            "agent registered" if created else "agent registered again",
            agent_id=agent.id,
            agent_type=agent.type,
            name=agent.name,
            address=f"{agent.host}:{agent.port}",
            capabilities=list(agent.capabilities),
        )
        self._notify()
        self._changed(AgentChange("registered", agent.id, agent))
        return agent, created

    async def _check_destination(self, registration: Registration) -> None:
        """Refuse an address tasks may not be sent to, naming the field."""
        if self.destinations is None or self._resolver is None:
            return
        reason = await registration_refusal(
            self.destinations, self._resolver, registration.host, registration.port
        )
        if reason is not None:
            field = "endpoint" if registration.endpoint is not None else "host"
            raise InvalidField(field, reason)

    async def heartbeat(
        self, agent_id: str, beat: Beat, actor: Principal | None = None
    ) -> float:
        """Record a heartbeat; when it was received.  L{NotFound} if unknown."""
        await self.ownership.may_act(actor, agent_id)
        metadata = (
            without_owner(beat.metadata) if OWNER in beat.metadata else beat.metadata
        )
        now = self.now()
        before = await self.store.heartbeat(
            Heartbeat(agent_id, beat.status, metadata, now)
        )
        self._metrics.heartbeat(before is not None)
        if before is None:
            raise NotFound(REGISTER_AGAIN, agent_id=agent_id, action="register")
        was = before.status_at(now, self.config.unreachable_after)
        if was != beat.status:
            self._status_changed(before, was, beat.status, "heartbeat")
            self._notify()
            self._changed(
                AgentChange(
                    "status_changed",
                    agent_id,
                    previous=was,
                    status=beat.status,
                    cause="heartbeat",
                )
            )
        return now

    def _status_changed(
        self, agent: Agent | AgentState, was: str, now: str, cause: str
    ) -> None:
        self._metrics.status_changes.labels(now).inc()
        _log.info(
            "agent status changed",
            agent_id=agent.id,
            agent_type=agent.type,
            previous=was,
            status=now,
            cause=cause,
        )

    async def unregister(self, agent_id: str, actor: Principal | None = None) -> Agent:
        await self.ownership.may_act(actor, agent_id)
        removed = await self.store.delete_agent(agent_id)
        self.ownership.forget(agent_id)
        if removed is None:
            raise NotFound("Agent not found", agent_id=agent_id)
        self._metrics.removals.labels(removed.type, "unregistered").inc()
        self._removed(agent_id)
        _log.info(
            "agent unregistered",
            agent_id=agent_id,
            agent_type=removed.type,
            by=None if actor is None else actor.name,
        )
        self._changed(AgentChange("removed", agent_id, removed, cause="unregistered"))
        return removed

    async def get(self, agent_id: str) -> Agent:
        agent = await self.store.get_agent(agent_id)
        if agent is None:
            raise NotFound("Agent not found", agent_id=agent_id)
        return agent

    async def documents(self, query: AgentQuery) -> tuple[int, bytes]:
        """The agents matching C{query} as the API shows them: (count, JSON array)."""
        return await self.store.agent_documents(
            query, self.now() - self.config.unreachable_after
        )

    async def document(self, agent_id: str) -> bytes:
        """One agent as the API shows it (a JSON object); L{NotFound} if unknown."""
        count, documents = await self.store.agent_documents(
            AgentQuery(), self.now() - self.config.unreachable_after, agent_id
        )
        if count == 0:
            raise NotFound("Agent not found", agent_id=agent_id)
        return documents[1:-1]  # the one element of a one-element array

    async def list(self, query: AgentQuery) -> list[Agent]:
        agents = await self.store.list_agents(query)
        if query.status is None and not query.capabilities:
            return agents
        now, silent = self.now(), self.config.unreachable_after
        return [
            agent
            for agent in agents
            if (query.status is None or agent.status_at(now, silent) == query.status)
            and agent.has_capabilities(query.capabilities)
        ]

    async def sweep(self) -> None:
        """Write down who went quiet, remove the long gone, refresh the gauge."""
        now = self.now()
        for agent in await self.store.mark_unreachable(
            now - self.config.unreachable_after
        ):
            self._status_changed(agent, agent.status, UNREACHABLE, "silence")
            self._changed(
                AgentChange(
                    "status_changed",
                    agent.id,
                    agent,
                    previous=agent.status,
                    status=UNREACHABLE,
                    cause="silence",
                )
            )
        for agent in await self.store.remove_silent(now - self.config.expire_after):
            self._metrics.removals.labels(agent.type, "expired").inc()
            self._removed(agent.id)
            _log.warn(
                "agent removed after silence",
                agent_id=agent.id,
                agent_type=agent.type,
                silent_seconds=round(now - agent.last_seen, 1),
            )
            self._changed(AgentChange("removed", agent.id, agent, cause="expired"))
        counts = await self.store.count_agents(now - self.config.unreachable_after)
        for kind in AGENT_TYPES:
            for status in STATUSES:
                self._metrics.agents.labels(kind, status).set(
                    counts.get((kind, status), 0)
                )
