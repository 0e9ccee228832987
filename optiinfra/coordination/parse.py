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
from optiinfra.declare import Choice, Document, Number, Strings, Text
from optiinfra.errors import InvalidField
from optiinfra.registry.model import AGENT_TYPES
from optiinfra.routing.parse import parse_priority
from optiinfra.validation import MAX_DOCUMENT, NAME, TOKEN, Fields

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

# The fields of the coordination bodies: read here, published by
# C{optiinfra.openapi}.
_ANY_OBJECT: Final = f"Any JSON object, at most {MAX_DOCUMENT} bytes serialised."
CUSTOMER_ID: Final = Text(
    "customer_id", pattern=TOKEN, max_length=128, examples=("acme",)
)
REC_ID: Final = Text(
    "id",
    pattern=TOKEN,
    max_length=128,
    description="Unique within the request (a repeat is a 400 naming the second one).",
    examples=("rec-spot-1",),
)
REC_AGENT_TYPE: Final = Choice("agent_type", AGENT_TYPES)
ACTION_FIELD: Final = Text(
    "action",
    pattern=ACTION,
    max_length=64,
    description=(
        "What to do. Its plan template names the steps (see `Plan`); an action "
        "without a template is one step, a task of that type sent to an agent "
        "of `agent_type`."
    ),
    examples=("migrate_to_spot", "scale_down"),
)
RISK: Final = Choice(
    "risk_level",
    RISK_LEVELS,
    required=False,
    default="medium",
    description=(
        "Absent: medium (a change that does not say how risky it is needs a person)."
    ),
)
REC_CUSTOMER_ID: Final = attrs.evolve(
    CUSTOMER_ID,
    required=False,
    description=(
        "The request's `customer_id` if given (another value is a 400 naming it)."
    ),
)
REC_AGENT_ID: Final = Text(
    "agent_id",
    pattern=TOKEN,
    max_length=128,
    required=False,
    description="The recommending agent.",
)
REC_TYPE: Final = Text(
    "type",
    pattern=NAME,
    max_length=128,
    required=False,
    description="A free category, such as `optimization`.",
)
TITLE: Final = Text(
    "title", max_length=256, required=False, description="A one-line summary."
)
DESCRIPTION: Final = Text(
    "description",
    max_length=4096,
    required=False,
    multiline=True,
    description="Free text; lines may break.",
)
SAVINGS: Final = Number(
    "estimated_savings",
    minimum=-1e15,
    maximum=1e15,
    default=0.0,
    description="Ranks conflicting recommendations.",
)
AFFECTED_RESOURCES: Final = Strings(
    "affected_resources",
    pattern=RESOURCE,
    description=(
        "The resources it changes, as paths. Recommendations sharing one "
        "conflict (resource); ones on related resources (one a prefix path of "
        "the other, or siblings) with overlapping windows conflict on timing."
    ),
    examples=(["cluster-a/node-1"],),
)
REC_PARAMETERS: Final = Document(
    "parameters", description=_ANY_OBJECT + " Passed on to the tasks of its plan."
)
DEPENDENCIES: Final = Strings(
    "dependencies",
    description=(
        "Ids of recommendations of the same request that must be carried out "
        "first. A missing one or a cycle drops the recommendation (a dependency "
        "conflict)."
    ),
    examples=(["rec-snapshot-1"],),
)
CONFIDENCE: Final = Number("confidence", minimum=0, maximum=1, default=0.0)
METADATA: Final = Document("metadata")
RECOMMENDATION: Final = (
    REC_ID,
    REC_AGENT_TYPE,
    ACTION_FIELD,
    RISK,
    REC_CUSTOMER_ID,
    REC_AGENT_ID,
    REC_TYPE,
    TITLE,
    DESCRIPTION,
    SAVINGS,
    AFFECTED_RESOURCES,
    REC_PARAMETERS,
    DEPENDENCIES,
    CONFIDENCE,
    METADATA,
)
PREFER: Final = Strings(
    "prefer", description="Recommendation ids to keep.", examples=(["rec-spot-1"],)
)
AVOID_ACTIONS: Final = Strings(
    "avoid_actions",
    pattern=ACTION,
    description="Actions not wanted.",
    examples=(["terminate"],),
)
PROTECTED_RESOURCES: Final = Strings(
    "protected_resources",
    pattern=RESOURCE,
    description="Resources not to be touched.",
    examples=(["cluster-a/db-1"],),
)
CONSTRAINTS: Final = (PREFER, AVOID_ACTIONS, PROTECTED_RESOURCES)
USER_ID: Final = Text(
    "user_id",
    pattern=TOKEN,
    max_length=128,
    required=False,
    examples=("alice",),
)
REASON: Final = Text("reason", max_length=1024, description="Why.")


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
    rec_customer = REC_CUSTOMER_ID.read(fields)
    if rec_customer is not None and rec_customer != customer_id:
        raise InvalidField(
            fields.name("customer_id"), f"must be the request's ({customer_id})"
        )
    return Recommendation(
        id=_required(REC_ID.read(fields)),
        agent_type=_required(REC_AGENT_TYPE.read(fields)),
        action=_required(ACTION_FIELD.read(fields)),
        # A change that does not say how risky it is is treated as needing a person.
        risk_level=_required(RISK.read(fields)),
        agent_id=REC_AGENT_ID.read(fields) or "",
        customer_id=customer_id,
        type=REC_TYPE.read(fields) or "",
        title=TITLE.read(fields) or "",
        description=DESCRIPTION.read(fields) or "",
        estimated_savings=SAVINGS.read(fields),
        estimated_impact=fields.raw("estimated_impact"),
        affected_resources=AFFECTED_RESOURCES.read(fields),
        parameters=REC_PARAMETERS.read(fields),
        dependencies=DEPENDENCIES.read(fields),
        priority=parse_priority(fields),
        confidence=CONFIDENCE.read(fields),
        created_at=_time(fields, "created_at"),
        expires_at=_time(fields, "expires_at"),
        metadata=METADATA.read(fields),
        window=_window(fields),
    )


def _required(value: str | None) -> str:
    assert value is not None  # noqa: S101 - the reader raised when missing
    return value


def _constraints(fields: Fields) -> Constraints:
    metadata = Fields(METADATA.read(fields), "metadata.")
    if not metadata.has("constraints"):
        return Constraints()
    constraints = Fields(metadata.raw("constraints"), "metadata.constraints.")
    return Constraints(
        prefer=frozenset(PREFER.read(constraints)),
        avoid_actions=frozenset(AVOID_ACTIONS.read(constraints)),
        protected_resources=frozenset(PROTECTED_RESOURCES.read(constraints)),
    )


def parse_coordination(document: object) -> CoordinationRequest:
    fields = Fields(document)
    customer_id = _required(CUSTOMER_ID.read(fields))
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
        user = _required(attrs.evolve(USER_ID, required=True).read(fields))
    elif fields.has("user_id") and fields.raw("user_id") != user:
        raise InvalidField(
            "user_id", f"must be the API key's owner ({user}) or left out", 403
        )
    reason = attrs.evolve(REASON, required=reason_required).read(fields)
    return user, reason
