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

from optiinfra.declare import Choice, Document, Integer, Strings, Text, whole
from optiinfra.destinations import tls_available
from optiinfra.errors import InvalidField
from optiinfra.registry.model import (
    AGENT_ID,
    AGENT_TYPES,
    REPORTED_STATUSES,
    RESERVED_AGENT_IDS,
    STATUS_ALIASES,
)
from optiinfra.validation import HOST, NAME, TOKEN, Fields

_VERSION_LENGTH: Final = 64
#: An endpoint's path: tasks go to C{<path>/task}.
_PATH: Final = re.compile(r"(/[A-Za-z0-9._~-]+)*/?")

_PORT_TEXT: Final = (
    "(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}"
    "|655[0-2][0-9]|6553[0-5])"
)
#: An IPv6 address without a zone or an embedded IPv4 one (RFC 4291 2.2).
_IPV6: Final = (
    "(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}|(?:[0-9A-Fa-f]{1,4}:){1,7}:"
    "|(?:[0-9A-Fa-f]{1,4}:){1,6}:[0-9A-Fa-f]{1,4}"
    "|(?:[0-9A-Fa-f]{1,4}:){1,5}(?::[0-9A-Fa-f]{1,4}){1,2}"
    "|(?:[0-9A-Fa-f]{1,4}:){1,4}(?::[0-9A-Fa-f]{1,4}){1,3}"
    "|(?:[0-9A-Fa-f]{1,4}:){1,3}(?::[0-9A-Fa-f]{1,4}){1,4}"
    "|(?:[0-9A-Fa-f]{1,4}:){1,2}(?::[0-9A-Fa-f]{1,4}){1,5}"
    "|[0-9A-Fa-f]{1,4}:(?::[0-9A-Fa-f]{1,4}){1,6}"
    "|:(?:(?::[0-9A-Fa-f]{1,4}){1,7}|:)"
)
#: What L{_endpoint} accepts, as a JSON Schema pattern: http(s), a host, a
#: port, a path (the reader parses the URL; the document can only match it).
ENDPOINT_SHAPE: Final = (
    rf"^[Hh][Tt][Tt][Pp][Ss]?://(?:[A-Za-z0-9._-]+|\[(?:{_IPV6})\])"
    rf"(?::{_PORT_TEXT})?(?:/[A-Za-z0-9._~-]+)*/?$"
)

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


