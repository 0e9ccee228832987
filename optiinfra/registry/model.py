"""The agent record and the vocabulary around it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import attrs

#: Words that are paths of their own beside C{/agents/{agent_id}}
#: (C{/agents/register}, C{/api/v1/agents/heartbeat}): never agent ids, so every
#: path names one thing and its C{Allow} lists only that thing's methods.
RESERVED_AGENT_IDS: Final = ("register", "heartbeat")
_RESERVED: Final = "|".join(RESERVED_AGENT_IDS)
#: An agent id: a token (see L{optiinfra.validation.TOKEN}) but no reserved word.
AGENT_ID: Final = re.compile(
    rf"(?!(?:{_RESERVED})$)[A-Za-z0-9][A-Za-z0-9._:@-]{{0,127}}"
)
#: The same, as a Werkzeug converter's one path segment.
AGENT_ID_SEGMENT: Final = rf"(?!(?:{_RESERVED})(?![^/]))[^/]+"

AGENT_TYPES: Final = ("cost", "performance", "resource", "application")

#: What an agent may report about itself.
REPORTED_STATUSES: Final = ("healthy", "degraded", "unhealthy")
#: What the registry concludes when an agent has gone quiet.
UNREACHABLE: Final = "unreachable"
STATUSES: Final = (*REPORTED_STATUSES, UNREACHABLE)
#: Words agents send that mean one of the reported statuses.
STATUS_ALIASES: Final[Mapping[str, str]] = {"active": "healthy"}


def status_at(status: str, last_seen: float, now: float, silent_after: float) -> str:
    """
    The status as of C{now}: what the agent last said, unless it has been
    silent for longer than C{silent_after} seconds.

    Computed on read, so an answer is right even between two sweeps.
    """
    if now - last_seen > silent_after:
        return UNREACHABLE
    return status


@attrs.frozen
class AgentState:
    """What a heartbeat needs to know of an agent: enough to see a change."""

    id: str
    type: str
    status: str
    last_seen: float

    def status_at(self, now: float, unreachable_after: float) -> str:
        return status_at(self.status, self.last_seen, now, unreachable_after)


@attrs.frozen
class Agent:
    """One registered agent, as stored."""

    id: str
    name: str
    type: str
    host: str
    port: int
    capabilities: tuple[str, ...]
    status: str
    version: str
    registered_at: float
    last_seen: float
    metadata: Mapping[str, Any] = attrs.field(factory=dict)
    endpoint: str | None = None
    health_check_endpoint: str | None = None

    def status_at(self, now: float, unreachable_after: float) -> str:
        return status_at(self.status, self.last_seen, now, unreachable_after)

    def has_capabilities(self, wanted: tuple[str, ...]) -> bool:
        return all(capability in self.capabilities for capability in wanted)


@attrs.frozen
class AgentQuery:
    """Which agents to list; empty fields match everything."""

    type: str | None = None
    status: str | None = None
    capabilities: tuple[str, ...] = ()


@attrs.frozen
class Heartbeat:
    """An agent saying it is alive, what state it is in, and what changed."""

    agent_id: str
    status: str
    metadata: Mapping[str, Any]
    seen_at: float


@attrs.frozen
class AgentChange:
    """
    Something that happened to an agent, for those watching (the change feed):
    C{registered}, C{status_changed} (with C{previous}, C{status} and
    C{cause}) or C{removed}.  C{agent} is the record as the change left it,
    or None when the change did not read it (a heartbeat reads only the state).
    """

    kind: str
    agent_id: str
    agent: Agent | None = None
    previous: str | None = None
    status: str | None = None
    cause: str | None = None
