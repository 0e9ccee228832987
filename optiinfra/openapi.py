"""
C{GET /openapi.json}: the OpenAPI 3.1 description of every route the service serves.

The document is data, written here by hand and built once at import.  Its
vocabularies (agent types, statuses, identifier patterns, limits) are taken from the
modules that enforce them, so they cannot drift apart; which paths and methods it
lists, and the shapes of the bodies, are held to the code by C{tests/test_openapi.py},
which compares the document with the app's URL map and with real answers.
"""

from __future__ import annotations

from typing import Any, Final

import attrs
from klein import Klein
from twisted.web.iweb import IRequest

from optiinfra import __version__
from optiinfra.auth import Permission
from optiinfra.coordination.approvals import APPROVAL_STATUSES
from optiinfra.coordination.conflicts import RULES, SEVERITY
from optiinfra.coordination.model import (
    AGENT_TYPE_RANK,
    CONFLICT_TYPES,
    DEPENDENCY,
    RISK_LEVELS,
)
from optiinfra.coordination.parse import (
    CONSTRAINTS,
    CUSTOMER_ID,
    MAX_RECOMMENDATIONS,
    REASON,
    RECOMMENDATION,
    USER_ID,
)
from optiinfra.coordination.plans import (
    DEFAULT_TEMPLATES,
    PENDING,
    PLAN_STATUSES,
    STEP_COMPLETED,
    STEP_FAILED,
    STEP_PENDING,
    STEP_ROLLBACK_FAILED,
    STEP_ROLLED_BACK,
    STEP_ROLLING_BACK,
    STEP_RUNNING,
    STEP_SKIPPED,
    WAITING,
)
from optiinfra.declare import Reference, body_schema, nullable, whole
from optiinfra.events.record import TOPICS
from optiinfra.events.routes import LABELS
from optiinfra.registry.model import (
    AGENT_TYPES,
    RESERVED_AGENT_IDS,
    STATUSES,
)
from optiinfra.registry.parse import (
    AGENT_ID_FIELD,
    BEAT,
    PORT,
    REGISTRATION,
    REGISTRATION_V1,
)
from optiinfra.registry.routes import MAX_QUERY_CAPABILITIES
from optiinfra.routing.model import FINISHED, PRIORITIES, TASK_TYPES
from optiinfra.routing.model import STATUSES as TASK_STATUSES
from optiinfra.routing.parse import (
    IDEMPOTENCY_KEY,
    MAX_RETRIES,
    METADATA,
    PARAMETERS,
    PRIORITY,
    TASK_AGENT_ID,
    TASK_TYPE_FIELD,
    TIMEOUT,
    TRACEPARENT,
)
from optiinfra.routing.router import RouterConfig
from optiinfra.settings import Settings
from optiinfra.validation import MAX_DOCUMENT, TOKEN
from optiinfra.web.app import route
from optiinfra.web.health import SERVICE_NAME
from optiinfra.web.query import LIMIT, MAX_PAGE, OFFSET
from optiinfra.web.render import render_json

OPENAPI_VERSION: Final = "3.1.0"


JSON: Final = "application/json"


# Building blocks ---------------------------------------------------------------


def _key_required() -> list[dict[str, list[str]]]:
    """Either security scheme will do."""
    return [{"bearerAuth": []}, {"apiKeyAuth": []}]


