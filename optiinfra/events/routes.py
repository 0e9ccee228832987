"""C{GET /events}: the change feed over HTTP, for viewers and above."""

from __future__ import annotations

import re
from typing import Final

from klein import Klein
from twisted.web.iweb import IRequest

from optiinfra.auth import Permission
from optiinfra.errors import InvalidField
from optiinfra.events.feed import Feed, FeedClosed, Filters
from optiinfra.events.record import TOPICS
from optiinfra.registry.model import AGENT_TYPES
from optiinfra.validation import TOKEN
from optiinfra.web.app import RETRY_AFTER, route
from optiinfra.web.guard import Guard
from optiinfra.web.query import query_arg
from optiinfra.web.render import render_error

#: The listings' filters the feed takes too; each matches events carrying it.
LABELS: Final = ("agent_type", "customer_id", "task_type", "agent_id", "status")
_EVENT_ID: Final = re.compile(r"[0-9]{1,18}")


def parse_filters(request: IRequest) -> Filters:
    raw = query_arg(request, "topics")
    topics = frozenset(TOPICS)
    if raw is not None:
        asked = set(raw.split(","))
        if not asked <= topics:
            raise InvalidField(
                "topics", f"must be a comma-separated list of {', '.join(TOPICS)}"
            )
        topics = frozenset(asked)
    labels: dict[str, str] = {}
    for name in LABELS:
        value = query_arg(request, name)
        if value is None:
            continue
        if name == "agent_type" and value not in AGENT_TYPES:
            raise InvalidField(name, f"must be one of {', '.join(AGENT_TYPES)}")
        if not TOKEN.fullmatch(value):
            raise InvalidField(name, "is not a valid value")
        labels[name] = value
    return Filters(topics, labels, everything=topics == set(TOPICS) and not labels)


def last_event_id(request: IRequest) -> int | None:
    """
    Where to resume: the C{Last-Event-ID} header an C{EventSource} sends when
    it reconnects, or C{last_event_id} in the query (for a new connection).
    """
    header = request.getHeader(b"last-event-id")
    raw = header.decode("latin-1") if header is not None else None
    field = "Last-Event-ID"
    if raw is None:
        raw, field = query_arg(request, "last_event_id"), "last_event_id"
    if raw is None or raw == "":
        return None  # an EventSource that has seen no id yet
    if not _EVENT_ID.fullmatch(raw):
        raise InvalidField(field, "must be an event id (a whole number)")
    return int(raw)


def mount(app: Klein, feed: Feed, guard: Guard) -> None:
    @route(app, "/events", ("GET",))
    async def events(request: IRequest) -> bytes:
        guard.check(request, Permission.READ)
        filters = parse_filters(request)
        resume = last_event_id(request)
        try:
            stream = await feed.open(request, filters, resume)
        except FeedClosed:
            request.setHeader(b"retry-after", RETRY_AFTER)
            return render_error(request, 503, "the change feed is not running")
        return await stream.done
