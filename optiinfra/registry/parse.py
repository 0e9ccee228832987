"""
Turning the shapes agents actually send into registrations and heartbeats.

Two dialects reach the same registry: the contract's root paths
(C{name, type, host, port}) and the C{/api/v1} shapes the real agents use
(C{agent_id, agent_type} and either C{endpoint} or C{host} + C{port}).
"""

from __future__ import annotations

import re
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import attrs

from optiinfra.destinations import tls_available
from optiinfra.errors import InvalidField
from optiinfra.registry.model import (
    AGENT_ID,
    AGENT_TYPES,
    REPORTED_STATUSES,
    STATUS_ALIASES,
)
from optiinfra.validation import HOST, NAME, Fields

_VERSION_LENGTH: Final = 64
#: An endpoint's path: tasks go to C{<path>/task}.
_PATH: Final = re.compile(r"(/[A-Za-z0-9._~-]+)*/?")

T = TypeVar("T")


@attrs.frozen
class Registration:
    """What an agent said about itself when registering."""

    name: str
    type: str
    host: str
    port: int
    capabilities: tuple[str, ...]
    version: str
    metadata: dict[str, Any]
    status: str
    agent_id: str | None = None
    endpoint: str | None = None
    health_check_endpoint: str | None = None


@attrs.frozen
class Beat:
    """What an agent said in a heartbeat."""

    status: str
    metadata: dict[str, Any]


def _status(fields: Fields, key: str = "status") -> str:
    return _req(
        fields.choice(
            key,
            REPORTED_STATUSES,
            required=False,
            default="healthy",
            aliases=STATUS_ALIASES,
        )
    )


def _common(fields: Fields) -> dict[str, Any]:
    return {
        "capabilities": fields.strings("capabilities"),
        "version": fields.text(
            "version", required=False, default="unknown", max_length=_VERSION_LENGTH
        ),
        "metadata": fields.mapping("metadata"),
        "status": _status(fields),
    }


def parse_registration(document: object) -> Registration:
    """The contract's C{POST /agents/register} body."""
    fields = Fields(document)
    return Registration(
        name=_req(fields.text("name", pattern=NAME, max_length=128)),
        type=_req(fields.choice("type", AGENT_TYPES)),
        host=_req(fields.text("host", pattern=HOST, max_length=253)),
        port=_req(fields.integer("port", minimum=1, maximum=65535)),
        **_common(fields),
    )


def parse_v1_registration(document: object) -> Registration:
    """The real agents' C{POST /api/v1/agents/register} body."""
    fields = Fields(document)
    agent_id = _req(fields.text("agent_id", pattern=AGENT_ID, max_length=128))
    if fields.has("endpoint"):
        host, port = _endpoint(fields)
    else:
        host = _req(fields.text("host", pattern=HOST, max_length=253))
        port = _req(fields.integer("port", minimum=1, maximum=65535))
    return Registration(
        name=_req(
            fields.text(
                "agent_name",
                required=False,
                default=agent_id,
                pattern=NAME,
                max_length=128,
            )
        ),
        type=_req(fields.choice("agent_type", AGENT_TYPES)),
        host=host,
        port=port,
        agent_id=agent_id,
        endpoint=fields.text("endpoint", required=False, max_length=2048),
        health_check_endpoint=fields.text(
            "health_check_endpoint", required=False, max_length=2048
        ),
        **_common(fields),
    )


def _endpoint(fields: Fields) -> tuple[str, int]:
    url = _req(fields.text("endpoint", max_length=2048))
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidField(
            "endpoint", "must be an http(s) URL with a valid port"
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidField(
            "endpoint", "must be an http(s) URL such as http://host:8002"
        )
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    if not 1 <= port <= 65535:
        raise InvalidField("endpoint", "port must be between 1 and 65535")
    if not HOST.fullmatch(parts.hostname):
        raise InvalidField("endpoint", "has an invalid host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise InvalidField(
            "endpoint",
            "must not carry a query, a fragment or credentials: tasks go to "
            "<endpoint's path>/task",
        )
    if not _PATH.fullmatch(parts.path):
        raise InvalidField(
            "endpoint",
            "path may hold only letters, digits, '.', '_', '~', '-' and '/'",
        )
    if parts.scheme == "https" and not tls_available():
        raise InvalidField(
            "endpoint",
            "https needs the tls extra (pip install 'optiinfra[tls]'); an https "
            "agent is never called over plain http",
        )
    return parts.hostname, port


def parse_beat(document: object) -> Beat:
    """A heartbeat body, either dialect; C{metrics} are kept in the metadata."""
    fields = Fields(document)
    metadata = fields.mapping("metadata")
    if fields.has("metrics"):
        metadata = {**metadata, "metrics": fields.mapping("metrics")}
    return Beat(status=_status(fields), metadata=metadata)


def parse_v1_beat(document: object) -> tuple[str, Beat]:
    """The body of C{POST /api/v1/agents/heartbeat}, which names the agent."""
    fields = Fields(document)
    agent_id = _req(fields.text("agent_id", pattern=AGENT_ID, max_length=128))
    return agent_id, parse_beat(document)


def _req(value: T | None) -> T:
    """Narrow a required field's value (its reader raised if it was missing)."""
    if value is None:  # pragma: no cover - the reader raised already
        raise InvalidField("body", "a required field is missing")
    return value