def _ref(kind: str, name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _schema(name: str) -> dict[str, Any]:
    return _ref("schemas", name)


_whole = whole
_nullable = nullable


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {JSON: {"schema": schema}}


def _answer(
    description: str,
    schema: dict[str, Any] | None = None,
    *,
    content: dict[str, Any] | None = None,
    headers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A response: every one carries X-Request-ID."""
    response: dict[str, Any] = {
        "description": description,
        "headers": {"X-Request-ID": _ref("headers", "XRequestId"), **(headers or {})},
    }
    if schema is not None:
        response["content"] = _json(schema)
    elif content is not None:
        response["content"] = content
    return response


def _errors(*codes: str, specific: dict[str, str] | None = None) -> dict[str, Any]:
    """
    The shared error responses for C{codes}; C{specific} names the response of a
    code that has no shared one (404 of a task, 409) or overrides it.
    """
    names = {
        "400": "BadRequest",
        "401": "Unauthorized",
        "403": "Forbidden",
        "404": "AgentNotFound",
        "413": "PayloadTooLarge",
        "415": "UnsupportedMediaType",
        "503": "StoreUnavailable",
        **(specific or {}),
    }
    responses = {code: _ref("responses", names[code]) for code in sorted(codes)}
    responses["default"] = _ref("responses", "Error")
    return responses


def _public(
    operation_id: str, summary: str, responses: dict[str, Any], description: str = ""
) -> dict[str, Any]:
    """An operation anyone may call (probes, metrics scrapers, this document)."""
    operation: dict[str, Any] = {
        "tags": ["service"],
        "operationId": operation_id,
        "summary": summary,
        "security": [],
        "parameters": [_ref("parameters", "RequestId")],
        "responses": {**responses, "default": _ref("responses", "Error")},
    }
    if description:
        operation["description"] = description
    return operation


def _guarded(
    tag: str,
    operation_id: str,
    summary: str,
    permission: str,
    responses: dict[str, Any],
    *,
    description: str = "",
    parameters: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """
    A registry, task or coordination operation: needs a key whose role grants
    C{permission} (when the service has keys), talks to the store (503 when it
    is down).
    """
    operation: dict[str, Any] = {
        "tags": [tag],
        "operationId": operation_id,
        "summary": summary,
        "description": (
            (description + "\n\n" if description else "")
            + f"Requires the `{permission}` permission."
        ),
        "x-permission": permission,
        "security": _key_required(),
        "parameters": [*(parameters or []), _ref("parameters", "RequestId")],
        "responses": responses,
    }
    if body is not None:
        operation["requestBody"] = body
    return operation


def _path_id(name: str, description: str) -> dict[str, Any]:
    """A path parameter holding an id the service gave."""
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": (
            f"{description} An id that is not a token of up to 128 letters, "
            f"digits and `. _ : @ -` is a 400 naming `{name}`."
        ),
        "schema": {"type": "string", "pattern": _whole(TOKEN), "maxLength": 128},
    }


def _body(schema_name: str, description: str, *, required: bool) -> dict[str, Any]:
    return {
        "description": description,
        "required": required,
        "content": _json(_schema(schema_name)),
    }


# Schemas -----------------------------------------------------------------------

_AGENT_ID: Final[dict[str, Any]] = {
    **AGENT_ID_FIELD.schema(),
    "description": (
        "Letters, digits and `. _ : @ -`, starting with a letter or digit; "
        + " and ".join(f"`{word}`" for word in RESERVED_AGENT_IDS)
        + " are paths of their own, never agent ids."
    ),
    "examples": ["performance-agent-1"],
}
_TIME_MS: Final[dict[str, Any]] = {
    "type": "string",
    "format": "date-time",
    "description": "UTC, RFC 3339 with milliseconds.",
    "examples": ["2025-10-16T10:00:00.250Z"],
}
_TIME_S: Final[dict[str, Any]] = {
    "type": "string",
    "format": "date-time",
    "description": "UTC, RFC 3339 with whole seconds.",
    "examples": ["2025-10-16T10:00:00Z"],
}
_INTERVAL: Final[dict[str, Any]] = {
    "type": "integer",
    "minimum": 0,
    "description": "Seconds between heartbeats (HEARTBEAT_INTERVAL, default 30).",
    "examples": [30],
}


def _schemas() -> dict[str, Any]:
    return {
        "AgentType": {"type": "string", "enum": list(AGENT_TYPES)},
        "AgentStatus": {
            "type": "string",
            "enum": list(STATUSES),
            "description": (
                "What the agent last reported, or unreachable once it has been "
                "silent longer than UNREACHABLE_AFTER (default 1.5 heartbeat "
                "intervals)."
            ),
        },
        "AgentId": _AGENT_ID,
        "Registration": body_schema(
            REGISTRATION,
            "The contract's registration. The same name, host and port "
            "registering again refreshes the record and keeps its id. Other "
            "fields are ignored.",
        ),
        "RegistrationV1": body_schema(
            REGISTRATION_V1,
            "The registration the agents send: either `endpoint` (whose host "
            "and port are used) or `host` and `port`. The same `agent_id` "
            "registering again refreshes its record. Other fields are ignored.",
            anyOf=[
                {
                    "required": ["endpoint"],
                    "properties": {"endpoint": {"type": "string"}},
                },
                {
                    "required": ["host", "port"],
                    "properties": {
                        "host": {"type": "string"},
                        "port": {"type": "integer"},
                    },
                },
            ],
        ),
        "Heartbeat": body_schema(
            BEAT, "An empty body is read as `{}`. Other fields are ignored."
        ),
        "HeartbeatV1": body_schema(
            (AGENT_ID_FIELD, *BEAT),
            "Names the agent in the body. Other fields are ignored.",
            described={
                "timestamp": {
                    "description": "Accepted and ignored: the server's clock counts."
                }
            },
        ),
        "Agent": {
            "type": "object",
            "required": [
                "id",
                "name",
                "type",
                "host",
                "port",
                "capabilities",
                "status",
                "version",
                "registered_at",
                "last_seen",
                "metadata",
            ],
            "properties": {
                "id": {"type": "string"},
                "name": {"type": "string"},
                "type": _schema("AgentType"),
                "host": {"type": "string"},
                "port": PORT.schema(),
                "capabilities": {"type": "array", "items": {"type": "string"}},
                "status": _schema("AgentStatus"),
                "version": {"type": "string"},
                "registered_at": _TIME_MS,
                "last_seen": _TIME_MS,
                "metadata": {"type": "object"},
                "endpoint": {
                    "type": ["string", "null"],
                    "description": "null when the agent registered none.",
                },
                "health_check_endpoint": {
                    "type": ["string", "null"],
                    "description": "null when the agent registered none.",
                },
            },
        },
        "AgentList": {
            "type": "object",
            "required": ["agents", "count"],
            "description": (
                "Ordered by id. Without `limit`: every matching agent (up to "
                "10,000; past that `truncated` and `next_offset`), as the "
                "contract answers; with `limit`, a page as `GET /tasks` gives."
            ),
            "properties": {
                "agents": {"type": "array", "items": _schema("Agent")},
                "count": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "How many agents this answer holds.",
                },
                "limit": {"type": "integer", "minimum": 0, "maximum": MAX_PAGE},
                "offset": {"type": "integer", "minimum": 0},
                "truncated": {"type": "boolean"},
                "next_offset": {"type": "integer", "minimum": 0},
            },
        },
        "Registered": {
            "type": "object",
            "required": [
                "agent_id",
                "registered_at",
                "heartbeat_url",
                "heartbeat_interval_seconds",
            ],
            "properties": {
                "agent_id": {"type": "string"},
                "registered_at": _TIME_MS,
                "heartbeat_url": {
                    "type": "string",
                    "examples": ["/agents/2f1c.../heartbeat"],
                },
                "heartbeat_interval_seconds": _INTERVAL,
            },
        },
        "RegisteredV1": {
            "type": "object",
            "required": [
                "success",
                "agent_id",
                "status",
                "registered_at",
                "heartbeat_url",
                "heartbeat_interval_seconds",
            ],
            "properties": {
                "success": {"const": True},
                "agent_id": {"type": "string"},
                "status": {"type": "string", "enum": ["registered", "re-registered"]},
                "registered_at": _TIME_MS,
                "heartbeat_url": {
                    "type": "string",
                    "examples": ["/api/v1/agents/performance-agent-1/heartbeat"],
                },
                "heartbeat_interval_seconds": _INTERVAL,
            },
        },
        "HeartbeatAccepted": {
            "type": "object",
            "required": ["received", "next_interval_seconds", "timestamp"],
            "properties": {
                "received": {"const": True},
                "next_interval_seconds": _INTERVAL,
                "timestamp": _TIME_S,
            },
        },
        "Unregistered": {
            "type": "object",
            "required": ["message"],
            "properties": {"message": {"const": "Agent unregistered successfully"}},
        },
        "Health": {
            "type": "object",
            "required": ["status", "timestamp", "version", "uptime"],
            "properties": {
                "status": {"const": "healthy"},
                "timestamp": _TIME_S,
                "version": {"type": "string", "examples": [__version__]},
                "uptime": {
                    "type": "string",
                    "pattern": r"^(\d+h)?(\d+m)?\d+s$",
                    "description": "Go duration style, whole seconds.",
                    "examples": ["5m30s"],
                },
            },
        },
        "Index": {
            "type": "object",
            "required": ["service", "version", "status"],
            "properties": {
                "service": {"const": SERVICE_NAME},
                "version": {"type": "string", "examples": [__version__]},
                "status": {"const": "running"},
            },
        },
        "Alive": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"const": "alive"}},
        },
        "Ready": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"const": "ready"}},
        },
        "NotReady": {
            "type": "object",
            "required": ["status", "reasons"],
            "properties": {
                "status": {"const": "not ready"},
                "reasons": {
                    "type": "object",
                    "additionalProperties": {"type": "string"},
                    "description": "Why, by component (`server`: draining, ...).",
                    "examples": [{"server": "draining"}],
                },
            },
        },
        "Error": {
            "type": "object",
            "required": ["error", "request_id"],
            "properties": {
                "error": {"type": "string", "description": "What went wrong."},
                "field": {
                    "type": "string",
                    "description": (
                        "The request field at fault (`body`, `content-type`, a "
                        "body field such as `port` or `capabilities[2]`, a path "
                        "or query parameter, a header such as `Idempotency-Key`)."
                    ),
                },
                "detail": {"type": "string", "description": "What is wrong with it."},
                "request_id": {
                    "type": "string",
                    "description": "The X-Request-ID of the answer.",
                },
                "agent_id": {
                    "type": "string",
                    "description": "The agent that was not found (404).",
                },
                "task_id": {
                    "type": "string",
                    "description": (
                        "The task that was not found (404), that the "
                        "Idempotency-Key already created (409), or that has "
                        "already finished (409)."
                    ),
                },
                "status": {
                    "anyOf": [
                        _schema("TaskStatus"),
                        _schema("ApprovalStatus"),
                        _schema("PlanStatus"),
                    ],
                    "description": (
                        "The status of the finished task, the decided approval "
                        "or the plan that is no longer pending (409)."
                    ),
                },
                "approval_id": {
                    "type": "string",
                    "description": (
                        "The approval that was not found (404) or could not be "
                        "decided (409)."
                    ),
                },
                "plan_id": {
                    "type": "string",
                    "description": (
                        "The plan that was not found (404) or is not pending (409)."
                    ),
                },
                "coordination_id": {
                    "type": "string",
                    "description": "The coordination that was not found (404).",
                },
                "action": {
                    "const": "register",
                    "description": "What the agent should do next (404 heartbeat).",
                },
                "max_bytes": {
                    "type": "integer",
                    "description": "The largest body accepted (413).",
                },
            },
        },
    }


#: The router's defaults, which the body of C{POST /tasks} falls back on.
_ROUTER: Final = RouterConfig()


def _decider(does: str) -> str:
    return (
        f"Who {does}; required when the service has no API keys. With keys it "
        "is the key's name: it may be left out, and another value is a 403 "
        "naming `user_id`."
    )


def _priority(meaning: str) -> dict[str, Any]:
    """A priority: by number within L{PRIORITY}'s bounds, or by name."""
    return {
        "anyOf": [
            {
                "type": "integer",
                "minimum": PRIORITY.minimum,
                "maximum": PRIORITY.maximum,
            },
            {"type": "string", "enum": list(PRIORITIES)},
            {"type": "null"},
        ],
        "default": PRIORITY.default,
        "description": (
            f"{meaning} A whole number from {PRIORITY.minimum} to "
            f"{PRIORITY.maximum}, or a name ("
            + ", ".join(f"{n} = {v}" for n, v in PRIORITIES.items())
            + "). Absent: normal."
        ),
        "examples": ["high", 12],
    }


def _task_schemas() -> dict[str, Any]:
    lowest, highest = min(PRIORITIES.values()), max(PRIORITIES.values())
    by_agent: dict[str, list[str]] = {}
    for task_type, agent_type in TASK_TYPES.items():
        by_agent.setdefault(agent_type, []).append(task_type)
    time_or_null = {
        "type": ["string", "null"],
        "format": "date-time",
        "examples": ["2025-10-16T10:00:00.250Z"],
    }
    task: dict[str, Any] = {
        "type": "object",
        "required": [
            "task_id",
            "status",
            "agent_id",
            "result",
            "error",
            "created_at",
            "started_at",
            "completed_at",
            "retry_count",
            "task_type",
            "agent_type",
            "priority",
            "timeout_seconds",
            "deadline",
        ],
        "properties": {
            "task_id": _schema("TaskId"),
            "status": _schema("TaskStatus"),
            "agent_id": {
                "type": ["string", "null"],
                "description": (
                    "The agent it was last sent to; null until it is sent."
                ),
            },
            "result": {
                "description": (
                    "The `result` of the agent's answer (any JSON); null until "
                    "the task is completed."
                ),
            },
            "error": {
                "type": ["string", "null"],
                "description": (
                    "Why it failed or timed out, or why its last attempt was "
                    "retried; null when it completed or no attempt went wrong."
                ),
            },
            "created_at": _TIME_MS,
            "started_at": {
                **time_or_null,
                "description": "When it was first sent; null before that.",
            },
            "completed_at": {
                **time_or_null,
                "description": "When it reached a final status; null before that.",
            },
            "retry_count": {
                "type": "integer",
                "minimum": 0,
                "description": "Attempts made after the first.",
            },
            "task_type": {
                "type": "string",
                "pattern": _whole(TOKEN),
                "maxLength": 128,
                "description": (
                    "A submitted task's `task_type` (see TaskType); a plan "
                    "step's task carries its template's task type, or the "
                    "recommendation's `action` when no template has one."
                ),
            },
            "agent_type": _schema("AgentType"),
            "priority": {"type": "integer", "minimum": lowest, "maximum": highest},
            "timeout_seconds": {
                "type": "number",
                "minimum": 0.001,
                "maximum": _ROUTER.max_timeout,
            },
            "deadline": {
                **_TIME_MS,
                "description": "`created_at` plus `timeout_seconds`.",
            },
        },
    }
    task_detail = {
        **task,
        "required": [*task["required"], "history"],
        "properties": {
            **task["properties"],
            "history": {
                "type": "array",
                "items": _schema("TaskEvent"),
                "description": "Every status it has had, oldest first.",
            },
        },
    }
    return {
        "TaskType": {
            **TASK_TYPE_FIELD.schema(),
            "description": "What to do, in the agents' own words. Accepted when "
            "an agent of `agent_type` registered now lists it among its "
            "capabilities (`kv_cache_optimization`, `spot_migration`, ...), "
            "when it is listed in the `TASK_TYPES` setting, or when it is one of "
            "the contract's, each done by one type of agent: "
            + ", ".join(f"{t} ({a})" for t, a in sorted(TASK_TYPES.items()))
            + ". Otherwise a 400 lists what is offered for `agent_type`.",
            "examples": ["analyze_cost"],
        },
        "TaskStatus": {
            "type": "string",
            "enum": list(TASK_STATUSES),
            "description": (
                "pending: accepted; queued: waiting for a free agent; sent: out "
                "at an agent; running: in the contract, not set by this version; "
                "retrying: waiting to be sent again after an attempt got no "
                "usable answer; completed, failed, timeout (the deadline passed), "
                "cancelled: final (" + ", ".join(FINISHED) + ")."
            ),
        },
        "TaskId": {
            "type": "string",
            "description": (
                "A UUID given by the service (version 7: ids sort by creation "
                "time, to the millisecond)."
            ),
            "examples": ["019abb1e-7c2a-7d41-9f55-2a7e6b1d3c40"],
        },
        "TaskRequest": body_schema(
            [
                Reference("task_type", "TaskType"),
                Reference("agent_type", "AgentType"),
                TASK_AGENT_ID,
                PARAMETERS,
                METADATA,
                TIMEOUT,
                MAX_RETRIES,
            ],
            "A task for an agent of `agent_type`, which must be the type that "
            "does `task_type` (otherwise a 400 naming `agent_type`). Optional "
            "fields sent as null are read as absent. Other fields are ignored.",
            described={"priority": _priority("Higher is sent first.")},
            anyOf=[
                {
                    "properties": {
                        "agent_type": {"const": agent_type},
                        "task_type": {"enum": sorted(by_agent[agent_type])},
                    }
                }
                for agent_type in AGENT_TYPES
                if agent_type in by_agent
            ]
            + [
                {
                    "properties": {
                        "task_type": {
                            "pattern": "^(?!(?:" + "|".join(sorted(TASK_TYPES)) + ")$)",
                            "description": "Not one of the contract's task types: "
                            "any agent type that offers it.",
                        }
                    }
                }
            ],
        ),
        "TaskAccepted": {
            "type": "object",
            "required": ["task_id", "status", "agent_id", "created_at", "status_url"],
            "properties": {
                "task_id": _schema("TaskId"),
                "status": _schema("TaskStatus"),
                "agent_id": {
                    "type": ["string", "null"],
                    "description": (
                        "The agent it was sent to, else the one asked for, else "
                        "null (the router picks one)."
                    ),
                },
                "created_at": _TIME_MS,
                "status_url": {
                    "type": "string",
                    "description": "Where to follow it: `/tasks/{task_id}`.",
                    "examples": ["/tasks/0b9c3f5e-8d4a-4c1e-9f55-2a7e6b1d3c40"],
                },
            },
        },
        "Task": task,
        "TaskDetail": task_detail,
        "TaskEvent": {
            "type": "object",
            "required": ["status", "at", "detail"],
            "properties": {
                "status": _schema("TaskStatus"),
                "at": _TIME_MS,
                "detail": {
                    "type": ["string", "null"],
                    "description": "Why, when there is something to say.",
                    "examples": ["sent to cost-agent-1"],
                },
            },
        },
        "TaskInList": {
            **task,
            "required": [r for r in task["required"] if r != "result"],
            "description": "A task as listed: `result` only with `fields=result`.",
        },
        "TaskList": {
            "type": "object",
            "required": ["tasks", "count", "limit", "offset"],
            "properties": {
                "tasks": {"type": "array", "items": _schema("TaskInList")},
                "truncated": {
                    "type": "boolean",
                    "description": (
                        "With `fields=result` only: the page stopped early, "
                        "its results being past 8 MiB; go on at `next_offset`."
                    ),
                },
                "next_offset": {"type": "integer", "minimum": 0},
                "count": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "How many tasks this page holds.",
                },
                "limit": {"type": "integer", "minimum": 0, "maximum": MAX_PAGE},
                "offset": {"type": "integer", "minimum": 0},
            },
        },
    }


#: The coordination settings' defaults, quoted in the descriptions.
_SETTINGS: Final = Settings()
#: The times the coordination API reads: RFC 3339 with a zone, upper-case T and Z.
_RFC3339: Final = (
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})$"
)
#: The step statuses, in the order a step goes through them.
_STEP_STATUSES: Final = (
    STEP_PENDING,
    STEP_RUNNING,
    STEP_COMPLETED,
    STEP_FAILED,
    STEP_SKIPPED,
    STEP_ROLLING_BACK,
    STEP_ROLLED_BACK,
    STEP_ROLLBACK_FAILED,
)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:g} h"


