"""
Which key an agent belongs to, and what another key may do to it.

An agent is owned by the key that registered it: its name is kept in the
agent's metadata under L{OWNER} (agents cannot set that entry themselves).
With an C{agent} key, heartbeats, unregistering and registering again are
allowed only for the agents that key owns, within the key's pin, and up to
C{max_agents} agents per key.  Operators may act on any agent; without a key
file (no principal) nothing is checked.

The checks read the store before the change they guard, outside its
transaction: two keys registering the same new id at the same instant could
both pass.  Owners are cached for L{_OWNER_TTL} seconds, so that heartbeats,
thousands a second, do not each read the agent first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from twisted.internet.interfaces import IReactorTime

from optiinfra.auth import Principal, Role
from optiinfra.errors import InvalidField
from optiinfra.registry.model import Agent, AgentQuery
from optiinfra.store.interface import IStore

#: The metadata entry naming the key that registered the agent.
OWNER: Final = "optiinfra.key"
#: Seconds an agent's owner, once read, is trusted without reading it again: two
#: default heartbeat intervals, so that most heartbeats find it cached.
_OWNER_TTL: Final = 60.0
#: Owners cached at most (the oldest are dropped first).
_CACHED: Final = 100_000

OWN_AGENTS_ONLY: Final = (
    "an agent key may register, heartbeat and unregister only the agents it "
    "registered itself"
)


def without_owner(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """C{metadata} as an agent may send it: without the owner's entry."""
    return {k: v for k, v in metadata.items() if k != OWNER}


def owner_of(agent: Agent) -> str | None:
    owner = agent.metadata.get(OWNER)
    return owner if isinstance(owner, str) else None


def _forbidden(field: str, detail: str) -> InvalidField:
    return InvalidField(field, detail, status=403)


class Ownership:
    """The rules above, over a store."""

    def __init__(self, store: IStore, clock: IReactorTime, max_agents: int) -> None:
        self._store = store
        self._clock = clock
        self.max_agents = max_agents
        #: Agent id -> (owner or None, agent type, when read).
        self._owners: dict[str, tuple[str | None, str, float]] = {}

    def _remember(self, agent: Agent) -> None:
        if len(self._owners) >= _CACHED:
            del self._owners[next(iter(self._owners))]
        self._owners[agent.id] = (owner_of(agent), agent.type, self._clock.seconds())

    def forget(self, agent_id: str) -> None:
        self._owners.pop(agent_id, None)

    def registered(self, agent: Agent) -> None:
        """C{agent} was just stored as it is."""
        self._remember(agent)

    async def may_register(
        self,
        actor: Principal | None,
        agent_id: str | None,
        agent_type: str,
        name: str,
        host: str,
        port: int,
    ) -> None:
        """
        Raise unless C{actor} may register this agent: a new one (within its
        pin and its quota) or one it owns already, whether found by id or by
        name, host and port.
        """
        if actor is None or actor.role is not Role.AGENT:
            return
        self._check_pin(actor, agent_id, agent_type)
        agents = await self._store.list_agents(AgentQuery())
        same = [
            a
            for a in agents
            if a.id == agent_id or (a.name, a.host, a.port) == (name, host, port)
        ]
        for agent in same:
            owner = owner_of(agent)
            if owner is not None and owner != actor.name:
                field = "agent_id" if agent.id == agent_id else "name"
                raise _forbidden(
                    field,
                    f"agent {agent.id} belongs to another key: {OWN_AGENTS_ONLY}",
                )
        if same:
            return  # registering its own agent again
        owned = sum(1 for a in agents if owner_of(a) == actor.name)
        if owned >= self.max_agents:
            raise InvalidField(
                "agent_id",
                f"this key has registered {owned} agents, the most allowed "
                f"(AGENT_KEY_MAX_AGENTS={self.max_agents}); unregister one first",
                status=429,
            )

    async def may_act(self, actor: Principal | None, agent_id: str) -> None:
        """
        Raise unless C{actor} may heartbeat or unregister C{agent_id}.  An
        unknown agent passes: the registry answers 404 for it.
        """
        if actor is None or actor.role is not Role.AGENT:
            return
        cached = self._owners.get(agent_id)
        if cached is None or self._clock.seconds() - cached[2] > _OWNER_TTL:
            agent = await self._store.get_agent(agent_id)
            if agent is None:
                self.forget(agent_id)
                self._check_pin(actor, agent_id, None)
                return
            self._remember(agent)
            cached = self._owners[agent_id]
        owner, agent_type, _ = cached
        self._check_pin(actor, agent_id, agent_type)
        if owner is not None and owner != actor.name:
            raise _forbidden(
                "agent_id",
                f"agent {agent_id} belongs to another key: {OWN_AGENTS_ONLY}",
            )

    @staticmethod
    def _check_pin(
        actor: Principal, agent_id: str | None, agent_type: str | None
    ) -> None:
        if actor.pin is None:
            return
        refusal = actor.pin.refusal(agent_id, agent_type)
        if refusal is not None:
            raise _forbidden(*refusal)
