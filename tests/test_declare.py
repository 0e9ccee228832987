"""
One source for request fields: the document's limits are the parsers' limits.

Values at and just past every documented bound of the bodies of C{POST /tasks},
of registrations and heartbeats (both dialects), of recommendations and of
decisions are sent through the parser
and through the document's schema (jsonschema): both must accept, or both
refuse, each one.  A limit typed again in a parser, or changed in one place
only, fails here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from jsonschema import Draft202012Validator

from optiinfra import declare
from optiinfra.coordination import parse as coordination_parse
from optiinfra.coordination.parse import parse_decision, parse_recommendation
from optiinfra.errors import InvalidField
from optiinfra.openapi import DOCUMENT
from optiinfra.registry import parse as registry_parse
from optiinfra.registry.parse import (
    parse_beat,
    parse_registration,
    parse_v1_beat,
    parse_v1_registration,
)
from optiinfra.routing import parse as task_parse
from optiinfra.routing.parse import parse_task
from optiinfra.routing.router import RouterConfig

from .conftest import RunningService

TASK = {"task_type": "analyze_cost", "agent_type": "cost"}
ROOT = {"name": "a", "type": "cost", "host": "10.0.0.1", "port": 80}
V1 = {"agent_id": "a", "agent_type": "cost", "host": "10.0.0.1", "port": 80}

#: Each body: its component, its parser, a valid body, the fields to bound.
BODIES: dict[str, tuple[Callable[[object], object], dict[str, Any], list[str]]] = {
    "Registration": (
        parse_registration,
        ROOT,
        ["name", "host", "port", "version"],
    ),
    "RegistrationV1": (
        parse_v1_registration,
        V1,
        ["agent_id", "agent_name", "host", "port", "health_check_endpoint"],
    ),
    "Heartbeat": (parse_beat, {}, ["status"]),
    "RecommendationRequest": (
        lambda body: parse_recommendation(body, "", "acme"),
        {"id": "r", "agent_type": "cost", "action": "scale_down"},
        [
            "id",
            "action",
            "risk_level",
            "agent_id",
            "type",
            "title",
            "description",
            "estimated_savings",
            "confidence",
            "priority",
        ],
    ),
    "RejectRequest": (
        lambda body: parse_decision(body, True),
        {"user_id": "alice", "reason": "too risky"},
        ["user_id", "reason"],
    ),
    "HeartbeatV1": (parse_v1_beat, {"agent_id": "a"}, ["agent_id"]),
}


def _property(name: str, component: str = "TaskRequest") -> dict[str, Any]:
    schema: dict[str, Any] = DOCUMENT["components"]["schemas"][component]
    found: dict[str, Any] = schema["properties"][name]
    if "$ref" in found:
        found = DOCUMENT["components"]["schemas"][found["$ref"].rsplit("/", 1)[1]]
    return found


def _bounds(schema: dict[str, Any]) -> list[Any]:
    """Values at and just past each bound the schema documents."""
    branches = schema.get("anyOf", [schema])
    values: list[Any] = []
    for branch in branches:
        kinds = branch.get("type")
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if "integer" in kinds:
            values += [branch["minimum"], branch["minimum"] - 1]
            values += [branch["maximum"], branch["maximum"] + 1]
        elif "number" in kinds:
            values += [branch["minimum"], branch["minimum"] / 2]
            values += [branch["maximum"], branch["maximum"] * 1.001]
        elif "string" in kinds and "maxLength" in branch:
            values += ["a" * branch["maxLength"], "a" * (branch["maxLength"] + 1)]
        elif "string" in kinds and "enum" in branch:
            values += [*branch["enum"], "not-" + str(branch["enum"][0])]
    return values


def _accepted_by_parser(body: dict[str, Any]) -> bool:
    try:
        parse_task(body, RouterConfig())
    except InvalidField:
        return False
    return True


def _accepted_by_document(body: dict[str, Any], component: str = "TaskRequest") -> bool:
    schema = DOCUMENT["components"]["schemas"][component]
    resolved = {**schema, "properties": dict(schema["properties"])}
    for name in schema["properties"]:
        resolved["properties"][name] = _property(name, component)
    return Draft202012Validator(resolved).is_valid(body)


@pytest.mark.parametrize("component", sorted(BODIES))
def test_registrations_and_beats_share_every_bound(component: str) -> None:
    parser, valid, names = BODIES[component]
    for name in names:
        values = _bounds(_property(name, component))
        assert values, f"{component}.{name}: the document states no bound"
        for value in values:
            body = {**valid, name: value}
            try:
                parser(body)
                parsed = True
            except InvalidField:
                parsed = False
            assert parsed == _accepted_by_document(body, component), (name, value)


@pytest.mark.parametrize(
    "name", ["task_type", "priority", "timeout_seconds", "max_retries"]
)
def test_the_parser_and_the_document_share_every_bound(name: str) -> None:
    values = _bounds(_property(name))
    assert values, f"{name}: the document states no bound"
    for value in values:
        body = {**TASK, name: value}
        if name == "task_type":
            # Past the contract's nine a task type is for any agent type.
            body["agent_type"] = "cost"
        assert _accepted_by_parser(body) == _accepted_by_document(body), (
            name,
            value,
        )


def test_registration_fields_are_published_as_declared() -> None:
    schemas = DOCUMENT["components"]["schemas"]
    for component, declared in (
        ("Registration", registry_parse.REGISTRATION),
        ("RegistrationV1", registry_parse.REGISTRATION_V1),
        ("Heartbeat", registry_parse.BEAT),
        ("RecommendationRequest", coordination_parse.RECOMMENDATION),
    ):
        for field in declared:
            assert schemas[component]["properties"][field.key] == field.schema()


def test_the_document_is_built_from_the_declarations() -> None:
    """Each declared field of a task is published as declared, not retyped."""
    properties = DOCUMENT["components"]["schemas"]["TaskRequest"]["properties"]
    declared = [
        value
        for value in vars(task_parse).values()
        if isinstance(value, declare.Integer | declare.Number | declare.Document)
        or (isinstance(value, declare.Text) and value.key != "task_type")
    ]
    assert len(declared) >= 5
    for field in declared:
        if field.key == "priority":  # by number or by name
            branch = properties["priority"]["anyOf"][0]
            assert (branch["minimum"], branch["maximum"]) == (
                field.minimum,
                field.maximum,
            )
            continue
        assert properties[field.key] == field.schema(), field.key


@pytest_twisted.ensureDeferred
async def test_the_service_and_the_document_share_the_page_bounds(
    service: RunningService,
) -> None:
    """A listing's limit and offset: the documented maximum, and one past it."""
    parameters = DOCUMENT["components"]["parameters"]
    for component in ("LimitQuery", "OffsetQuery"):
        name = parameters[component]["name"]
        maximum = parameters[component]["schema"]["maximum"]
        response = await service.get(f"/tasks?{name}={maximum}")
        assert response.code == 200, (name, await response.content())
        await response.content()
        response = await service.get(f"/tasks?{name}={maximum + 1}")
        assert response.code == 400, name
        assert (await response.json())["field"] == name
