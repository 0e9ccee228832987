"""
The registry over HTTP: the contract's root paths and the agents' C{/api/v1}.

Each handler parses, checks the key, calls the registry, renders.  Both dialects
reach the one L{Registry}, so an agent registered one way is visible and can
heartbeat the other way.
"""

from __future__ import annotations

from typing import Any

import orjson
from klein import Klein
from twisted.web.iweb import IRequest
from werkzeug.routing import BaseConverter

from optiinfra.auth import Permission
from optiinfra.errors import InvalidField
from optiinfra.registry.model import (
    AGENT_ID,
    AGENT_ID_SEGMENT,
    AGENT_TYPES,
    STATUSES,
    AgentQuery,
)
from optiinfra.registry.parse import (
    parse_beat,
    parse_registration,
    parse_v1_beat,
    parse_v1_registration,
)
from optiinfra.registry.service import Registry
from optiinfra.timefmt import rfc3339, rfc3339_ms
from optiinfra.web.app import route
from optiinfra.web.body import read_json
from optiinfra.web.front import FastRoutes
from optiinfra.web.guard import Guard
from optiinfra.web.query import LIMIT, OFFSET, page_of, query_arg
from optiinfra.web.render import render_json

#: A query may ask for this many capabilities at most.
MAX_QUERY_CAPABILITIES = 32
#: Agents listed at most by one answer given no C{limit}.
MAX_AGENTS_LISTED = 10_000


class AgentIdConverter(BaseConverter):
    """C{{agent_id}} in a path: one segment, never a reserved word."""

    regex = AGENT_ID_SEGMENT


def _agent_id(value: str) -> str:
    if not AGENT_ID.fullmatch(value):
        raise InvalidField("agent_id", "is not a valid agent id")
    return value


def _query(request: IRequest, kind: str | None = None) -> AgentQuery:
    args = request.args or {}

    def one(name: str) -> str | None:
        values = args.get(name.encode())
        return values[-1].decode("utf-8", "replace") if values else None

    kind = kind if kind is not None else one("type")
    if kind is not None and kind not in AGENT_TYPES:
        raise InvalidField("type", f"must be one of {', '.join(AGENT_TYPES)}")
    status = one("status")
    if status is not None and status not in STATUSES:
        raise InvalidField("status", f"must be one of {', '.join(STATUSES)}")
    wanted = tuple(v.decode("utf-8", "replace") for v in args.get(b"capability", []))
    if len(wanted) > MAX_QUERY_CAPABILITIES:
        raise InvalidField(
            "capability", f"at most {MAX_QUERY_CAPABILITIES} may be asked for"
        )
    return AgentQuery(type=kind, status=status, capabilities=wanted)


def agent_page(agents: list[Any], limit: int | None, offset: int) -> dict[str, Any]:
    """
    One page of agents, ordered by id: C{limit} of them from C{offset}, as task
    pages are; without a C{limit}, all of them up to L{MAX_AGENTS_LISTED}, with
    C{truncated} and C{next_offset} when there are more.
    """
    if limit is not None:
        return page_of("agents", agents[offset : offset + limit], limit, offset)
    page = agents[offset : offset + MAX_AGENTS_LISTED]
    answer: dict[str, Any] = {"agents": page, "count": len(page), "offset": offset}
    if offset + len(page) < len(agents):
        answer.update(truncated=True, next_offset=offset + len(page))
    return answer