def _coordination_schemas() -> dict[str, Any]:
    lowest, highest = min(PRIORITIES.values()), max(PRIORITIES.values())
    document: dict[str, Any] = {
        "type": "object",
        "description": f"Any JSON object, at most {MAX_DOCUMENT} bytes serialised.",
    }
    time_in = {
        "type": ["string", "null"],
        "maxLength": 64,
        "pattern": _RFC3339,
        "format": "date-time",
        "examples": ["2025-10-16T10:00:00Z", "2025-10-16T12:00:00+02:00"],
    }
    time_or_null = {
        "type": ["string", "null"],
        "format": "date-time",
        "examples": ["2025-10-16T10:00:00.250Z"],
    }
    strings = {"type": "array", "items": {"type": "string"}}
    medium, high, critical = (
        _SETTINGS.approval_expiry_medium,
        _SETTINGS.approval_expiry_high,
        _SETTINGS.approval_expiry_critical,
    )
    approval: dict[str, Any] = {
        "type": "object",
        "description": (
            "A risky recommendation waiting for people, or what they decided."
        ),
        "required": [
            "id",
            "coordination_id",
            "customer_id",
            "recommendation_id",
            "recommendation",
            "risk_level",
            "status",
            "required_approvals",
            "approved_by",
            "decisions",
            "rejected_by",
            "rejection_reason",
            "created_at",
            "expires_at",
            "decided_at",
            "execute_now",
            "plan_id",
        ],
        "properties": {
            "id": {"type": "string", "description": "A UUID, given by the service."},
            "coordination_id": {"type": "string"},
            "customer_id": {"type": "string"},
            "recommendation_id": {"type": "string"},
            "recommendation": {
                **_schema("Recommendation"),
                "description": (
                    "The recommendation as it was coordinated; its `status` "
                    "stays pending whatever is decided."
                ),
            },
            "risk_level": _schema("RiskLevel"),
            "status": _schema("ApprovalStatus"),
            "required_approvals": {
                "type": "integer",
                "minimum": 1,
                "description": (
                    "Different people who must approve: CRITICAL_APPROVERS "
                    f"(default {_SETTINGS.critical_approvers}) for a critical "
                    "change, else 1."
                ),
            },
            "approved_by": {
                **strings,
                "description": "Who has approved, in order.",
            },
            "decisions": {
                "type": "array",
                "description": "Every approval and rejection, in order.",
                "items": {
                    "type": "object",
                    "required": ["user_id", "decision", "at", "reason"],
                    "properties": {
                        "user_id": {"type": "string"},
                        "decision": {
                            "type": "string",
                            "enum": ["approved", "rejected"],
                        },
                        "at": _TIME_MS,
                        "reason": {
                            "type": ["string", "null"],
                            "description": "Why it was rejected; null for approvals.",
                        },
                    },
                },
            },
            "rejected_by": {
                "type": ["string", "null"],
                "description": "Who rejected it; null unless rejected.",
            },
            "rejection_reason": {
                "type": ["string", "null"],
                "description": "Why; null unless rejected.",
            },
            "created_at": _TIME_MS,
            "expires_at": {
                **_TIME_MS,
                "description": (
                    "`created_at` plus the expiry for its risk level "
                    f"(APPROVAL_EXPIRY_MEDIUM, default {_hours(medium)}; "
                    f"APPROVAL_EXPIRY_HIGH, {_hours(high)}; "
                    f"APPROVAL_EXPIRY_CRITICAL, {_hours(critical)})."
                ),
            },
            "decided_at": {
                **time_or_null,
                "description": (
                    "When it was approved (by the last approver needed), "
                    "rejected, or the time it expired at once the expiry is "
                    "recorded; null while pending."
                ),
            },
            "execute_now": {
                "type": "boolean",
                "description": (
                    "The coordination's `execute_now`: the plan starts as soon "
                    "as the approval is granted."
                ),
            },
            "plan_id": {
                "type": ["string", "null"],
                "description": "The plan made when it was approved; null before.",
            },
        },
    }
    return {
        "RiskLevel": {
            "type": "string",
            "enum": list(RISK_LEVELS),
            "description": (
                "low: carried out without asking (a plan is made at once); "
                "medium, high: one person must approve; critical: "
                f"CRITICAL_APPROVERS (default {_SETTINGS.critical_approvers}) "
                "different people must."
            ),
        },
        "ApprovalStatus": {
            "type": "string",
            "enum": list(APPROVAL_STATUSES),
            "description": (
                "pending: waiting for people; approved: enough people approved "
                "(the plan is made); rejected: someone rejected it; expired: no "
                "decision before `expires_at` (shown as soon as it passes, even "
                "before the sweep records it). All but pending are final."
            ),
        },
        "PlanStatus": {
            "type": "string",
            "enum": list(PLAN_STATUSES),
            "description": (
                "pending: made, waiting for `POST .../execute` (or started at "
                "once with `execute_now`); waiting: execution asked for, the "
                "plans of the recommendations it depends on (`after`) have not "
                "completed yet; running: its steps are being sent as tasks, one "
                "at a time; rolling_back: a critical step failed, the completed "
                "reversible steps are being undone, last first; completed, "
                "rolled_back, rollback_failed (the change is half done: a person "
                "must act), cancelled (a dependency was rejected, expired or "
                "did not complete): final."
            ),
        },
        "StepStatus": {
            "type": "string",
            "enum": list(_STEP_STATUSES),
            "description": (
                "pending, running, completed; failed (a non-critical step's "
                "failure is recorded and the plan goes on); skipped (not run "
                "because an earlier critical step failed); rolling_back, "
                "rolled_back, rollback_failed: its rollback task's progress."
            ),
        },
        "RecommendationRequest": body_schema(
            RECOMMENDATION,
            "One agent's proposed change. Optional fields sent as null are read "
            "as absent. Other fields (`status` among them) are ignored.",
            described={
                "estimated_impact": {"description": "Any JSON, kept as is."},
                "priority": _priority(
                    "Ranks conflicting recommendations, and is the priority of "
                    "its plan's tasks."
                ),
                "created_at": {**time_in, "description": "Kept as given."},
                "expires_at": {
                    **time_in,
                    "description": (
                        "A recommendation already past it is dropped, not coordinated."
                    ),
                },
                "window": _nullable(
                    {
                        "type": "object",
                        "description": (
                            "When it would run; `end` must be after `start`."
                        ),
                        "required": ["start", "end"],
                        "properties": {
                            "start": {
                                **time_in,
                                "type": "string",
                                "examples": ["2025-10-16T22:00:00Z"],
                            },
                            "end": {
                                **time_in,
                                "type": "string",
                                "examples": ["2025-10-17T02:00:00Z"],
                            },
                        },
                    }
                ),
            },
        ),
        "CoordinationRequest": {
            "type": "object",
            "description": (
                "A batch of recommendations for one customer. Optional fields "
                "sent as null are read as absent. Other fields are ignored."
            ),
            "required": ["customer_id", "recommendations"],
            "properties": {
                "customer_id": CUSTOMER_ID.schema(),
                "recommendations": {
                    "type": "array",
                    "items": _schema("RecommendationRequest"),
                    "minItems": 1,
                    "maxItems": MAX_RECOMMENDATIONS,
                },
                "auto_approve": _nullable(
                    {
                        "type": "boolean",
                        "default": False,
                        "description": (
                            "Make every kept recommendation's plan at once, "
                            "whatever its risk: no approvals are asked for."
                        ),
                    }
                ),
                "execute_now": _nullable(
                    {
                        "type": "boolean",
                        "default": False,
                        "description": (
                            "Start the plans made now at once, and the others "
                            "as soon as their approval is granted."
                        ),
                    }
                ),
                "metadata": _nullable(
                    {
                        **document,
                        "description": (
                            "Only `constraints` is read: " + document["description"]
                        ),
                        "properties": {
                            "constraints": _nullable(
                                {
                                    "type": "object",
                                    "description": (
                                        "The customer's wishes, the first rule "
                                        "when settling a conflict."
                                    ),
                                    "properties": {
                                        field.key: field.schema()
                                        for field in CONSTRAINTS
                                    },
                                }
                            )
                        },
                    }
                ),
            },
        },
        "Recommendation": {
            "type": "object",
            "description": "A recommendation as the service keeps it.",
            "required": [
                "id",
                "agent_id",
                "agent_type",
                "customer_id",
                "type",
                "title",
                "description",
                "action",
                "risk_level",
                "estimated_savings",
                "estimated_impact",
                "affected_resources",
                "parameters",
                "dependencies",
                "priority",
                "confidence",
                "created_at",
                "expires_at",
                "status",
                "metadata",
                "window",
            ],
            "properties": {
                "id": {"type": "string"},
                "agent_id": {
                    "type": "string",
                    "description": "Empty when not given.",
                },
                "agent_type": _schema("AgentType"),
                "customer_id": {"type": "string"},
                "type": {"type": "string", "description": "Empty when not given."},
                "title": {"type": "string", "description": "Empty when not given."},
                "description": {
                    "type": "string",
                    "description": "Empty when not given.",
                },
                "action": {"type": "string"},
                "risk_level": _schema("RiskLevel"),
                "estimated_savings": {"type": "number"},
                "estimated_impact": {"description": "As given; null when not."},
                "affected_resources": strings,
                "parameters": {"type": "object"},
                "dependencies": strings,
                "priority": {"type": "integer", "minimum": lowest, "maximum": highest},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                "created_at": {
                    **time_or_null,
                    "description": "As given, in UTC; null when not.",
                },
                "expires_at": {
                    **time_or_null,
                    "description": "As given, in UTC; null when not.",
                },
                "status": {
                    "type": "string",
                    "enum": list(APPROVAL_STATUSES),
                    "description": (
                        "approved once its plan is made; pending while it waits "
                        "for approval; rejected or expired as its approval was."
                    ),
                },
                "metadata": {"type": "object"},
                "window": {
                    "type": ["object", "null"],
                    "description": "As given, in UTC; null when not.",
                    "required": ["start", "end"],
                    "properties": {"start": _TIME_MS, "end": _TIME_MS},
                },
            },
        },
        "Conflict": {
            "type": "object",
            "description": "Recommendations that cannot all go ahead, and the outcome.",
            "required": [
                "id",
                "type",
                "recommendation_ids",
                "description",
                "severity",
                "conflicting_field",
                "detected_at",
                "resolved",
                "resolution",
                "resolved_at",
                "kept",
                "dropped",
                "rule",
            ],
            "properties": {
                "id": {"type": "string", "description": "A UUID."},
                "type": {
                    "type": "string",
                    "enum": list(CONFLICT_TYPES),
                    "description": (
                        "resource: both affect the same resource; action: their "
                        "actions contradict each other; timing: overlapping "
                        "windows on related resources; dependency: a cycle, a "
                        "dependency outside the batch, or one that was dropped."
                    ),
                },
                "recommendation_ids": strings,
                "description": {"type": "string"},
                "severity": {
                    "type": "string",
                    "enum": sorted(set(SEVERITY.values())),
                    "description": ", ".join(
                        f"{kind}: {level}" for kind, level in SEVERITY.items()
                    )
                    + ".",
                },
                "conflicting_field": {
                    "type": "string",
                    "description": "The recommendation field the conflict is about.",
                    "examples": ["affected_resources"],
                },
                "detected_at": _TIME_MS,
                "resolved": {
                    "const": True,
                    "description": "Every conflict is settled when detected.",
                },
                "resolution": {"type": "string", "description": "What was done, why."},
                "resolved_at": _TIME_MS,
                "kept": {**strings, "description": "Those of its ids kept."},
                "dropped": {**strings, "description": "Those of its ids dropped."},
                "rule": {
                    "type": "string",
                    "enum": [*RULES, DEPENDENCY],
                    "description": (
                        "What decided, the rank rules most important first: "
                        "customer constraints, agent type ("
                        + " > ".join(
                            sorted(
                                AGENT_TYPE_RANK,
                                key=AGENT_TYPE_RANK.__getitem__,
                                reverse=True,
                            )
                        )
                        + "), priority, estimated savings, confidence, lower "
                        "risk, then the smaller id (tie_break); or dependency."
                    ),
                },
            },
        },
        "Approval": approval,
        "ApprovalAndPlan": {
            **approval,
            "description": "The approval as it is now, and the plan it led to.",
            "required": [*approval["required"], "plan"],
            "properties": {
                **approval["properties"],
                "plan": {
                    "anyOf": [_schema("Plan"), {"type": "null"}],
                    "description": (
                        "The plan, made once enough people have approved "
                        "(started already with `execute_now`); null while more "
                        "approvals are needed."
                    ),
                },
            },
        },
        "ApprovalList": {
            "type": "object",
            "required": ["approvals", "count", "limit", "offset"],
            "properties": {
                "approvals": {"type": "array", "items": _schema("Approval")},
                "count": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "How many approvals this page holds.",
                },
                "limit": {"type": "integer", "minimum": 0, "maximum": MAX_PAGE},
                "offset": {"type": "integer", "minimum": 0},
            },
        },
        "ApproveRequest": body_schema(
            [
                attrs.evolve(USER_ID, description=_decider("approves")),
                attrs.evolve(REASON, required=False),
            ],
            "Other fields are ignored.",
        ),
        "RejectRequest": body_schema(
            [attrs.evolve(USER_ID, description=_decider("rejects")), REASON],
            "Other fields are ignored.",
        ),
        "PlanStep": {
            "type": "object",
            "required": [
                "index",
                "task_type",
                "agent_type",
                "critical",
                "reversible",
                "rollback_task_type",
                "timeout_seconds",
                "status",
                "task_id",
                "rollback_task_id",
                "started_at",
                "completed_at",
                "result",
                "error",
            ],
            "properties": {
                "index": {"type": "integer", "minimum": 0},
                "task_type": {
                    "type": "string",
                    "description": "The task sent to do it.",
                    "examples": ["take_snapshot"],
                },
                "agent_type": _schema("AgentType"),
                "critical": {
                    "type": "boolean",
                    "description": (
                        "Its failure rolls the plan back; a non-critical step's "
                        "failure is recorded and the plan goes on."
                    ),
                },
                "reversible": {
                    "type": "boolean",
                    "description": "Whether it has a rollback task.",
                },
                "rollback_task_type": {
                    "type": ["string", "null"],
                    "description": "The task that undoes it; null when none.",
                },
                "timeout_seconds": {
                    "type": "number",
                    "minimum": 0,
                    "description": "Its task's `timeout_seconds`.",
                },
                "status": _schema("StepStatus"),
                "task_id": {
                    "type": ["string", "null"],
                    "description": "Its task (see `GET /tasks/{task_id}`); null "
                    "until sent.",
                },
                "rollback_task_id": {
                    "type": ["string", "null"],
                    "description": "Its rollback task; null unless rolled back.",
                },
                "started_at": {
                    **time_or_null,
                    "description": "When its task was sent; null before.",
                },
                "completed_at": {
                    **time_or_null,
                    "description": "When its task ended; null before.",
                },
                "result": {
                    "description": (
                        "Its task's result (any JSON); null until it completed."
                    )
                },
                "error": {
                    "type": ["string", "null"],
                    "description": "Why it or its rollback failed; null if not.",
                },
            },
        },
        "Plan": {
            "type": "object",
            "description": (
                "The steps carrying out one approved recommendation, each a task "
                "routed like those of `POST /tasks`. The action's template gives "
                "the steps: "
                + "; ".join(
                    f"{action}: " + ", ".join(step.task_type for step in steps)
                    for action, steps in DEFAULT_TEMPLATES.items()
                )
                + " (PLAN_TEMPLATES_FILE adds others); any other action is one "
                "step."
            ),
            "required": [
                "id",
                "coordination_id",
                "customer_id",
                "recommendation_id",
                "action",
                "status",
                "steps",
                "after",
                "created_at",
                "requested_at",
                "started_at",
                "completed_at",
                "error",
            ],
            "properties": {
                "id": {"type": "string", "description": "A UUID."},
                "coordination_id": {"type": "string"},
                "customer_id": {"type": "string"},
                "recommendation_id": {"type": "string"},
                "action": {"type": "string"},
                "status": _schema("PlanStatus"),
                "steps": {"type": "array", "items": _schema("PlanStep")},
                "after": {
                    **strings,
                    "description": (
                        "Recommendations of the same coordination whose plans "
                        "must complete before this one starts."
                    ),
                },
                "created_at": _TIME_MS,
                "requested_at": {
                    **time_or_null,
                    "description": (
                        "When execution was asked for; null before. A plan "
                        "still waiting for its dependencies' plans when the "
                        "longest approval expiry has passed since is cancelled."
                    ),
                },
                "started_at": {
                    **time_or_null,
                    "description": "When its first step started; null before.",
                },
                "completed_at": {
                    **time_or_null,
                    "description": "When it reached a final status; null before.",
                },
                "error": {
                    "type": ["string", "null"],
                    "description": "Why it failed or was cancelled; null if not.",
                },
            },
        },
        "ExecutionStarted": {
            "type": "object",
            "required": ["message", "plan_id", "status"],
            "properties": {
                "message": {"const": "Execution started"},
                "plan_id": {"type": "string"},
                "status": {
                    "const": WAITING,
                    "description": (
                        "The plan runs once the plans it depends on have "
                        "completed (at once when there are none)."
                    ),
                },
            },
        },
        "CoordinationResult": {
            "type": "object",
            "required": [
                "id",
                "customer_id",
                "total_recommendations",
                "conflicts_detected",
                "conflicts_resolved",
                "recommendations_kept",
                "approvals_required",
                "auto_approved",
                "conflicts",
                "recommendations",
                "dropped",
                "approvals",
                "execution_plans",
                "created_at",
            ],
            "properties": {
                "id": {
                    "type": "string",
                    "description": (
                        "A UUID: read the result again at `/coordination/results/{id}`."
                    ),
                },
                "customer_id": {"type": "string"},
                "total_recommendations": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "How many the request held.",
                },
                "conflicts_detected": {"type": "integer", "minimum": 0},
                "conflicts_resolved": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "Equal to `conflicts_detected`.",
                },
                "recommendations_kept": {"type": "integer", "minimum": 0},
                "approvals_required": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "Kept recommendations waiting for approval.",
                },
                "auto_approved": {
                    "type": "integer",
                    "minimum": 0,
                    "description": (
                        "Kept recommendations whose plan was made at once (low "
                        "risk, or `auto_approve`)."
                    ),
                },
                "conflicts": {"type": "array", "items": _schema("Conflict")},
                "recommendations": {
                    "type": "array",
                    "items": _schema("Recommendation"),
                    "description": "Those kept, dependencies first.",
                },
                "dropped": {
                    "type": "array",
                    "description": "Those not kept, by id.",
                    "items": {
                        "type": "object",
                        "required": ["id", "reason"],
                        "properties": {
                            "id": {"type": "string"},
                            "reason": {
                                "type": "string",
                                "examples": ["it expired before coordination"],
                            },
                        },
                    },
                },
                "approvals": {"type": "array", "items": _schema("Approval")},
                "execution_plans": {"type": "array", "items": _schema("Plan")},
                "created_at": _TIME_MS,
            },
        },
    }