# The fields of registrations and heartbeats, both dialects: read here,
# published by C{optiinfra.openapi}.
NAME_FIELD: Final = Text(
    "name",
    pattern=NAME,
    max_length=128,
    description="Printable text, not only whitespace.",
)
AGENT_NAME: Final = attrs.evolve(
    NAME_FIELD, key="agent_name", required=False, description="Defaults to `agent_id`."
)
TYPE: Final = Choice("type", AGENT_TYPES)
AGENT_TYPE: Final = TYPE.renamed("agent_type")
HOST_FIELD: Final = Text(
    "host",
    pattern=HOST,
    max_length=253,
    description=(
        "A host name or IP address (IPv6 without brackets). Refused (400) when it "
        "is, or resolves to, an address tasks may not be sent to: outside "
        "AGENT_ALLOWED_NETWORKS, link-local or cloud metadata when that is unset, "
        "or the orchestrator's own listening address."
    ),
    examples=("10.0.0.12",),
)
PORT: Final = Integer("port", minimum=1, maximum=65535)
#: Read with L{AGENT_ID}; published as a token that is not a reserved word
#: (a JSON Schema C{not}, which generators handle better than a look-ahead).
AGENT_ID_FIELD: Final = Text(
    "agent_id",
    pattern=AGENT_ID,
    max_length=128,
    shape=whole(TOKEN),
    excluded=RESERVED_AGENT_IDS,
)
_URL_LENGTH: Final = 2048
ENDPOINT: Final = Text(
    "endpoint",
    max_length=_URL_LENGTH,
    required=False,
    shape=ENDPOINT_SHAPE,
    description=(
        "An http(s) URL with a valid host; port 80 or 443 when it names none. "
        "Tasks go to `<its path>/task`; a query, fragment or credentials are "
        "refused, and so is a host tasks may not be sent to (see `host`). https "
        "is called over TLS with certificate checks."
    ),
    examples=("http://localhost:8002",),
)
HEALTH_CHECK_ENDPOINT: Final = Text(
    "health_check_endpoint",
    max_length=_URL_LENGTH,
    required=False,
    examples=("/api/v1/health",),
)
CAPABILITIES: Final = Strings(
    "capabilities",
    description="Short identifiers;",
    examples=(["optimize_kv_cache", "tune_inference"],),
)
VERSION: Final = Text(
    "version", max_length=_VERSION_LENGTH, required=False, default="unknown"
)
METADATA: Final = Document("metadata")
STATUS: Final = Choice(
    "status",
    REPORTED_STATUSES,
    aliases=STATUS_ALIASES,
    required=False,
    default="healthy",
    description=(
        "What the agent says about itself; "
        + ", ".join(f'"{alias}" means "{to}"' for alias, to in STATUS_ALIASES.items())
        + ". Absent: healthy."
    ),
)
BEAT_METADATA: Final = Document(
    "metadata", description="Merged into the agent's metadata."
)
METRICS: Final = Document(
    "metrics", description="Kept as the `metrics` key of the agent's metadata."
)
#: What both registrations share, and what a heartbeat carries.
COMMON: Final = (CAPABILITIES, VERSION, METADATA, STATUS)
REGISTRATION: Final = (NAME_FIELD, TYPE, HOST_FIELD, PORT, *COMMON)
REGISTRATION_V1: Final = (
    AGENT_ID_FIELD,
    AGENT_NAME,
    AGENT_TYPE,
    ENDPOINT,
    HEALTH_CHECK_ENDPOINT,
    attrs.evolve(HOST_FIELD, required=False),
    attrs.evolve(PORT, required=False),
    *COMMON,
)
BEAT: Final = (STATUS, BEAT_METADATA, METRICS)


def _common(fields: Fields) -> dict[str, Any]:
    return {
        "capabilities": CAPABILITIES.read(fields),
        "version": VERSION.read(fields),
        "metadata": METADATA.read(fields),
        "status": _req(STATUS.read(fields)),
    }


def parse_registration(document: object) -> Registration:
    """The contract's C{POST /agents/register} body."""
    fields = Fields(document)
    return Registration(
        name=_req(NAME_FIELD.read(fields)),
        type=_req(TYPE.read(fields)),
        host=_req(HOST_FIELD.read(fields)),
        port=_req(PORT.read(fields)),
        **_common(fields),
    )


def parse_v1_registration(document: object) -> Registration:
    """The real agents' C{POST /api/v1/agents/register} body."""
    fields = Fields(document)
    agent_id = _req(AGENT_ID_FIELD.read(fields))
    if fields.has("endpoint"):
        host, port = _endpoint(fields)
    else:
        host = _req(HOST_FIELD.read(fields))
        port = _req(PORT.read(fields))
    return Registration(
        name=_req(AGENT_NAME.read(fields, default=agent_id)),
        type=_req(AGENT_TYPE.read(fields)),
        host=host,
        port=port,
        agent_id=agent_id,
        endpoint=ENDPOINT.read(fields),
        health_check_endpoint=HEALTH_CHECK_ENDPOINT.read(fields),
        **_common(fields),
    )


def _endpoint(fields: Fields) -> tuple[str, int]:
    url = _req(attrs.evolve(ENDPOINT, required=True).read(fields))
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
    metadata = BEAT_METADATA.read(fields)
    if fields.has("metrics"):
        metadata = {**metadata, "metrics": METRICS.read(fields)}
    return Beat(status=_req(STATUS.read(fields)), metadata=metadata)


def parse_v1_beat(document: object) -> tuple[str, Beat]:
    """The body of C{POST /api/v1/agents/heartbeat}, which names the agent."""
    fields = Fields(document)
    agent_id = _req(AGENT_ID_FIELD.read(fields))
    return agent_id, parse_beat(document)


def _req(value: T | None) -> T:
    """Narrow a required field's value (its reader raised if it was missing)."""
    if value is None:  # pragma: no cover - the reader raised already
        raise InvalidField("body", "a required field is missing")
    return value
