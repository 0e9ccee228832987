"""The coordination API's request bodies, read field by field."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Final

import attrs

from optiinfra.coordination.model import (
    RISK_LEVELS,
    Constraints,
    Recommendation,
    Window,
)
from optiinfra.errors import InvalidField
from optiinfra.registry.model import AGENT_TYPES
from optiinfra.routing.parse import parse_priority
from optiinfra.validation import NAME, TOKEN, Fields

#: Resource ids are paths: "cluster-a/node-1".
RESOURCE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,255}")
#: Actions name agent operations: "migrate_to_spot".
ACTION: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
#: Conflicts are pairwise: 100 recommendations on one resource already make
#: ~7,500 of them (a 5 MB answer); 500 made 187,250 (119 MB, ten seconds).
MAX_RECOMMENDATIONS: Final = 100
#: RFC 3339 date-time: always a zone, seconds, optional fraction.
RFC3339: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


@attrs.frozen
class CoordinationRequest:
    customer_id: str
    recommendations: tuple[Recommendation, ...]
    constraints: Constraints
    auto_approve: bool
    execute_now: bool


def _flag(fields: Fields, key: str) -> bool:
    value = fields.raw(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidField(fields.name(key), "must be true or false")
    return value


def _time(fields: Fields, key: str) -> float | None:
    text = fields.text(key, required=False, max_length=64)
    if text is None:
        return None
    if not RFC3339.fullmatch(text):
        raise InvalidField(
            fields.name(key), "must be an RFC 3339 time, like 2025-10-16T10:00:00Z"
        )
    try:
        moment = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
        seconds = moment.timestamp()
        datetime.fromtimestamp(seconds, UTC)  # a time that can be shown again
    except (ValueError, OverflowError, OSError):
        raise InvalidField(fields.name(key), "is not a real time") from None
    return seconds


def _window(fields: Fields) -> Window | None:
    if not fields.has("window"):
        return None
    window = Fields(fields.raw("window"), fields.name("window."))
    start, end = _time(window, "start"), _time(window, "end")
    if start is None or end is None:
        raise InvalidField(fields.name("window"), "needs both start and end")
    if end <= start:
        raise InvalidField(fields.name("window.end"), "must be after start")
    return Window(start, end)


def parse_recommendation(
    document: object, prefix: str, customer_id: str
) -> Recommendation:
    fields = Fields(document, prefix)
    rec_customer = fields.text("customer_id", required=False, pattern=TOKEN)
    if rec_customer is not None and rec_customer != customer_id:
        raise InvalidField(
            fields.name("customer_id"), f"must be the request's ({customer_id})"
        )
    return Recommendation(
        id=_required(fields.text("id", pattern=TOKEN)),
        agent_type=_required(fields.choice("agent_type", AGENT_TYPES)),
        action=_required(fields.text("action", pattern=ACTION)),
        # A change that does not say how risky it is is treated as needing a person.
        risk_level=_required(
            fields.choice("risk_level", RISK_LEVELS, required=False, default="medium")
        ),
        agent_id=fields.text("agent_id", required=False, pattern=TOKEN) or "",
        customer_id=customer_id,
        type=fields.text("type", required=False, pattern=NAME) or "",
        title=fields.text("title", required=False, max_length=256) or "",
        description=fields.text(
            "description", required=False, max_length=4096, multiline=True
        )
        or "",
        estimated_savings=fields.number(
            "estimated_savings", minimum=-1e15, maximum=1e15, default=0.0
        ),
        estimated_impact=fields.raw("estimated_impact"),
        affected_resources=fields.strings("affected_resources", pattern=RESOURCE),
        parameters=fields.mapping("parameters"),
        dependencies=fields.strings("dependencies"),
        priority=parse_priority(fields),
        confidence=fields.number("confidence", minimum=0, maximum=1, default=0.0),
        created_at=_time(fields, "created_at"),
        expires_at=_time(fields, "expires_at"),
        metadata=fields.mapping("metadata"),
        window=_window(fields),
    )


def _required(value: str | None) -> str:
    assert value is not None  # noqa: S101 - the reader raised when missing
    return value


def _constraints(fields: Fields) -> Constraints:
    metadata = Fields(fields.mapping("metadata"), "metadata.")
    if not metadata.has("constraints"):
        return Constraints()
    constraints = Fields(metadata.raw("constraints"), "metadata.constraints.")
    return Constraints(
        prefer=frozenset(constraints.strings("prefer")),
        avoid_actions=frozenset(constraints.strings("avoid_actions", pattern=ACTION)),
        protected_resources=frozenset(
            constraints.strings("protected_resources", pattern=RESOURCE)
        ),
    )


def parse_coordination(document: object) -> CoordinationRequest:
    fields = Fields(document)
    customer_id = _required(fields.text("customer_id", pattern=TOKEN))
    raw = fields.raw("recommendations")
    if not isinstance(raw, list) or not raw:
        raise InvalidField("recommendations", "must be a non-empty list")
    if len(raw) > MAX_RECOMMENDATIONS:
        raise InvalidField(
            "recommendations", f"must have at most {MAX_RECOMMENDATIONS} items"
        )
    recommendations: list[Recommendation] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(raw):
        rec = parse_recommendation(item, f"recommendations[{index}].", customer_id)
        if rec.id in seen:
            raise InvalidField(
                f"recommendations[{index}].id",
                f"repeats recommendations[{seen[rec.id]}].id",
            )
        seen[rec.id] = index
        recommendations.append(rec)
    return CoordinationRequest(
        customer_id=customer_id,
        recommendations=tuple(recommendations),
        constraints=_constraints(fields),
        auto_approve=_flag(fields, "auto_approve"),
        execute_now=_flag(fields, "execute_now"),
    )


def parse_decision(
    document: object, reason_required: bool, user: str | None = None
) -> tuple[str, str | None]:
    """
    (user_id, reason) of an approve or reject body.  C{user}, the API key's
    owner when there are keys, is who decides: a body naming anyone else is
    refused with 403 (acting as another person is not allowed, however well
    formed the name).
    """
    fields = Fields(document)
    if user is None:
        user = _required(fields.text("user_id", pattern=TOKEN))
    elif fields.has("user_id") and fields.raw("user_id") != user:
        raise InvalidField(
            "user_id", f"must be the API key's owner ({user}) or left out", 403
        )
    reason = fields.text("reason", required=reason_required, max_length=1024)
    return user, reason