# Components shared by operations --------------------------------------------------


def _components() -> dict[str, Any]:
    error = _schema("Error")
    return {
        "schemas": {**_schemas(), **_task_schemas(), **_coordination_schemas()},
        "securitySchemes": {
            "bearerAuth": {
                "type": "http",
                "scheme": "bearer",
                "description": (
                    "An API key (`oik_...`) as `Authorization: Bearer <key>`. Keys "
                    "are listed, hashed, in API_KEYS_FILE; without one (or with "
                    "AUTH_DISABLED) no key is needed."
                ),
            },
            "apiKeyAuth": {
                "type": "apiKey",
                "in": "header",
                "name": "X-API-Key",
                "description": (
                    "The same API key in `X-API-Key`. Sending both headers with "
                    "different keys is refused."
                ),
            },
        },
        "parameters": {
            "RequestId": {
                "name": "X-Request-ID",
                "in": "header",
                "required": False,
                "description": (
                    "Echoed in the answer when it is a token of up to 128 letters, "
                    "digits and `. _ : -`; otherwise the server makes one up."
                ),
                "schema": {"type": "string"},
            },
            "AgentId": {
                "name": "agent_id",
                "in": "path",
                "required": True,
                "description": "An invalid id is a 400 naming `agent_id`.",
                "schema": _schema("AgentId"),
            },
            "AgentTypePath": {
                "name": "agent_type",
                "in": "path",
                "required": True,
                "description": "Another value is a 400 naming `type`.",
                "schema": _schema("AgentType"),
            },
            "TypeQuery": {
                "name": "type",
                "in": "query",
                "required": False,
                "description": "Only agents of this type (the last one if repeated).",
                "schema": _schema("AgentType"),
            },
            "StatusQuery": {
                "name": "status",
                "in": "query",
                "required": False,
                "description": (
                    "Only agents with this status now (the last one if repeated)."
                ),
                "schema": _schema("AgentStatus"),
            },
            "CapabilityQuery": {
                "name": "capability",
                "in": "query",
                "required": False,
                "description": "Only agents having every capability given; repeatable.",
                "style": "form",
                "explode": True,
                "schema": {
                    "type": "array",
                    "items": {"type": "string"},
                    "maxItems": MAX_QUERY_CAPABILITIES,
                },
            },
            "TaskId": {
                "name": "task_id",
                "in": "path",
                "required": True,
                "description": (
                    "As answered by `POST /tasks`. An id that is not a token of "
                    "up to 128 letters, digits and `. _ : @ -` is a 400 naming "
                    "`task_id`."
                ),
                "schema": {
                    "type": "string",
                    "pattern": _whole(TOKEN),
                    "maxLength": 128,
                },
            },
            "ApprovalId": _path_id(
                "approval_id", "As listed in a coordination's `approvals`."
            ),
            "PlanId": _path_id(
                "plan_id",
                "As listed in a coordination's `execution_plans`, or an "
                "approval's `plan_id`.",
            ),
            "CoordinationId": _path_id(
                "coordination_id", "The `id` of a coordination's result."
            ),
            "CustomerIdQuery": {
                "name": "customer_id",
                "in": "query",
                "required": False,
                "description": (
                    "Only this customer's approvals (the last one if repeated); "
                    "an invalid id is a 400 naming `customer_id`."
                ),
                "schema": {
                    "type": "string",
                    "pattern": _whole(TOKEN),
                    "maxLength": 128,
                },
            },
            "ApprovalStatusQuery": {
                "name": "status",
                "in": "query",
                "required": False,
                "description": (
                    "Only approvals with this status now (the last one if "
                    "repeated); another value is a 400 naming `status`."
                ),
                "schema": _schema("ApprovalStatus"),
            },
            "TaskStatusQuery": {
                "name": "status",
                "in": "query",
                "required": False,
                "description": (
                    "Only tasks with this status (the last one if repeated); "
                    "another value is a 400 naming `status`."
                ),
                "schema": _schema("TaskStatus"),
            },
            "TaskAgentIdQuery": {
                "name": "agent_id",
                "in": "query",
                "required": False,
                "description": (
                    "Only tasks sent to this agent (the last one if repeated)."
                ),
                "schema": {"type": "string"},
            },
            "TaskAgentTypeQuery": {
                "name": "agent_type",
                "in": "query",
                "required": False,
                "description": (
                    "Only tasks for this type of agent (the last one if repeated)."
                ),
                "schema": _schema("AgentType"),
            },
            "TaskFieldsQuery": {
                "name": "fields",
                "in": "query",
                "required": False,
                "description": (
                    "`result` to include each task's result (left out "
                    "otherwise); a page then stops once its results pass 8 MiB."
                ),
                "schema": {"type": "string", "enum": ["result"]},
            },
            "TaskTypeQuery": {
                "name": "task_type",
                "in": "query",
                "required": False,
                "description": "Only tasks of this type (the last one if repeated).",
                "schema": _schema("TaskType"),
            },
            "AgentLimitQuery": {
                "name": "limit",
                "in": "query",
                "required": False,
                "description": (
                    "At most this many agents (a page, as tasks are listed); "
                    f"anything but a whole number up to {MAX_PAGE} is a 400 "
                    "naming `limit`. Absent: every agent, up to 10,000."
                ),
                "schema": {"type": "integer", "minimum": 0, "maximum": MAX_PAGE},
            },
            "LimitQuery": LIMIT.parameter(),
            "OffsetQuery": OFFSET.parameter(),
            "IdempotencyKey": {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": (
                    "Makes the request safe to repeat: the same key with the "
                    "same body answers with what the first one made (the task, "
                    "201, or the coordination, 200; `Idempotent-Replayed: "
                    "true`) for as long as that is kept; the same key with "
                    "another body is a 409. 1 to 255 "
                    "visible ASCII characters; another value is a 400 naming "
                    "`Idempotency-Key`."
                ),
                "schema": {
                    "type": "string",
                    "pattern": _whole(IDEMPOTENCY_KEY),
                    "examples": ["order-2025-10-16-0001"],
                },
            },
            "Traceparent": {
                "name": "traceparent",
                "in": "header",
                "required": False,
                "description": (
                    "W3C trace context, passed on to the agent with the task "
                    f"when it is well formed (`{TRACEPARENT.pattern}`); any other "
                    "value is ignored, as W3C Trace Context asks (a new trace "
                    "starts), never refused."
                ),
                "schema": {"type": "string"},
            },
        },
        "headers": {
            "XRequestId": {
                "description": "This request's id, also in its access log line.",
                "required": True,
                "schema": {"type": "string"},
            },
            "RetryAfter": {
                "description": "Seconds to wait before trying again.",
                "required": True,
                "schema": {"type": "integer", "minimum": 0},
            },
            "WwwAuthenticate": {
                "description": 'Always `Bearer realm="optiinfra"`.',
                "required": True,
                "schema": {"type": "string"},
            },
            "Allow": {
                "description": "The methods this path serves.",
                "required": True,
                "schema": {"type": "string"},
            },
            "IdempotentReplayed": {
                "description": (
                    "Present, as `true`, when the answer is the task an earlier "
                    "request with the same Idempotency-Key and body created."
                ),
                "required": False,
                "schema": {"type": "string", "enum": ["true"]},
            },
        },
        "responses": {
            "BadRequest": _answer(
                "A parameter or body field is invalid: `error` is "
                '"invalid request", `field` names it and `detail` says why.',
                error,
            ),
            "Unauthorized": _answer(
                "No usable API key was presented.",
                error,
                headers={"WWW-Authenticate": _ref("headers", "WwwAuthenticate")},
            ),
            "Forbidden": _answer("The key's role does not allow this.", error),
            "AgentNotFound": _answer(
                'No such agent: `error` is "Agent not found" (for a heartbeat, '
                '"Agent not found: register again at /agents/register" with '
                '`action`: "register"), `agent_id` names it.',
                error,
            ),
            "TaskNotFound": _answer(
                'No such task: `error` is "Task not found", `task_id` names it. '
                "Finished tasks are kept for RESULT_TTL (default an hour).",
                {**error, "required": ["task_id"]},
            ),
            "IdempotencyConflict": _answer(
                "The Idempotency-Key was already used with another body; "
                "`task_id` names the task it created.",
                {**error, "required": ["task_id"]},
            ),
            "CoordinationIdempotencyConflict": _answer(
                "The Idempotency-Key was already used with another body; "
                "`coordination_id` names the coordination it made.",
                {**error, "required": ["coordination_id"]},
            ),
            "TaskFinished": _answer(
                'The task has already finished: `error` is "task already '
                '<status>", `status` is that status and `task_id` names the task.',
                {
                    **error,
                    "required": ["task_id", "status"],
                    "properties": {"status": {"enum": list(FINISHED)}},
                },
            ),
            "ApprovalNotFound": _answer(
                'No such approval: `error` is "Approval not found", '
                "`approval_id` names it.",
                {**error, "required": ["approval_id"]},
            ),
            "ApprovalDecided": _answer(
                'The approval cannot take this decision: `error` is "approval '
                'is already <status>" (approved, rejected or expired; `status` '
                'says which), "<user_id> has already approved; another person '
                'must" (`status` pending), or, rarely, "approval is changing '
                'too fast; try again". `approval_id` names it.',
                {
                    **error,
                    "required": ["approval_id"],
                    "properties": {"status": _schema("ApprovalStatus")},
                },
            ),
            "PlanNotFound": _answer(
                'No such plan: `error` is "Plan not found", `plan_id` names it.',
                {**error, "required": ["plan_id"]},
            ),
            "PlanNotPending": _answer(
                'The plan has already been started: `error` is "plan is already '
                '<status>", `status` is that status and `plan_id` names the plan.',
                {
                    **error,
                    "required": ["plan_id", "status"],
                    "properties": {
                        "status": {"enum": [s for s in PLAN_STATUSES if s != PENDING]}
                    },
                },
            ),
            "CoordinationNotFound": _answer(
                'No such coordination: `error` is "Coordination not found", '
                "`coordination_id` names it.",
                {**error, "required": ["coordination_id"]},
            ),
            "MethodNotAllowed": _answer(
                "The path exists but does not serve this method.",
                error,
                headers={"Allow": _ref("headers", "Allow")},
            ),
            "PayloadTooLarge": _answer(
                "The body is larger than MAX_BODY_BYTES (default 1 MiB); the "
                "connection is closed.",
                error,
            ),
            "UnsupportedMediaType": _answer(
                "A body was sent with a content type other than "
                "`application/json` or `*/*+json` (`field`: `content-type`).",
                error,
            ),
            "StoreUnavailable": _answer(
                "The database is unavailable; try again later.",
                error,
                headers={"Retry-After": _ref("headers", "RetryAfter")},
            ),
            "Error": _answer(
                "Any other error, as the same JSON body: 404 for a path that does "
                "not exist, 405 (with Allow) for a method the path does not serve, "
                "500 for an internal error.",
                error,
            ),
        },
    }


