"""The body of C{POST /tasks}, read field by field."""

from __future__ import annotations

import hashlib
import re
from typing import Final

import orjson
from twisted.web.iweb import IRequest

from optiinfra.declare import Choice, Document, Integer, Number, Text
from optiinfra.errors import InvalidField
from optiinfra.registry.model import AGENT_TYPES
from optiinfra.routing.model import PRIORITIES, TASK_TYPE, TASK_TYPES
from optiinfra.routing.router import RouterConfig, TaskRequest
from optiinfra.validation import MAX_DOCUMENT, TOKEN, Fields

#: W3C trace context: version-traceid-parentid-flags.
TRACEPARENT: Final = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
IDEMPOTENCY_KEY: Final = re.compile(r"[\x21-\x7e]{1,255}")


#: The router's defaults, which a task body falls back on.
_DEFAULTS: Final = RouterConfig()

# The fields of C{POST /tasks}: read here, published by C{optiinfra.openapi}.
TASK_TYPE_FIELD: Final = Text("task_type", pattern=TASK_TYPE, max_length=64)
AGENT_TYPE_FIELD: Final = Choice("agent_type", AGENT_TYPES)
TASK_AGENT_ID: Final = Text(
    "agent_id",
    pattern=TOKEN,
    max_length=128,
    required=False,
    description=(
        "Send it to this agent only. The task fails if that agent is not "
        "registered, is not of `agent_type`, does not list `task_type` among its "
        "capabilities, or is neither healthy nor degraded. Absent: any agent of "
        "`agent_type` listing `task_type`."
    ),
)
PARAMETERS: Final = Document(
    "parameters",
    description=(
        f"Any JSON object, at most {MAX_DOCUMENT} bytes serialised; passed to "
        "the agent as is."
    ),
)
METADATA: Final = Document(
    "metadata",
    description=(
        f"Any JSON object, at most {MAX_DOCUMENT} bytes serialised; passed to "
        "the agent as is."
    ),
)
PRIORITY: Final = Integer(
    "priority",
    minimum=min(PRIORITIES.values()),
    maximum=max(PRIORITIES.values()),
    required=False,
    default=PRIORITIES["normal"],
)
TIMEOUT: Final = Number(
    "timeout_seconds",
    minimum=0.001,
    maximum=_DEFAULTS.max_timeout,
    default=_DEFAULTS.default_timeout,
    description=(
        "The deadline, counted from submission: a task not finished by then is "
        "`timeout`, and a call still out at an agent is cut off."
    ),
)
MAX_RETRIES: Final = Integer(
    "max_retries",
    minimum=0,
    maximum=10,
    required=False,
    default=_DEFAULTS.default_retries,
    description=(
        "Attempts after the first when one gets no usable answer (a 5xx without "
        "a verdict, connection trouble, no answer within ATTEMPT_TIMEOUT); an "
        'agent\'s own `"status": "failed"` (whatever the HTTP status) or another '
        "4xx is final; a 429, or a 503 with Retry-After, waits as asked without "
        "using a retry."
    ),
)


def parse_task(document: object, config: RouterConfig) -> TaskRequest:
    fields = Fields(document)
    task_type = TASK_TYPE_FIELD.read(fields)
    agent_type = AGENT_TYPE_FIELD.read(fields)
    assert task_type is not None  # noqa: S101 - required
    assert agent_type is not None  # noqa: S101 - required
    if task_type in TASK_TYPES and TASK_TYPES[task_type] != agent_type:
        raise InvalidField(
            "agent_type", f"{task_type} is done by {TASK_TYPES[task_type]} agents"
        )
    priority = parse_priority(fields)
    timeout = TIMEOUT.read(
        fields, maximum=config.max_timeout, default=config.default_timeout
    )
    retries = MAX_RETRIES.read(fields, default=config.default_retries)
    assert retries is not None  # noqa: S101 - defaulted
    return TaskRequest(
        task_type=task_type,
        agent_type=agent_type,
        agent_id=TASK_AGENT_ID.read(fields),
        parameters=PARAMETERS.read(fields),
        priority=priority,
        timeout_seconds=timeout,
        max_retries=retries,
        metadata=METADATA.read(fields),
    )


#: Task types named at most in one error.
_SHOWN: Final = 40


def known_without_agents(task_type: str, configured: frozenset[str]) -> bool:
    """Whether C{task_type} is allowed whatever the agents offer: built in or set."""
    return task_type in TASK_TYPES or task_type in configured


def check_offered(
    task_type: str, agent_type: str, offered: frozenset[str], configured: frozenset[str]
) -> None:
    """
    Refuse a task type that is neither built in, nor in C{TASK_TYPES}, nor
    offered now by an agent of C{agent_type}: a typo is caught, and the error
    lists what is offered.
    """
    if known_without_agents(task_type, configured) or task_type in offered:
        return
    built_in = {t for t, a in TASK_TYPES.items() if a == agent_type}
    choices = sorted(built_in | configured | offered)
    shown = ", ".join(choices[:_SHOWN])
    if len(choices) > _SHOWN:
        shown += f" and {len(choices) - _SHOWN} more"
    raise InvalidField(
        "task_type",
        f"no {agent_type} agent offers {task_type}; offered now: {shown}",
    )


def parse_priority(fields: Fields) -> int:
    """A priority by number (1-15) or by the contract's names."""
    raw = fields.raw("priority")
    if isinstance(raw, str) and raw in PRIORITIES:
        return PRIORITIES[raw]
    value = PRIORITY.read(fields)
    assert value is not None  # noqa: S101 - defaulted
    return value


def idempotency_key(request: IRequest) -> str | None:
    """The request's C{Idempotency-Key}, checked; None without one."""
    value = request.getHeader(b"idempotency-key")
    if value is None:
        return None
    key: str = value.decode("latin-1")
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidField("Idempotency-Key", "must be 1-255 visible characters")
    return key


def request_hash(document: object) -> str:
    """
    The same request, whatever the key order: for Idempotency-Key checks.
    SHA-256 of the whole body with its keys sorted (hex): bodies differing
    anywhere differ.  (Before schema version 8 this was the first 2 KB of that
    body, in hex: see that migration.)
    """
    canonical = orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()