def mount(
    app: Klein, registry: Registry, guard: Guard, fast: FastRoutes | None = None
) -> None:
    """
    Add the registry's routes to C{app}; heartbeats, thousands a second, also
    to the C{fast} routes.
    """
    app.url_map.converters["agent_id"] = AgentIdConverter
    interval = int(registry.config.heartbeat_interval)

    async def listing(request: IRequest, query: AgentQuery) -> dict[str, Any]:
        limit = None if query_arg(request, "limit") is None else LIMIT.read(request)
        offset = OFFSET.read(request)
        count, documents = await registry.documents(query)
        if limit is None and offset == 0 and count <= MAX_AGENTS_LISTED:
            # The contract's answer, as the store rendered it.
            return {"agents": orjson.Fragment(documents), "count": count}
        return agent_page(orjson.loads(documents), limit, offset)

    def accepted(received: float) -> dict[str, Any]:
        return {
            "received": True,
            "next_interval_seconds": interval,
            "timestamp": rfc3339(received),
        }

    # The contract's root paths -------------------------------------------------

    @route(app, "/agents/register", ("POST",))
    async def register(request: IRequest) -> bytes:
        actor = guard.check(request, Permission.AGENT_WRITE)
        agent, _ = await registry.register(
            parse_registration(read_json(request)), actor
        )
        return render_json(
            request,
            {
                "agent_id": agent.id,
                "registered_at": rfc3339_ms(agent.registered_at),
                "heartbeat_url": f"/agents/{agent.id}/heartbeat",
                "heartbeat_interval_seconds": interval,
            },
            201,
        )

    @route(app, "/agents/{agent_id}/heartbeat", ("POST",), fast)
    async def heartbeat(request: IRequest, agent_id: str) -> bytes:
        actor = guard.check(request, Permission.AGENT_WRITE)
        beat = parse_beat(read_json(request, optional=True))
        return render_json(
            request,
            accepted(await registry.heartbeat(_agent_id(agent_id), beat, actor)),
        )

    @route(app, "/agents/{agent_id}/unregister", ("POST",))
    async def unregister(request: IRequest, agent_id: str) -> bytes:
        actor = guard.check(request, Permission.AGENT_WRITE)
        await registry.unregister(_agent_id(agent_id), actor)
        return render_json(request, {"message": "Agent unregistered successfully"})

    @route(app, "/agents", ("GET",))
    async def list_agents(request: IRequest) -> bytes:
        guard.check(request, Permission.READ_AGENTS)
        return render_json(request, await listing(request, _query(request)))

    @route(app, "/agents/{agent_id}", ("GET",))
    async def get_agent(request: IRequest, agent_id: str) -> bytes:
        guard.check(request, Permission.READ_AGENTS)
        document = await registry.document(_agent_id(agent_id))
        return render_json(request, orjson.Fragment(document))

    @route(app, "/agents/type/{agent_type}", ("GET",))
    async def by_type(request: IRequest, agent_type: str) -> bytes:
        guard.check(request, Permission.READ_AGENTS)
        return render_json(
            request, await listing(request, _query(request, kind=agent_type))
        )

    # The agents' /api/v1 shapes ----------------------------------------------

    @route(app, "/api/v1/agents/register", ("POST",))
    async def register_v1(request: IRequest) -> bytes:
        actor = guard.check(request, Permission.AGENT_WRITE)
        registration = parse_v1_registration(read_json(request))
        agent, created = await registry.register(registration, actor)
        return render_json(
            request,
            {
                "success": True,
                "agent_id": agent.id,
                "status": "registered" if created else "re-registered",
                "registered_at": rfc3339_ms(agent.registered_at),
                "heartbeat_url": f"/api/v1/agents/{agent.id}/heartbeat",
                "heartbeat_interval_seconds": interval,
            },
        )

    @route(app, "/api/v1/agents/heartbeat", ("POST",))
    async def heartbeat_v1(request: IRequest) -> bytes:
        actor = guard.check(request, Permission.AGENT_WRITE)
        agent_id, beat = parse_v1_beat(read_json(request))
        return render_json(
            request, accepted(await registry.heartbeat(agent_id, beat, actor))
        )

    # The same handlers answer the root paths and these.

    @route(app, "/api/v1/agents/{agent_id}/heartbeat", ("POST",), fast)
    async def heartbeat_v1_path(request: IRequest, agent_id: str) -> bytes:
        return await heartbeat(request, agent_id)

    @route(app, "/api/v1/agents/{agent_id}", ("DELETE",))
    async def delete_v1(request: IRequest, agent_id: str) -> bytes:
        return await unregister(request, agent_id)

    @route(app, "/api/v1/agents", ("GET",))
    async def list_v1(request: IRequest) -> bytes:
        return await list_agents(request)

    @route(app, "/api/v1/agents/{agent_id}", ("GET",))
    async def get_v1(request: IRequest, agent_id: str) -> bytes:
        return await get_agent(request, agent_id)