# Paths ------------------------------------------------------------------------------


def _service_paths() -> dict[str, Any]:
    return {
        "/health": {
            "get": _public(
                "getHealth",
                "Liveness in the contract's shape",
                {"200": _answer("The service is up.", _schema("Health"))},
            )
        },
        "/": {
            "get": _public(
                "getIndex",
                "Which service this is",
                {"200": _answer("The service's name and version.", _schema("Index"))},
            )
        },
        "/livez": {
            "get": _public(
                "getLivez",
                "Liveness probe",
                {"200": _answer("The process is alive.", _schema("Alive"))},
            )
        },
        "/readyz": {
            "get": _public(
                "getReadyz",
                "Readiness probe",
                {
                    "200": _answer("Send traffic here.", _schema("Ready")),
                    "503": _answer(
                        "Do not send traffic here: draining, or a dependency "
                        "(the database) is failing.",
                        _schema("NotReady"),
                    ),
                },
            )
        },
        "/metrics": {
            "get": _public(
                "getMetrics",
                "Prometheus metrics",
                {
                    "200": _answer(
                        "The Prometheus text exposition format "
                        "(`text/plain; version=...; charset=utf-8`).",
                        content={"text/plain": {"schema": {"type": "string"}}},
                    )
                },
            )
        },
        "/openapi.json": {
            "get": _public(
                "getOpenApi",
                "This document",
                {
                    "200": _answer(
                        "The OpenAPI 3.1 description of this service.",
                        {"type": "object"},
                    )
                },
            )
        },
    }


def _registry_paths() -> dict[str, Any]:
    agent_id = _ref("parameters", "AgentId")
    filters = [
        _ref("parameters", "StatusQuery"),
        _ref("parameters", "CapabilityQuery"),
        _ref("parameters", "AgentLimitQuery"),
        _ref("parameters", "OffsetQuery"),
    ]
    listed = {"200": _answer("The matching agents.", _schema("AgentList"))}
    accepted = {
        "200": _answer("The heartbeat was recorded.", _schema("HeartbeatAccepted"))
    }
    unregistered = {"200": _answer("The agent is gone.", _schema("Unregistered"))}
    agent = {"200": _answer("The agent's record.", _schema("Agent"))}
    heartbeat_body = _body(
        "Heartbeat", "The agent's status and metadata; may be empty.", required=False
    )
    write = Permission.AGENT_WRITE.value
    read = Permission.READ_AGENTS.value
    body_errors = ("400", "401", "403", "413", "415", "503")
    return {
        # The contract's root paths.
        "/agents/register": {
            "post": _guarded(
                "registry",
                "registerAgent",
                "Register an agent (the contract's shape)",
                write,
                {
                    "201": _answer(
                        "Registered, or registered again (same id).",
                        _schema("Registered"),
                    ),
                    **_errors(*body_errors),
                },
                body=_body("Registration", "The agent.", required=True),
            )
        },
        "/agents/{agent_id}/heartbeat": {
            "parameters": [agent_id],
            "post": _guarded(
                "registry",
                "heartbeatAgent",
                "Record a heartbeat",
                write,
                {**accepted, **_errors(*body_errors, "404")},
                description=(
                    "An unknown id is a 404 telling the agent to register again."
                ),
                body=heartbeat_body,
            ),
        },
        "/agents/{agent_id}/unregister": {
            "parameters": [agent_id],
            "post": _guarded(
                "registry",
                "unregisterAgent",
                "Unregister an agent",
                write,
                {**unregistered, **_errors("400", "401", "403", "404", "503")},
                description="Any body is ignored.",
            ),
        },
        "/agents": {
            "get": _guarded(
                "registry",
                "listAgents",
                "List agents",
                read,
                {**listed, **_errors("400", "401", "403", "503")},
                description="Ordered by id.",
                parameters=[_ref("parameters", "TypeQuery"), *filters],
            )
        },
        "/agents/{agent_id}": {
            "parameters": [agent_id],
            "get": _guarded(
                "registry",
                "getAgent",
                "One agent",
                read,
                {**agent, **_errors("400", "401", "403", "404", "503")},
            ),
        },
        "/agents/type/{agent_type}": {
            "parameters": [_ref("parameters", "AgentTypePath")],
            "get": _guarded(
                "registry",
                "listAgentsByType",
                "List agents of one type",
                read,
                {**listed, **_errors("400", "401", "403", "503")},
                description="Ordered by id; a `type` query parameter is ignored.",
                parameters=filters,
            ),
        },
        # The agents' /api/v1 shapes.
        "/api/v1/agents/register": {
            "post": _guarded(
                "registry-v1",
                "registerAgentV1",
                "Register an agent (the agents' shape)",
                write,
                {
                    "200": _answer(
                        "Registered (`status`: registered) or registered again "
                        "(`status`: re-registered).",
                        _schema("RegisteredV1"),
                    ),
                    **_errors(*body_errors),
                },
                body=_body("RegistrationV1", "The agent.", required=True),
            )
        },
        "/api/v1/agents/heartbeat": {
            "post": _guarded(
                "registry-v1",
                "heartbeatAgentV1",
                "Record a heartbeat naming the agent in the body",
                write,
                {**accepted, **_errors(*body_errors, "404")},
                body=_body("HeartbeatV1", "The agent and its status.", required=True),
            )
        },
        "/api/v1/agents/{agent_id}/heartbeat": {
            "parameters": [agent_id],
            "post": _guarded(
                "registry-v1",
                "heartbeatAgentV1ById",
                "Record a heartbeat",
                write,
                {**accepted, **_errors(*body_errors, "404")},
                body=heartbeat_body,
            ),
        },
        "/api/v1/agents/{agent_id}": {
            "parameters": [agent_id],
            "get": _guarded(
                "registry-v1",
                "getAgentV1",
                "One agent",
                read,
                {**agent, **_errors("400", "401", "403", "404", "503")},
            ),
            "delete": _guarded(
                "registry-v1",
                "deleteAgentV1",
                "Unregister an agent",
                write,
                {**unregistered, **_errors("400", "401", "403", "404", "503")},
            ),
        },
        "/api/v1/agents": {
            "get": _guarded(
                "registry-v1",
                "listAgentsV1",
                "List agents",
                read,
                {**listed, **_errors("400", "401", "403", "503")},
                description="Ordered by id.",
                parameters=[_ref("parameters", "TypeQuery"), *filters],
            )
        },
    }


def _task_paths() -> dict[str, Any]:
    task_id = _ref("parameters", "TaskId")
    operate = Permission.OPERATE.value
    read = Permission.READ.value
    one_task = ("400", "401", "403", "404", "503")
    task_not_found = {"404": "TaskNotFound"}
    return {
        "/tasks": {
            "post": _guarded(
                "tasks",
                "submitTask",
                "Submit a task",
                operate,
                {
                    "201": _answer(
                        "Accepted: the task is stored and will be sent to an "
                        "agent; follow it at `status_url`. A repeated request "
                        "(same Idempotency-Key and body) answers with the task "
                        "the first one created.",
                        _schema("TaskAccepted"),
                        headers={
                            "Idempotent-Replayed": _ref("headers", "IdempotentReplayed")
                        },
                    ),
                    **_errors(
                        "400",
                        "401",
                        "403",
                        "409",
                        "413",
                        "415",
                        "503",
                        specific={"409": "IdempotencyConflict"},
                    ),
                },
                description=(
                    "The router sends the task with `POST /task` to an agent of "
                    "`agent_type` that lists `task_type` among its capabilities "
                    "(or to `agent_id`): a healthy one, or a degraded one when no "
                    "healthy one is left; of two picked at random, the one with "
                    "fewer calls in flight (at most AGENT_CONCURRENCY each); none "
                    "whose circuit is open after BREAKER_THRESHOLD failures in a "
                    "row, until one trial after BREAKER_COOLDOWN. Higher "
                    "`priority` goes first, then older tasks; a task waits "
                    "(`queued`) while no agent is free. An attempt that gets no "
                    "usable answer is retried, on another agent when there is "
                    "one, backing off from RETRY_DELAY, up to `max_retries` "
                    "times and within the deadline."
                ),
                parameters=[
                    _ref("parameters", "IdempotencyKey"),
                    _ref("parameters", "Traceparent"),
                ],
                body=_body("TaskRequest", "The task.", required=True),
            ),
            "get": _guarded(
                "tasks",
                "listTasks",
                "List tasks",
                read,
                {
                    "200": _answer("The matching tasks.", _schema("TaskList")),
                    **_errors("400", "401", "403", "503"),
                },
                description="Newest first. Filters combine.",
                parameters=[
                    _ref("parameters", name)
                    for name in (
                        "TaskStatusQuery",
                        "TaskAgentIdQuery",
                        "TaskAgentTypeQuery",
                        "TaskTypeQuery",
                        "TaskFieldsQuery",
                        "LimitQuery",
                        "OffsetQuery",
                    )
                ],
            ),
        },
        "/tasks/{task_id}": {
            "parameters": [task_id],
            "get": _guarded(
                "tasks",
                "getTask",
                "One task and its history",
                read,
                {
                    "200": _answer(
                        "The task as it is now, and every status it has had.",
                        _schema("TaskDetail"),
                    ),
                    **_errors(*one_task, specific=task_not_found),
                },
            ),
            "delete": _guarded(
                "tasks",
                "cancelTask",
                "Cancel a task",
                operate,
                {
                    "200": _answer(
                        "Cancelled: the task as it is now.", _schema("Task")
                    ),
                    **_errors(
                        *one_task,
                        "409",
                        specific={**task_not_found, "409": "TaskFinished"},
                    ),
                },
                description=(
                    "A waiting task (pending, queued, retrying) is never sent; a "
                    "call out at an agent (sent, running) is aborted and a late "
                    "answer discarded. A finished task is a 409."
                ),
            ),
        },
    }


def _coordination_paths() -> dict[str, Any]:
    operate = Permission.OPERATE.value
    read = Permission.READ.value
    body_errors = ("400", "401", "403", "413", "415", "503")
    approval_id = _ref("parameters", "ApprovalId")
    plan_id = _ref("parameters", "PlanId")
    approval_not_found = {"404": "ApprovalNotFound"}
    decided = {**approval_not_found, "409": "ApprovalDecided"}
    decision = (
        "With API keys, the decider is the key's owner: `user_id` may be left "
        "out, and naming anyone else is a 400, so that one person cannot count "
        "twice towards a critical approval."
    )
    return {
        "/coordination/coordinate": {
            "post": _guarded(
                "coordination",
                "coordinate",
                "Coordinate a batch of recommendations",
                operate,
                {
                    "200": _answer(
                        "Coordinated: the conflicts and how each was settled, "
                        "the recommendations kept and dropped, the approvals "
                        "asked for and the plans made. Stored: read it again "
                        "at `/coordination/results/{id}`. A repeated request "
                        "(same Idempotency-Key and body) answers with the "
                        "result the first one made, and does nothing again.",
                        _schema("CoordinationResult"),
                        headers={
                            "Idempotent-Replayed": _ref("headers", "IdempotentReplayed")
                        },
                    ),
                    **_errors(
                        *body_errors,
                        "409",
                        specific={"409": "CoordinationIdempotencyConflict"},
                    ),
                },
                description=(
                    "Recommendations already past `expires_at` are dropped. The "
                    "conflicts between the others are found and settled: the "
                    "recommendations in a dependency cycle, depending on one "
                    "outside the batch or on a dropped one are dropped; of two "
                    "conflicting ones the higher ranked is kept (customer "
                    "constraints, agent type, priority, estimated savings, "
                    "confidence, lower risk, smaller id; see `Conflict.rule`). "
                    "The outcome does not depend on the order of the batch. "
                    "Then each kept recommendation of low risk (every one, with "
                    "`auto_approve`) gets its plan at once, and each other one "
                    "an approval to be decided with `POST "
                    "/coordination/approvals/{approval_id}/approve` or "
                    "`/reject` before it expires."
                ),
                parameters=[_ref("parameters", "IdempotencyKey")],
                body=_body(
                    "CoordinationRequest", "The recommendations.", required=True
                ),
            )
        },
        "/coordination/approvals": {
            "get": _guarded(
                "coordination",
                "listApprovals",
                "List approvals",
                read,
                {
                    "200": _answer("The matching approvals.", _schema("ApprovalList")),
                    **_errors("400", "401", "403", "503"),
                },
                description=("Newest first, a page at a time. Filters combine."),
                parameters=[
                    _ref("parameters", "CustomerIdQuery"),
                    _ref("parameters", "ApprovalStatusQuery"),
                    _ref("parameters", "LimitQuery"),
                    _ref("parameters", "OffsetQuery"),
                ],
            )
        },
        "/coordination/approvals/{approval_id}": {
            "parameters": [approval_id],
            "get": _guarded(
                "coordination",
                "getApproval",
                "One approval",
                read,
                {
                    "200": _answer("The approval as it is now.", _schema("Approval")),
                    **_errors(
                        "400", "401", "403", "404", "503", specific=approval_not_found
                    ),
                },
            ),
        },
        "/coordination/approvals/{approval_id}/approve": {
            "parameters": [approval_id],
            "post": _guarded(
                "coordination",
                "approveApproval",
                "Approve a risky recommendation",
                operate,
                {
                    "200": _answer(
                        "The approval was recorded: granted once enough "
                        "different people have approved, when its plan is made "
                        "(and started, with `execute_now`).",
                        _schema("ApprovalAndPlan"),
                    ),
                    **_errors(*body_errors, "404", "409", specific=decided),
                },
                description=decision,
                body=_body("ApproveRequest", "Who approves.", required=True),
            ),
        },
        "/coordination/approvals/{approval_id}/reject": {
            "parameters": [approval_id],
            "post": _guarded(
                "coordination",
                "rejectApproval",
                "Reject a risky recommendation",
                operate,
                {
                    "200": _answer(
                        "Rejected, for good: the approval as it is now. Plans that "
                        "depend on this recommendation are cancelled when they "
                        "would start.",
                        _schema("Approval"),
                    ),
                    **_errors(*body_errors, "404", "409", specific=decided),
                },
                description=decision,
                body=_body("RejectRequest", "Who rejects, and why.", required=True),
            ),
        },
        "/coordination/plans/{plan_id}": {
            "parameters": [plan_id],
            "get": _guarded(
                "coordination",
                "getPlan",
                "One plan and its steps",
                read,
                {
                    "200": _answer("The plan as it is now.", _schema("Plan")),
                    **_errors(
                        "400",
                        "401",
                        "403",
                        "404",
                        "503",
                        specific={"404": "PlanNotFound"},
                    ),
                },
            ),
        },
        "/coordination/plans/{plan_id}/execute": {
            "parameters": [plan_id],
            "post": _guarded(
                "coordination",
                "executePlan",
                "Start a pending plan",
                operate,
                {
                    "202": _answer(
                        "Execution asked for: the plan is `waiting` and runs as "
                        "soon as the plans it depends on have completed; follow "
                        "it at `/coordination/plans/{plan_id}`.",
                        _schema("ExecutionStarted"),
                    ),
                    **_errors(
                        "400",
                        "401",
                        "403",
                        "404",
                        "409",
                        "503",
                        specific={"404": "PlanNotFound", "409": "PlanNotPending"},
                    ),
                },
                description=(
                    "Its steps are sent one at a time as tasks (see `POST "
                    "/tasks`); a failed critical step rolls back the completed "
                    "reversible ones, last first. Any body is ignored."
                ),
            ),
        },
        "/coordination/results/{coordination_id}": {
            "parameters": [_ref("parameters", "CoordinationId")],
            "get": _guarded(
                "coordination",
                "getCoordinationResult",
                "A coordination's result, read again",
                read,
                {
                    "200": _answer(
                        "The result as `POST /coordination/coordinate` answered "
                        "it, with its approvals and plans as they are now.",
                        _schema("CoordinationResult"),
                    ),
                    **_errors(
                        "400",
                        "401",
                        "403",
                        "404",
                        "503",
                        specific={"404": "CoordinationNotFound"},
                    ),
                },
            ),
        },
    }


_DESCRIPTION: Final = """\
The control plane between OptiInfra's agents (cost, performance, resource,
application): agents register and heartbeat, and their records can be listed;
tasks are submitted, routed to a capable agent, retried, timed out or cancelled,
and followed until they finish; the agents' recommendations are coordinated:
conflicts between them settled, approvals asked of people for risky ones, and the
approved ones carried out as plans of tasks, rolled back when a step fails.

The registry is served twice: at the root paths of the original contract
(`/agents/...`, registration answers 201) and at the `/api/v1` paths the agents
use (registration answers 200). Both reach the same registry.

Every answer carries `X-Request-ID`. Every error is JSON:
`{"error": ..., "field"?: ..., "detail"?: ..., "request_id": ...}`. A path that
does not exist is a 404, a method a path does not serve a 405 with `Allow`, a body
larger than MAX_BODY_BYTES a 413. HEAD is served wherever GET is. A path with a trailing
slash, or an empty segment, is not another spelling of a path: it is a 404 (the
service never redirects).

Registry, task and coordination routes need an API key (`Authorization: Bearer`
or `X-API-Key`) whose role grants the operation's `x-permission`: `agent` keys may
write agents and read them (`agent-write`, `read-agents`), `viewer` keys may read
agents, tasks and coordination (`read-agents`, `read`), `operator` keys may do
everything (`operate` too: submit and cancel tasks, coordinate, decide approvals,
execute plans). A service running without API_KEYS_FILE needs no key.
"""


# The change feed and the console (issue 13) -----------------------------------------


def _feed_paths() -> dict[str, Any]:
    """C{GET /events} and the console's pages, with what they need of their own."""

    def query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": name,
            "in": "query",
            "required": False,
            "description": description,
            "schema": schema,
        }

    token = {"type": "string", "pattern": _whole(TOKEN), "maxLength": 128}
    _topic = "|".join(TOPICS)
    labels = [
        query(
            name,
            f"Only events whose `{name}` is this (events without one are left "
            "out); the listings' filter of the same name.",
            {**token, "enum": list(AGENT_TYPES)} if name == "agent_type" else token,
        )
        for name in LABELS
    ]
    stream = {
        "text/event-stream": {
            "schema": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "pattern": "^[0-9]{1,18}$"},
                    "event": {
                        "type": "string",
                        "enum": [*TOPICS, "reset", "overflow"],
                    },
                    "data": {
                        "type": "string",
                        "contentMediaType": JSON,
                    },
                    "retry": {"type": "integer", "minimum": 0},
                },
                "description": (
                    "One Server-Sent Event (the stream is a sequence of them; "
                    "OpenAPI 3.1 describes each).  Each change is `id: <n>` "
                    "(increasing across replicas), `event: <topic>` and "
                    "`data:` one JSON "
                    "object: `topic`, `kind`, `at`, and the REST view of what "
                    "changed under `agent`, `task`, `approval` or `plan` "
                    "(agents: `registered`, `status_changed` with `previous`, "
                    "`status` and `cause`, `circuit_opened`, `circuit_closed`, "
                    "`removed`; tasks: `status_changed`; approvals: `created`, "
                    "`decided`, `expired`; plans: `created`, `step`, "
                    "`rollback`, `finished`).  `: keep-alive` comments come "
                    "every 15 s.  `event: reset` says the events after "
                    "Last-Event-ID are gone (older than EVENT_RETENTION): "
                    "reload.  `event: overflow` then the end: the client fell "
                    "too far behind; reconnect with Last-Event-ID.  On "
                    "shutdown the stream ends cleanly."
                ),
            }
        }
    }
    page = {"text/html": {"schema": {"type": "string"}}}
    console = {
        "tags": ["console"],
        "security": [],
        "parameters": [_ref("parameters", "RequestId")],
    }
    return {
        "/events": {
            "get": _guarded(
                "events",
                "streamEvents",
                "Live change feed (Server-Sent Events)",
                Permission.READ.value,
                {
                    "200": _answer(
                        "The stream, until either side ends it.", content=stream
                    ),
                    **_errors("400", "401", "403"),
                    "503": _answer(
                        "The store is down, or the feed is stopping.",
                        _schema("Error"),
                    ),
                },
                description=(
                    "One connection per client; events are filtered by topic "
                    "and by the listings' filters."
                ),
                parameters=[
                    query(
                        "topics",
                        f"Comma-separated, of {', '.join(TOPICS)} (default all).",
                        {
                            "type": "string",
                            "pattern": f"^(?:{_topic})(?:,(?:{_topic}))*$",
                        },
                    ),
                    *labels,
                    query(
                        "last_event_id",
                        "Resume after this id (as the Last-Event-ID header); "
                        "empty: from now.",
                        {"type": "string", "pattern": "^[0-9]{0,18}$"},
                    ),
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "description": (
                            "Resume after this id: what was missed is replayed "
                            "from the store's window, or `reset` is sent. Empty "
                            "(an EventSource that has seen no id): from now."
                        ),
                        "schema": {"type": "string", "pattern": "^[0-9]{0,18}$"},
                    },
                ],
            )
        },
        "/coordination/plans": {
            "get": _guarded(
                "coordination",
                "listPlans",
                "Plans, newest first (those not finished, by default)",
                Permission.READ.value,
                {
                    "200": _answer(
                        "The matching plans.",
                        {
                            "type": "object",
                            "required": ["plans", "count", "limit", "offset"],
                            "properties": {
                                "plans": {"type": "array", "items": _schema("Plan")},
                                "count": {"type": "integer", "minimum": 0},
                                "limit": {"type": "integer", "minimum": 0},
                                "offset": {"type": "integer", "minimum": 0},
                            },
                        },
                    ),
                    **_errors("400", "401", "403", "503"),
                },
                description=(
                    "For the console's plans view: without `status`, the plans "
                    "pending, waiting, running or rolling back."
                ),
                parameters=[
                    query(
                        "status",
                        "Only plans in this status.",
                        _schema("PlanStatus"),
                    ),
                    _ref("parameters", "LimitQuery"),
                    _ref("parameters", "OffsetQuery"),
                ],
            )
        },
        "/whoami": {
            "get": _guarded(
                "console",
                "whoAmI",
                "The key's name, role and permissions",
                Permission.READ_AGENTS.value,
                {
                    "200": _answer(
                        "Who the key belongs to; nulls when access control is "
                        "off (everything is allowed).",
                        {
                            "type": "object",
                            "required": ["name", "role", "permissions"],
                            "properties": {
                                "name": {"type": ["string", "null"]},
                                "role": {
                                    "type": ["string", "null"],
                                    "enum": ["agent", "operator", "viewer", None],
                                },
                                "permissions": {
                                    "type": "array",
                                    "items": {
                                        "type": "string",
                                        "enum": [p.value for p in Permission],
                                    },
                                },
                            },
                        },
                    ),
                    **_errors("401", "403", "503"),
                },
                description="The console asks, to show a viewer no buttons.",
            )
        },
        "/console": {
            "get": {
                **console,
                "operationId": "getConsole",
                "summary": "The operators' console (HTML; the key is asked for "
                "in the page)",
                "responses": {
                    "200": _answer("The console page.", content=page),
                    "default": _ref("responses", "Error"),
                },
            }
        },
        "/console/{name}": {
            "get": {
                **console,
                "operationId": "getConsoleFile",
                "summary": "The console's scripts and style sheet",
                "parameters": [
                    {
                        "name": "name",
                        "in": "path",
                        "required": True,
                        "description": "A file shipped with the console.",
                        "schema": {"type": "string"},
                    },
                    _ref("parameters", "RequestId"),
                ],
                "responses": {
                    "200": _answer(
                        "The file.",
                        content={
                            "text/javascript": {"schema": {"type": "string"}},
                            "text/css": {"schema": {"type": "string"}},
                        },
                    ),
                    "404": _answer("No such file.", _schema("Error")),
                    "default": _ref("responses", "Error"),
                },
            }
        },
    }


_OPEN_NOTE: Final = """

**This instance runs without API keys** (no API_KEYS_FILE): no operation needs a
key, so none declares a security requirement here.  The same service with a key
file serves this document with every registry, task and coordination operation
secured.
"""


def build_document(*, secured: bool = True) -> dict[str, Any]:
    """
    The OpenAPI document, built afresh: C{secured} for an instance with API
    keys; without, no operation declares a security requirement, and C{info}
    says why, so the document is true of the instance serving it.
    """
    paths = {
        **_service_paths(),
        **_registry_paths(),
        **_task_paths(),
        **_coordination_paths(),
        **_feed_paths(),
    }
    components = _components()
    if not secured:
        for item in paths.values():
            for operation in item.values():
                if not isinstance(operation, dict):
                    continue  # a path item's shared parameters
                operation["security"] = []
                for code in ("401", "403"):
                    operation["responses"].pop(code, None)
        # No key names the decider: the body must.
        for decision in ("approve", "reject"):
            path = f"/coordination/approvals/{{approval_id}}/{decision}"
            paths[path]["post"]["requestBody"]["required"] = True
            body = components["schemas"][f"{decision.title()}Request"]
            body["required"] = ["user_id", *body.get("required", [])]
            body["properties"]["user_id"]["type"] = "string"
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": SERVICE_NAME,
            "version": __version__,
            "summary": (
                "Agent registry, task routing, coordination and control plane of "
                "the OptiInfra platform."
            ),
            "description": _DESCRIPTION + ("" if secured else _OPEN_NOTE),
        },
        "tags": [
            {"name": "service", "description": "Probes, metrics and this document."},
            {"name": "registry", "description": "Agents, at the contract's paths."},
            {"name": "registry-v1", "description": "Agents, at the agents' paths."},
            {"name": "tasks", "description": "Tasks, routed to the agents."},
            {
                "name": "coordination",
                "description": (
                    "Agents' recommendations: conflicts settled, approvals, "
                    "plans carried out as tasks."
                ),
            },
            {"name": "events", "description": "The live change feed."},
            {"name": "console", "description": "The operators' console."},
        ],
        "security": _key_required() if secured else [],
        "paths": paths,
        "components": components,
    }


#: The document served by an instance with API keys; built once.
DOCUMENT: Final[dict[str, Any]] = build_document()
#: The document served by an instance without API keys.
OPEN_DOCUMENT: Final[dict[str, Any]] = build_document(secured=False)


def mount(app: Klein, *, secured: bool = True) -> None:
    """
    Add C{GET /openapi.json} to C{app}; it needs no key.  C{secured} says
    whether the instance has API keys, which the document then declares.
    """
    document = DOCUMENT if secured else OPEN_DOCUMENT

    @route(app, "/openapi.json", ("GET",))
    def openapi(request: IRequest) -> bytes:
        return render_json(request, document)
