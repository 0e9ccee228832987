"""
C{GET /openapi.json}: a well-formed OpenAPI 3.1 document that lists exactly the
routes the service serves, and whose schemas agree with what the service accepts
and answers.

Bodies and examples are checked with jsonschema (draft 2020-12, the dialect of
OpenAPI 3.1); the structure of the document is checked here.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
from jsonschema import Draft202012Validator
from klein import Klein
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from twisted.internet.address import IPv4Address
from twisted.internet.threads import deferToThread

from optiinfra import __version__
from optiinfra.auth import Permission, Role, generate
from optiinfra.coordination.plans import FINAL as PLAN_FINISHED
from optiinfra.openapi import DOCUMENT, OPEN_DOCUMENT, build_document, mount
from optiinfra.routing.model import FINISHED, TASK_TYPES
from optiinfra.web.health import PROBE_PATHS
from optiinfra.web.query import MAX_PAGE

from .agents import COMPLETE, FAIL, HANG, FakeAgent, StartAgent, settle
from .conftest import RunningService, StartService

JSON = "application/json"
HTTP_METHODS = frozenset(
    {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
)
#: A Werkzeug placeholder: C{<name>} or C{<converter:name>} or C{<conv(args):name>}.
WERKZEUG_PLACEHOLDER = re.compile(r"<(?:[^<>:]+:)?(\w+)>")
TEMPLATE_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def mount_once(app: Klein) -> None:
    """Mount C{/openapi.json} unless the service already does."""
    if not any(rule.rule == "/openapi.json" for rule in app.url_map.iter_rules()):
        mount(app)


# Reading the document ------------------------------------------------------------


def resolve(ref: str) -> Any:
    """The object a local C{$ref} points at; KeyError if it points nowhere."""
    assert ref.startswith("#/"), f"only local references are used: {ref}"
    node: Any = DOCUMENT
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def deref(node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        node = resolve(node["$ref"])
    return node


def operations(
    document: dict[str, Any] = DOCUMENT,
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield path, method, operation


def references(node: Any, where: str = "#") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield where, node["$ref"]
        for key, value in node.items():
            yield from references(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from references(value, f"{where}/{index}")


# Bodies checked by jsonschema ---------------------------------------------------


def _closed(node: Any) -> Any:
    """
    C{node} with every object schema that lists C{properties} and says nothing
    of others closed (C{additionalProperties: false}), so that a field the
    service answers with but the document does not mention is noticed.
    """
    if isinstance(node, list):
        return [_closed(item) for item in node]
    if not isinstance(node, dict):
        return node
    result = {key: _closed(value) for key, value in node.items()}
    if (
        result.get("type") == "object"
        and "properties" in result
        and "additionalProperties" not in result
    ):
        result["additionalProperties"] = False
    return result


_DOCUMENT_URI = "urn:optiinfra:openapi"


def _registry(root: dict[str, Any]) -> Registry[Any]:
    """The document as the resource C{#/components/...} references resolve in."""
    resource = Resource.from_contents(root, default_specification=DRAFT202012)
    return Registry().with_resource(_DOCUMENT_URI, resource)


def _in_document(node: Any) -> Any:
    """C{node} with its references pointing into the document."""
    if isinstance(node, list):
        return [_in_document(item) for item in node]
    if not isinstance(node, dict):
        return node
    return {
        key: _DOCUMENT_URI + value
        if key == "$ref" and isinstance(value, str)
        else _in_document(value)
        for key, value in node.items()
    }


_OPEN = _registry(DOCUMENT)
_CLOSED = _registry(_closed(DOCUMENT))


def problems(
    schema: dict[str, Any], value: Any, where: str = "$", *, closed: bool = False
) -> list[str]:
    """
    Why C{value} does not match C{schema} (empty when it does), by jsonschema
    (draft 2020-12, OpenAPI 3.1's dialect).  C{closed}: see L{_closed}.
    """
    validator = Draft202012Validator(
        _in_document(_closed(schema) if closed else schema),
        registry=_CLOSED if closed else _OPEN,
    )
    return [
        f"{where}{''.join(f'[{p!r}]' for p in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(value)
    ]


def test_the_validator_sees_closed_objects_and_references() -> None:
    """The checks below can fail: a wrong value, an undocumented field."""
    agent = {"$ref": "#/components/schemas/AgentId"}
    assert problems(agent, "performance-agent-1") == []
    assert problems(agent, "register")  # a reserved word
    answer = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert problems(answer, {"a": 1, "b": 2}) == []
    assert problems(answer, {"a": 1, "b": 2}, closed=True)


# 1. The document is well-formed OpenAPI 3.1 ----------------------------------------


def test_document_header() -> None:
    assert DOCUMENT["openapi"] == "3.1.0"
    assert DOCUMENT["info"]["title"] == "OptiInfra Orchestrator"
    assert DOCUMENT["info"]["version"] == __version__
    assert build_document() == DOCUMENT
    assert orjson.loads(orjson.dumps(DOCUMENT)) == DOCUMENT  # plain JSON data


def test_every_reference_resolves() -> None:
    refs = list(references(DOCUMENT))
    assert refs
    for where, ref in refs:
        try:
            resolve(ref)
        except KeyError:
            pytest.fail(f"{where}: {ref} points nowhere")


def test_every_operation_is_complete() -> None:
    ids: list[str] = []
    tags = {tag["name"] for tag in DOCUMENT["tags"]}
    for path, method, operation in operations():
        name = f"{method.upper()} {path}"
        ids.append(operation["operationId"])
        assert set(operation["tags"]) <= tags, name
        responses = operation["responses"]
        assert responses, f"{name} has no responses"
        assert any(code.startswith("2") for code in responses), name
        for code, response in responses.items():
            assert code == "default" or re.fullmatch(r"[1-5]\d\d", code), name
            assert deref(response)["description"], f"{name} {code}"
        body = operation.get("requestBody")
        if body is not None:
            assert deref(body)["content"], name
    assert len(ids) == len(set(ids)), "operationIds must be unique"


def test_path_parameters_match_the_templates() -> None:
    for path, item in DOCUMENT["paths"].items():
        assert path.startswith("/"), path
        shared = [deref(p) for p in item.get("parameters", [])]
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            declared = shared + [deref(p) for p in operation.get("parameters", [])]
            in_path = {p["name"] for p in declared if p["in"] == "path"}
            assert in_path == set(TEMPLATE_PLACEHOLDER.findall(path)), (method, path)
            for parameter in declared:
                assert parameter["in"] in {"path", "query", "header", "cookie"}
                assert "schema" in parameter, parameter["name"]
                if parameter["in"] == "path":
                    assert parameter["required"] is True, parameter["name"]


def test_security_schemes() -> None:
    schemes = DOCUMENT["components"]["securitySchemes"]
    assert {"type": "http", "scheme": "bearer"}.items() <= schemes["bearerAuth"].items()
    assert {"type": "apiKey", "in": "header", "name": "X-API-Key"}.items() <= schemes[
        "apiKeyAuth"
    ].items()
    requirements = [*DOCUMENT["security"]]
    for _, _, operation in operations():
        requirements += operation.get("security", [])
    for requirement in requirements:
        assert set(requirement) <= set(schemes), requirement


def test_guarded_operations_name_their_permission() -> None:
    for path, method, operation in operations():
        if operation["security"] == []:
            assert "x-permission" not in operation, (method, path)
            continue
        assert operation["security"] == DOCUMENT["security"], (method, path)
        assert operation["x-permission"] in {p.value for p in Permission}
        assert {"401", "403", "503"} <= set(operation["responses"]), (method, path)


def _schemas() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema of the document, named by where it is."""
    for name, schema in DOCUMENT["components"]["schemas"].items():
        yield f"schemas/{name}", schema
    for kind in ("parameters", "headers"):
        for name, holder in DOCUMENT["components"][kind].items():
            yield f"{kind}/{name}", holder["schema"]
    for name, response in DOCUMENT["components"]["responses"].items():
        for media, holder in response.get("content", {}).items():
            yield f"responses/{name} {media}", holder["schema"]
    for path, method, operation in operations():
        for parameter in operation.get("parameters", []):
            if "schema" in parameter:
                yield f"{method} {path} {parameter['name']}", parameter["schema"]
        body = deref(operation.get("requestBody", {}))
        for media, holder in body.get("content", {}).items():
            yield f"{method} {path} body {media}", holder["schema"]
        for code, response in operation["responses"].items():
            for media, holder in deref(response).get("content", {}).items():
                yield f"{method} {path} {code} {media}", holder["schema"]


def _examples(node: Any, where: str) -> Iterator[tuple[str, dict[str, Any], Any]]:
    """Each C{examples} and C{default} value of C{node} and its subschemas."""
    if isinstance(node, list):
        for index, item in enumerate(node):
            yield from _examples(item, f"{where}[{index}]")
        return
    if not isinstance(node, dict):
        return
    for example in node.get("examples", []) if "type" in node or "$ref" in node else []:
        yield where, node, example
    if "default" in node and ("type" in node or "$ref" in node):
        yield f"{where} (default)", node, node["default"]
    for key, value in node.items():
        if key not in ("examples", "default", "enum", "const"):
            yield from _examples(value, f"{where}.{key}")


def test_every_schema_is_valid_json_schema() -> None:
    for where, schema in _schemas():
        try:
            Draft202012Validator.check_schema(schema)
        except Exception as error:  # pragma: no cover - the failure's report
            pytest.fail(f"{where}: {error}")


def test_every_example_matches_its_schema() -> None:
    """Every example (and default) in the document is valid where it stands."""
    checked = 0
    wrong = []
    for where, schema in _schemas():
        for place, holder, example in _examples(schema, where):
            checked += 1
            wrong += problems(holder, example, place)
    assert checked > 50  # the walk reaches the examples
    assert not wrong


def served_operations(app: Klein) -> set[tuple[str, str]]:
    served = set()
    for rule in app.url_map.iter_rules():
        methods = {m.upper() for m in rule.methods or ()}
        if "GET" in methods:
            assert "HEAD" in methods, rule.rule  # HEAD comes with GET
        path = WERKZEUG_PLACEHOLDER.sub(r"{\1}", rule.rule)
        served |= {(path, m.lower()) for m in methods if m != "HEAD"}
    return served


def documented_operations() -> set[tuple[str, str]]:
    return {(path, method) for path, method, _ in operations()}


@pytest_twisted.ensureDeferred
async def test_every_served_route_is_documented_and_no_other(
    start_service: StartService,
) -> None:
    apps: list[Klein] = []
    await start_service(mounts=[mount_once, apps.append])
    [app] = apps
    served = served_operations(app) | {
        (path, "get")
        for path in PROBE_PATHS  # answered in front of Klein
    }
    documented = documented_operations()
    undocumented = sorted(served - documented)
    stale = sorted(documented - served)
    assert not undocumented, (
        f"served but missing from optiinfra/openapi.py: {undocumented}"
    )
    assert not stale, f"documented but not served: {stale}"
    assert ("/openapi.json", "get") in served


def test_the_comparison_sees_werkzeug_placeholders() -> None:
    app = Klein()
    app.route("/x/<int:n>/<name>", methods=["GET"])(lambda request, **kw: b"")
    app.route("/y", methods=["POST", "DELETE"])(lambda request: b"")
    assert served_operations(app) == {
        ("/x/{n}/{name}", "get"),
        ("/y", "post"),
        ("/y", "delete"),
    }


# 3. Served over a real socket, and true to what the service does ------------------


def key_file(path: Path) -> dict[str, dict[str, str]]:
    """One key per role; the headers presenting each."""
    headers, lines = {}, []
    for role in Role:
        key, line = generate(f"{role.value}-key", role)
        lines.append(line)
        headers[role.value] = {"Authorization": f"Bearer {key}"}
    path.write_text("\n".join(lines) + "\n")
    return headers


@pytest_twisted.ensureDeferred
async def test_served_without_a_key(
    start_service: StartService, tmp_path: Path
) -> None:
    key_file(tmp_path / "keys")
    service = await start_service(mounts=[mount_once], api_keys_file=tmp_path / "keys")
    response = await service.get("/openapi.json")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert response.headers.getRawHeaders("x-request-id")
    body = await response.json()
    assert body == DOCUMENT
    assert body["openapi"] == "3.1.0"
    assert body["info"]["version"] == __version__
    assert "/agents/{agent_id}/heartbeat" in body["paths"]
    assert "/tasks/{task_id}" in body["paths"]
    assert "/coordination/coordinate" in body["paths"]
    assert set(body["components"]["securitySchemes"]) == {"bearerAuth", "apiKeyAuth"}
    head = await service.request("HEAD", "/openapi.json")
    assert (head.code, await head.content()) == (200, b"")


@pytest_twisted.ensureDeferred
async def test_an_open_instance_declares_no_security(service: RunningService) -> None:
    """Without a key file no operation needs a key, and the document says so."""
    body = await (await service.get("/openapi.json")).json()
    assert body == OPEN_DOCUMENT
    assert body["security"] == []
    assert "runs without API keys" in body["info"]["description"]
    for path, method, operation in operations(body):
        assert operation["security"] == [], (method, path)
        assert not {"401", "403"} & set(operation["responses"]), (method, path)
    approve = body["components"]["schemas"]["ApproveRequest"]
    assert approve["required"] == ["user_id"]  # no key names the decider


def _sample(template: str) -> str:
    return TEMPLATE_PLACEHOLDER.sub("x1", template)


@pytest_twisted.ensureDeferred
async def test_every_allow_header_lists_the_documented_methods(
    service: RunningService,
) -> None:
    """A method a path does not serve: 405, Allow exactly what the document has."""
    wrong = []
    for template, item in DOCUMENT["paths"].items():
        documented = {m.upper() for m in item if m in HTTP_METHODS}
        if "GET" in documented:
            documented.add("HEAD")
        response = await service.request("PATCH", _sample(template))
        await response.content()
        allow = (response.headers.getRawHeaders("allow") or [""])[0]
        served = {m.strip() for m in allow.split(",") if m.strip()}
        if response.code != 405 or served != documented:
            wrong.append((template, response.code, sorted(served), sorted(documented)))
    for reserved in ("/agents/register", "/api/v1/agents/heartbeat"):
        response = await service.request("GET", reserved)
        await response.content()
        assert response.code == 405, reserved  # not an agent's record
        assert response.headers.getRawHeaders("allow") == ["POST"]
    assert not wrong


@pytest_twisted.ensureDeferred
async def test_a_trailing_slash_is_not_another_spelling(
    service: RunningService,
) -> None:
    for path in (
        "/api/v1/agents/",
        "/agents/",
        "/tasks/",
        "/health/",
        "/openapi.json/",
    ):
        response = await service.get(path)
        await response.content()
        assert response.code == 404, path
        assert not response.headers.getRawHeaders("location"), path


@pytest_twisted.ensureDeferred
async def test_security_is_as_documented(
    start_service: StartService, tmp_path: Path
) -> None:
    """Public operations need no key; the others need one granting x-permission."""
    keys = key_file(tmp_path / "keys")
    service = await start_service(mounts=[mount_once], api_keys_file=tmp_path / "keys")
    wrong = []
    for path, method, operation in operations():
        target = TEMPLATE_PLACEHOLDER.sub("cost", path)
        ok = deref(operation["responses"].get("200", {}))
        if "text/event-stream" in ok.get("content", {}):
            target += "?topics="  # a 400 once allowed, rather than a stream
        send: dict[str, Any] = {"json": {}} if method == "post" else {}
        codes = {}
        for who, headers in [("nobody", {}), *keys.items()]:
            response = await service.request(
                method.upper(), target, headers=headers, **send
            )
            await response.content()
            codes[who] = response.code
        permission = operation.get("x-permission")
        for who, code in codes.items():
            expected = None
            if permission is not None and who == "nobody":
                expected = 401
            elif permission is not None:
                allowed = Role(who).allows(Permission(permission))
                expected = None if allowed else 403
            denied = code if code in (401, 403) else None
            if denied != expected:
                wrong.append((method, path, who, code))
    assert not wrong


def response_spec(template: str, method: str, code: int) -> dict[str, Any]:
    operation = DOCUMENT["paths"][template][method.lower()]
    responses = operation["responses"]
    assert str(code) in responses, f"{method} {template} answered {code}: undocumented"
    spec: dict[str, Any] = deref(responses[str(code)])
    return spec


def nonconformance(spec: dict[str, Any], response: Any, content: bytes) -> list[str]:
    """Why an answer does not match its documented response."""
    found = []
    for name, header in spec.get("headers", {}).items():
        if deref(header).get("required") and not response.headers.getRawHeaders(name):
            found.append(f"header {name} is missing")
    kind = (response.headers.getRawHeaders("content-type") or [""])[0]
    media = kind.split(";", 1)[0].strip()
    documented = spec.get("content", {})
    if media not in documented:
        return [*found, f"content type {kind!r} is not one of {list(documented)}"]
    if media == "application/json":
        schema = documented[media]["schema"]
        found += problems(schema, orjson.loads(content), closed=True)
    return found


async def call(
    service: RunningService,
    method: str,
    target: str,
    template: str | None = None,
    **kwargs: Any,
) -> tuple[int, Any]:
    """Make a request and check its answer against the document."""
    response = await service.request(method, target, **kwargs)
    content = await response.content()
    template = template or target.split("?", 1)[0]
    issues = nonconformance(
        response_spec(template, method, response.code), response, content
    )
    assert not issues, f"{method} {target} {response.code}: {issues}"
    is_json = (response.headers.getRawHeaders("content-type") or [""])[0].startswith(
        "application/json"
    )
    return response.code, orjson.loads(content) if is_json else content


def request_schema(template: str, method: str) -> dict[str, Any]:
    body = deref(DOCUMENT["paths"][template][method]["requestBody"])
    schema: dict[str, Any] = body["content"]["application/json"]["schema"]
    return schema


def raw_http(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest_twisted.ensureDeferred
async def test_answers_match_the_document(
    start_service: StartService, tmp_path: Path
) -> None:
    keys = key_file(tmp_path / "keys")
    service = await start_service(
        mounts=[mount_once], api_keys_file=tmp_path / "keys", max_body_bytes=8192
    )
    agent, viewer = keys["agent"], keys["viewer"]

    # The service's own routes.
    for path in ("/health", "/", "/livez", "/readyz", "/openapi.json"):
        assert (await call(service, "GET", path))[0] == 200
    code, text = await call(service, "GET", "/metrics")
    assert code == 200
    assert b"optiinfra_" in text

    # The contract's root paths.
    registration = {
        "name": "cost-1",
        "type": "cost",
        "host": "10.0.0.1",
        "port": 8001,
        "capabilities": ["analyze_cost"],
        "metadata": {"region": "eu"},
    }
    assert not problems(request_schema("/agents/register", "post"), registration)
    code, registered = await call(
        service, "POST", "/agents/register", json=registration, headers=agent
    )
    assert code == 201
    agent_id = registered["agent_id"]
    one = "/agents/{agent_id}"
    beat = "/agents/{agent_id}/heartbeat"
    assert (
        await call(
            service, "POST", f"/agents/{agent_id}/heartbeat", beat, headers=agent
        )
    )[0] == 200
    assert (
        await call(
            service,
            "POST",
            f"/agents/{agent_id}/heartbeat",
            beat,
            json={"status": "active", "metrics": {"cpu": 0.5}},
            headers=agent,
        )
    )[0] == 200
    for target in (
        "/agents",
        "/agents?type=cost&status=healthy&capability=analyze_cost&capability=x",
        "/api/v1/agents",
    ):
        code, listing = await call(service, "GET", target, headers=viewer)
        assert code == 200
    assert listing["count"] == 1
    code, _ = await call(
        service,
        "GET",
        "/agents/type/cost?status=healthy",
        "/agents/type/{agent_type}",
        headers=viewer,
    )
    assert code == 200
    assert (await call(service, "GET", f"/agents/{agent_id}", one, headers=viewer))[
        0
    ] == 200

    # The agents' /api/v1 shapes.
    v1 = {
        "agent_id": "performance-agent-1",
        "agent_type": "performance",
        "capabilities": ["optimize_kv_cache"],
        "endpoint": "http://localhost:8002",
        "health_check_endpoint": "/api/v1/health",
        "version": "1.0.0",
        "status": "active",
    }
    assert not problems(request_schema("/api/v1/agents/register", "post"), v1)
    for expected in ("registered", "re-registered"):
        code, answer = await call(
            service, "POST", "/api/v1/agents/register", json=v1, headers=agent
        )
        assert (code, answer["status"]) == (200, expected)
    v1_one = "/api/v1/agents/{agent_id}"
    code, record = await call(
        service, "GET", "/api/v1/agents/performance-agent-1", v1_one, headers=viewer
    )
    assert record["endpoint"] == "http://localhost:8002"
    code, _ = await call(
        service,
        "POST",
        "/api/v1/agents/heartbeat",
        json={"agent_id": "performance-agent-1", "timestamp": "x", "status": "active"},
        headers=agent,
    )
    assert code == 200
    code, _ = await call(
        service,
        "POST",
        "/api/v1/agents/performance-agent-1/heartbeat",
        "/api/v1/agents/{agent_id}/heartbeat",
        json={"status": "degraded"},
        headers=agent,
    )
    assert code == 200

    # Errors.
    bad = {**registration, "port": 0}
    code, error = await call(
        service, "POST", "/agents/register", json=bad, headers=agent
    )
    assert (code, error["field"]) == (400, "port")
    code, error = await call(service, "GET", "/agents/bad%20id", one, headers=viewer)
    assert (code, error["field"]) == (400, "agent_id")
    code, error = await call(service, "GET", "/agents?type=gpu", headers=viewer)
    assert (code, error["field"]) == (400, "type")
    assert (await call(service, "GET", "/agents"))[0] == 401
    code, _ = await call(
        service, "POST", "/agents/register", json=registration, headers=viewer
    )
    assert code == 403
    code, error = await call(
        service,
        "POST",
        "/agents/register",
        data=b"name=x",
        headers={**agent, "Content-Type": "text/plain"},
    )
    assert (code, error["field"]) == (415, "content-type")
    code, error = await call(
        service, "POST", "/agents/nobody/heartbeat", beat, headers=agent
    )
    assert (code, error["action"]) == (404, "register")
    assert (
        await call(service, "GET", "/api/v1/agents/nobody", v1_one, headers=viewer)
    )[0] == 404

    response = await service.request("DELETE", "/agents", headers=agent)
    spec = deref(DOCUMENT["components"]["responses"]["MethodNotAllowed"])
    assert response.code == 405
    assert not nonconformance(spec, response, await response.content())

    port = int(service.url.rsplit(":", 1)[1])
    answer = await deferToThread(
        raw_http,
        port,
        b"POST /agents/register HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: 9000\r\n\r\n{",
    )
    head, _, content = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert b"X-Request-ID: " in head
    error_schema = response_spec("/agents/register", "post", 413)["content"][
        "application/json"
    ]["schema"]
    assert not problems(error_schema, orjson.loads(content), closed=True)

    # Leaving.
    code, _ = await call(
        service,
        "POST",
        f"/agents/{agent_id}/unregister",
        "/agents/{agent_id}/unregister",
        headers=agent,
    )
    assert code == 200
    code, _ = await call(
        service, "DELETE", "/api/v1/agents/performance-agent-1", v1_one, headers=agent
    )
    assert code == 200
    service.http._readiness.start_draining()
    assert (await call(service, "GET", "/readyz"))[0] == 503


TASK = {"task_type": "analyze_cost", "agent_type": "cost"}
ONE_TASK = "/tasks/{task_id}"


async def register_worker(
    service: RunningService,
    worker: FakeAgent,
    kind: str,
    capability: str | list[str],
    headers: dict[str, str],
) -> str:
    assert worker.port is not None
    address = worker.port.getHost()
    assert isinstance(address, IPv4Address)
    code, registered = await call(
        service,
        "POST",
        "/agents/register",
        json={
            "name": worker.name,
            "type": kind,
            "host": "127.0.0.1",
            "port": address.port,
            "capabilities": [capability] if isinstance(capability, str) else capability,
        },
        headers=headers,
    )
    assert code == 201
    return str(registered["agent_id"])


async def follow(
    service: RunningService,
    target: str,
    statuses: tuple[str, ...],
    headers: dict[str, str],
    template: str = ONE_TASK,
) -> dict[str, Any]:
    """
    C{GET target} (a task, or a plan with its C{template}), checked each time,
    until it has one of C{statuses}.
    """
    for _ in range(300):
        code, found = await call(service, "GET", target, template, headers=headers)
        assert code == 200
        if found["status"] in statuses:
            assert isinstance(found, dict)
            return found
        await settle(0.02)
    raise AssertionError(f"{target} stayed {found['status']}")


@pytest_twisted.ensureDeferred
async def test_task_answers_match_the_document(
    start_service: StartService, start_agent: StartAgent, tmp_path: Path
) -> None:
    keys = key_file(tmp_path / "keys")
    service = await start_service(
        mounts=[mount_once],
        api_keys_file=tmp_path / "keys",
        max_body_bytes=8192,
        retry_delay=0.05,
    )
    operator, viewer, agent = keys["operator"], keys["viewer"], keys["agent"]
    worker = await register_worker(
        service, await start_agent(COMPLETE), "cost", "analyze_cost", agent
    )

    # Submitting, with every optional field and header; a replay; a conflict.
    full = {
        **TASK,
        "parameters": {"x": 1},
        "metadata": {"by": "test"},
        "priority": "high",
        "timeout_seconds": 5,
        "max_retries": 1,
    }
    assert not problems(request_schema("/tasks", "post"), full)
    once = {
        **operator,
        "Idempotency-Key": "order-1",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }
    code, accepted = await call(service, "POST", "/tasks", json=full, headers=once)
    assert (code, accepted["status"]) == (201, "pending")
    task_id = accepted["task_id"]
    assert accepted["status_url"] == f"/tasks/{task_id}"
    replay = await service.request("POST", "/tasks", json=full, headers=once)
    content = await replay.content()
    spec = response_spec("/tasks", "post", replay.code)
    assert not nonconformance(spec, replay, content)
    assert (replay.code, orjson.loads(content)["task_id"]) == (201, task_id)
    [replayed] = replay.headers.getRawHeaders("idempotent-replayed")
    header = deref(spec["headers"]["Idempotent-Replayed"])
    assert not problems(header["schema"], replayed)
    code, error = await call(
        service, "POST", "/tasks", json={**full, "priority": 15}, headers=once
    )
    assert (code, error["task_id"]) == (409, task_id)

    # Completed, with its history.
    task = await follow(service, f"/tasks/{task_id}", FINISHED, viewer)
    assert (task["status"], task["agent_id"]) == ("completed", worker)
    assert task["history"][-1]["status"] == "completed"

    # Failed: the agent asked for is not registered.
    code, ghost = await call(
        service, "POST", "/tasks", json={**TASK, "agent_id": "ghost"}, headers=operator
    )
    assert (code, ghost["agent_id"]) == (201, "ghost")
    failed = await follow(service, f"/tasks/{ghost['task_id']}", FINISHED, viewer)
    assert failed["status"] == "failed"

    # Cancelled while it waits for an agent (there is no resource agent).
    code, waiting = await call(
        service,
        "POST",
        "/tasks",
        json={"task_type": "balance_load", "agent_type": "resource", "priority": 1},
        headers=operator,
    )
    await follow(service, f"/tasks/{waiting['task_id']}", ("queued",), viewer)
    code, cancelled = await call(
        service, "DELETE", f"/tasks/{waiting['task_id']}", ONE_TASK, headers=operator
    )
    assert (code, cancelled["status"]) == (200, "cancelled")

    # Cancelled while out at an agent that does not answer.
    await register_worker(
        service, await start_agent(HANG), "performance", "tune_inference", agent
    )
    code, out = await call(
        service,
        "POST",
        "/tasks",
        json={"task_type": "tune_inference", "agent_type": "performance"},
        headers=operator,
    )
    await follow(service, f"/tasks/{out['task_id']}", ("sent", "running"), viewer)
    code, cancelled = await call(
        service, "DELETE", f"/tasks/{out['task_id']}", ONE_TASK, headers=operator
    )
    assert (code, cancelled["status"]) == (200, "cancelled")
    assert cancelled["started_at"]

    # Listing, with the documented defaults and every filter.
    query = {
        deref(p)["name"]: deref(p)["schema"]
        for p in DOCUMENT["paths"]["/tasks"]["get"]["parameters"]
    }
    code, listing = await call(service, "GET", "/tasks", headers=viewer)
    assert (code, listing["count"]) == (200, 4)
    assert listing["limit"] == query["limit"]["default"]
    assert listing["offset"] == query["offset"]["default"]
    assert query["limit"]["maximum"] == MAX_PAGE
    for target, count in (
        (
            f"/tasks?status=completed&agent_id={worker}&agent_type=cost"
            "&task_type=analyze_cost&limit=1&offset=0",
            1,
        ),
        (f"/tasks?status=cancelled&limit={MAX_PAGE}&offset=1", 1),
    ):
        code, listing = await call(service, "GET", target, headers=viewer)
        assert (code, listing["count"]) == (200, count), target

    # Errors.
    for target, field in (
        ("/tasks?status=sleeping", "status"),
        (f"/tasks?limit={MAX_PAGE + 1}", "limit"),
        ("/tasks?offset=-1", "offset"),
        ("/tasks?agent_type=gpu", "agent_type"),
        ("/tasks?task_type=Dance!", "task_type"),
    ):
        code, error = await call(service, "GET", target, headers=viewer)
        assert (code, error["field"]) == (400, field), target
    for method, headers in (("GET", viewer), ("DELETE", operator)):
        code, error = await call(
            service, method, "/tasks/bad%20id", ONE_TASK, headers=headers
        )
        assert (code, error["field"]) == (400, "task_id")
        code, error = await call(
            service, method, "/tasks/no-such-task", ONE_TASK, headers=headers
        )
        assert (code, error["task_id"]) == (404, "no-such-task")
    code, error = await call(
        service, "DELETE", f"/tasks/{task_id}", ONE_TASK, headers=operator
    )
    assert (code, error["status"], error["task_id"]) == (409, "completed", task_id)
    for body, field in (
        ({**TASK, "task_type": "dance"}, "task_type"),
        ({**TASK, "agent_type": "resource"}, "agent_type"),
        ({**TASK, "priority": 16}, "priority"),
    ):
        code, error = await call(service, "POST", "/tasks", json=body, headers=operator)
        assert (code, error["field"]) == (400, field)
    code, error = await call(
        service,
        "POST",
        "/tasks",
        json=TASK,
        headers={**operator, "Idempotency-Key": "two words"},
    )
    assert (code, error["field"]) == (400, "Idempotency-Key")
    code, error = await call(
        service,
        "POST",
        "/tasks",
        data=b"task_type=x",
        headers={**operator, "Content-Type": "text/plain"},
    )
    assert (code, error["field"]) == (415, "content-type")
    port = int(service.url.rsplit(":", 1)[1])
    authorization = operator["Authorization"].encode()
    answer = await deferToThread(
        raw_http,
        port,
        b"POST /tasks HTTP/1.1\r\nHost: x\r\nAuthorization: " + authorization + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 9000\r\n\r\n{",
    )
    head, _, content = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    error_schema = response_spec("/tasks", "post", 413)["content"][JSON]["schema"]
    assert not problems(error_schema, orjson.loads(content), closed=True)
    assert (await call(service, "GET", "/tasks"))[0] == 401
    assert (await call(service, "GET", "/tasks", headers=agent))[0] == 403
    code, _ = await call(service, "POST", "/tasks", json=TASK, headers=viewer)
    assert code == 403
    code, _ = await call(
        service, "DELETE", f"/tasks/{task_id}", ONE_TASK, headers=viewer
    )
    assert code == 403


CUSTOMER = "acme"
COORDINATE = "/coordination/coordinate"
ONE_APPROVAL = "/coordination/approvals/{approval_id}"
APPROVE = "/coordination/approvals/{approval_id}/approve"
REJECT = "/coordination/approvals/{approval_id}/reject"
ONE_PLAN = "/coordination/plans/{plan_id}"
EXECUTE = "/coordination/plans/{plan_id}/execute"
RESULT = "/coordination/results/{coordination_id}"


def recommendation(rec_id: str, agent_type: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": rec_id,
        "agent_type": agent_type,
        "action": "right_size",
        "risk_level": "low",
        "affected_resources": [f"cluster-a/{rec_id}"],
        **fields,
    }


@pytest_twisted.ensureDeferred
async def test_coordination_answers_match_the_document(
    start_service: StartService, start_agent: StartAgent, tmp_path: Path
) -> None:
    keys = key_file(tmp_path / "keys")
    service = await start_service(
        mounts=[mount_once],
        api_keys_file=tmp_path / "keys",
        max_body_bytes=8192,
        retry_delay=0.05,
        coordination_interval=0.05,
    )
    operator, viewer, agent = keys["operator"], keys["viewer"], keys["agent"]
    await register_worker(
        service, await start_agent(COMPLETE), "performance", "enable_caching", agent
    )
    await register_worker(
        service,
        await start_agent(COMPLETE),
        "cost",
        ["take_snapshot", "migrate_workload", "restore_snapshot"],
        agent,
    )
    await register_worker(
        service, await start_agent(FAIL), "application", "validate_quality", agent
    )

    # A batch: a medium-risk change (an approval) beating a cost one on the same
    # resource (a conflict), a critical one, a low-risk one (a plan at once),
    # an expired one; every optional field on the first.
    cache = recommendation(
        "cache",
        "performance",
        agent_id="performance-agent-1",
        customer_id=CUSTOMER,
        type="optimization",
        title="Enable the KV cache",
        description="Caches prompts.",
        action="enable_caching",
        risk_level="medium",
        estimated_savings=120.5,
        estimated_impact={"latency_ms": -30},
        affected_resources=["cluster-a/cache"],
        parameters={"size_gb": 4},
        dependencies=[],
        priority="high",
        confidence=0.9,
        created_at="2025-10-16T10:00:00Z",
        expires_at="2999-01-01T00:00:00+02:00",
        metadata={"source": "test"},
        window={"start": "2999-01-01T00:00:00Z", "end": "2999-01-01T01:00:00Z"},
    )
    batch = {
        "customer_id": CUSTOMER,
        "recommendations": [
            cache,
            recommendation(
                "shrink",
                "cost",
                action="scale_down",
                affected_resources=cache["affected_resources"],
            ),
            recommendation("critical", "resource", risk_level="critical"),
            recommendation("small", "resource", dependencies=None, window=None),
            recommendation("stale", "cost", expires_at="2000-01-01T00:00:00Z"),
        ],
        "auto_approve": False,
        "execute_now": None,
        "metadata": {"constraints": {"prefer": [], "avoid_actions": ["terminate"]}},
    }
    assert not problems(request_schema(COORDINATE, "post"), batch)
    code, result = await call(service, "POST", COORDINATE, json=batch, headers=operator)
    assert code == 200
    assert (result["conflicts_detected"], result["recommendations_kept"]) == (1, 3)
    assert [d["id"] for d in result["dropped"]] == ["shrink", "stale"]
    [conflict] = result["conflicts"]
    assert (conflict["type"], conflict["kept"]) == ("resource", ["cache"])
    assert {a["recommendation_id"] for a in result["approvals"]} == {
        "cache",
        "critical",
    }
    [low_plan] = result["execution_plans"]
    assert low_plan["status"] == "pending"
    pending = {a["recommendation_id"]: a for a in result["approvals"]}

    # Listing and reading approvals.
    for target, count in (
        ("/coordination/approvals", 2),
        (f"/coordination/approvals?customer_id={CUSTOMER}&status=pending", 2),
        ("/coordination/approvals?customer_id=nobody", 0),
        ("/coordination/approvals?status=approved", 0),
    ):
        code, listing = await call(service, "GET", target, headers=viewer)
        assert (code, listing["count"]) == (200, count), target
    approval_id = pending["cache"]["id"]
    code, approval = await call(
        service,
        "GET",
        f"/coordination/approvals/{approval_id}",
        ONE_APPROVAL,
        headers=viewer,
    )
    assert (code, approval["status"]) == (200, "pending")

    # Approved (as the key's owner), then the plan read and executed.
    code, approved = await call(
        service,
        "POST",
        f"/coordination/approvals/{approval_id}/approve",
        APPROVE,
        json={},
        headers=operator,
    )
    assert (code, approved["status"]) == (200, "approved")
    assert approved["approved_by"] == ["operator-key"]
    plan_id = approved["plan"]["id"]
    assert approved["plan_id"] == plan_id
    code, again = await call(
        service,
        "POST",
        f"/coordination/approvals/{approval_id}/approve",
        APPROVE,
        json={"user_id": "operator-key"},
        headers=operator,
    )
    assert (code, again["status"], again["approval_id"]) == (
        409,
        "approved",
        approval_id,
    )
    code, plan = await call(
        service, "GET", f"/coordination/plans/{plan_id}", ONE_PLAN, headers=viewer
    )
    assert (code, plan["status"]) == (200, "pending")
    code, started = await call(
        service,
        "POST",
        f"/coordination/plans/{plan_id}/execute",
        EXECUTE,
        headers=operator,
    )
    assert (code, started["plan_id"]) == (202, plan_id)
    done = await follow(
        service, f"/coordination/plans/{plan_id}", PLAN_FINISHED, viewer, ONE_PLAN
    )
    assert done["status"] == "completed"
    code, twice = await call(
        service,
        "POST",
        f"/coordination/plans/{plan_id}/execute",
        EXECUTE,
        headers=operator,
    )
    assert (code, twice["status"], twice["plan_id"]) == (409, "completed", plan_id)

    # A critical change: one approval is not enough, the same person cannot
    # approve twice; then rejected, for good.
    critical = f"/coordination/approvals/{pending['critical']['id']}"
    code, first = await call(
        service, "POST", f"{critical}/approve", APPROVE, json={}, headers=operator
    )
    assert (code, first["status"], first["plan"]) == (200, "pending", None)
    code, error = await call(
        service, "POST", f"{critical}/approve", APPROVE, json={}, headers=operator
    )
    assert (code, error["status"]) == (409, "pending")
    code, rejected = await call(
        service,
        "POST",
        f"{critical}/reject",
        REJECT,
        json={"reason": "too risky"},
        headers=operator,
    )
    assert (code, rejected["status"], rejected["rejected_by"]) == (
        200,
        "rejected",
        "operator-key",
    )
    code, error = await call(
        service,
        "POST",
        f"{critical}/reject",
        REJECT,
        json={"reason": "still"},
        headers=operator,
    )
    assert (code, error["status"]) == (409, "rejected")

    # Read again, with the approvals and plans as they are now.
    code, again = await call(
        service,
        "GET",
        f"/coordination/results/{result['id']}",
        RESULT,
        headers=viewer,
    )
    assert code == 200
    statuses = {a["recommendation_id"]: a["status"] for a in again["approvals"]}
    assert statuses == {"cache": "approved", "critical": "rejected"}
    assert {p["status"] for p in again["execution_plans"]} == {"pending", "completed"}

    # Approved at once and started: a migration whose quality check fails, so
    # it is rolled back.
    code, spot = await call(
        service,
        "POST",
        COORDINATE,
        json={
            "customer_id": CUSTOMER,
            "recommendations": [
                recommendation(
                    "spot", "cost", action="migrate_to_spot", risk_level="high"
                )
            ],
            "auto_approve": True,
            "execute_now": True,
        },
        headers=operator,
    )
    assert code == 200
    [spot_plan] = spot["execution_plans"]
    assert spot_plan["status"] == "waiting"
    ended = await follow(
        service,
        f"/coordination/plans/{spot_plan['id']}",
        PLAN_FINISHED,
        viewer,
        ONE_PLAN,
    )
    assert ended["status"] == "rolled_back"
    assert [step["status"] for step in ended["steps"]] == [
        "completed",
        "rolled_back",
        "failed",
    ]

    # Errors.
    for body, field in (
        ({**batch, "customer_id": None}, "customer_id"),
        ({**batch, "recommendations": []}, "recommendations"),
        (
            {**batch, "recommendations": [{**cache, "window": {"start": "x"}}]},
            "recommendations[0].window.start",
        ),
        ({**batch, "execute_now": "yes"}, "execute_now"),
    ):
        assert problems(request_schema(COORDINATE, "post"), body)
        code, error = await call(
            service, "POST", COORDINATE, json=body, headers=operator
        )
        assert (code, error["field"]) == (400, field)
    for target, field in (
        ("/coordination/approvals?status=maybe", "status"),
        ("/coordination/approvals?customer_id=bad%20id", "customer_id"),
    ):
        code, error = await call(service, "GET", target, headers=viewer)
        assert (code, error["field"]) == (400, field), target
    for target, template, field in (
        ("/coordination/approvals/bad%20id", ONE_APPROVAL, "approval_id"),
        ("/coordination/plans/bad%20id", ONE_PLAN, "plan_id"),
        ("/coordination/results/bad%20id", RESULT, "coordination_id"),
    ):
        code, error = await call(service, "GET", target, template, headers=viewer)
        assert (code, error["field"]) == (400, field), target
        code, error = await call(
            service, "GET", target.replace("bad%20id", "nope"), template, headers=viewer
        )
        assert (code, error[field]) == (404, "nope"), target
    missing: list[tuple[str, str, Any]] = [
        ("/coordination/approvals/nope/approve", APPROVE, {}),
        ("/coordination/approvals/nope/reject", REJECT, {"reason": "no"}),
        ("/coordination/plans/nope/execute", EXECUTE, None),
    ]
    for target, template, body in missing:
        code, _ = await call(
            service, "POST", target, template, json=body, headers=operator
        )
        assert code == 404, target
    refused: list[tuple[dict[str, Any], str, int]] = [
        ({"user_id": "someone-else"}, "user_id", 403),  # acting as another
        ({"reason": ""}, "reason", 400),
        ({}, "reason", 400),
    ]
    for body, field, status in refused:
        code, error = await call(
            service, "POST", f"{critical}/reject", REJECT, json=body, headers=operator
        )
        assert (code, error["field"]) == (status, field), body
    code, error = await call(
        service,
        "POST",
        COORDINATE,
        data=b"customer_id=acme",
        headers={**operator, "Content-Type": "text/plain"},
    )
    assert (code, error["field"]) == (415, "content-type")
    assert (await call(service, "GET", "/coordination/approvals"))[0] == 401
    code, _ = await call(service, "POST", COORDINATE, json=batch, headers=viewer)
    assert code == 403
    code, _ = await call(service, "GET", "/coordination/approvals", headers=agent)
    assert code == 403


LOW = recommendation("r1", "cost")
#: The request's metadata, valid and not.
METADATA: list[Any] = [
    {},
    {"constraints": None},
    {"constraints": {"prefer": ["r1"], "avoid_actions": ["terminate"]}},
    {"constraints": {"protected_resources": ["cluster-a/db-1"]}},
    {"constraints": {"prefer": ["bad id"]}},
    {"constraints": {"avoid_actions": ["1bad"]}},
    {"constraints": {"protected_resources": ["/root"]}},
    {"constraints": []},
    [],
]
#: Changes to a valid recommendation, valid and not.
CHANGES: list[dict[str, Any]] = [
    {"id": None},
    {"id": "bad id"},
    {"agent_type": "gpu"},
    {"action": "1st"},
    {"action": None},
    *[{"risk_level": level} for level in ("medium", "critical", None, "huge")],
    {"customer_id": CUSTOMER},
    {"agent_id": "cost-agent-1", "type": "optimization"},
    {"agent_id": "bad id"},
    {"type": "   "},
    {"title": "t" * 256},
    {"title": "t" * 257},
    {"title": " "},
    {"description": "one\ntwo"},
    {"description": "d" * 4096},
    *[{"estimated_savings": value} for value in (-5, 1e15, 0.5, 1e16, "5", True, None)],
    {"estimated_impact": [1, "x"]},
    {"affected_resources": ["cluster-a/node-1", "db:1@eu"]},
    {"affected_resources": ["bad resource"]},
    {"affected_resources": "cluster-a"},
    {"parameters": {"x": 1}, "metadata": {"y": [2]}},
    {"parameters": [1]},
    {"metadata": "x"},
    {"dependencies": ["r1"]},
    {"dependencies": ["bad id"]},
    *[
        {"priority": value}
        for value in (1, 15, "low", "critical", None, 0, 16, "urgent", 5.5)
    ],
    *[{"confidence": value} for value in (0, 1, 0.5, 1.5, -0.1, "0.5")],
    *[
        {"created_at": value}
        for value in (
            "2025-10-16T10:00:00Z",
            "2025-10-16T10:00:00.250+02:00",
            "2025-10-16T10:00:00",
            "yesterday",
            1760608800,
        )
    ],
    {"window": None},
    {
        "window": {
            "start": "2999-01-01T00:00:00Z",
            "end": "2999-01-02T00:00:00Z",
        }
    },
    {"window": {"start": "2999-01-01T00:00:00Z"}},
    {"window": {"start": "2999-01-01T00:00:00Z", "end": None}},
    {"window": "2999"},
    {"status": "approved", "unknown": 1},
]
COORDINATIONS: list[Any] = [
    {"customer_id": CUSTOMER, "recommendations": [LOW]},
    {"customer_id": CUSTOMER, "recommendations": [LOW], "metadata": None},
    {"customer_id": "bad id", "recommendations": [LOW]},
    {"recommendations": [LOW]},
    {"customer_id": CUSTOMER, "recommendations": []},
    {"customer_id": CUSTOMER, "recommendations": LOW},
    {"customer_id": CUSTOMER, "recommendations": [LOW, {}]},
    *[
        {"customer_id": CUSTOMER, "recommendations": [LOW], flag: value}
        for flag in ("auto_approve", "execute_now")
        for value in (True, False, None, 1, "true")
    ],
    *[
        {"customer_id": CUSTOMER, "recommendations": [LOW], "metadata": metadata}
        for metadata in METADATA
    ],
    *[
        {"customer_id": CUSTOMER, "recommendations": [{**LOW, **change}]}
        for change in CHANGES
    ],
]


#: Bodies sent to each endpoint; the document and the service must agree on
#: which are acceptable.
ROOT_REGISTRATION = {"name": "perf-1", "type": "performance", "host": "h", "port": 1}
V1_REGISTRATION = {"agent_id": "app-1", "agent_type": "application"}
BODIES: list[tuple[str, str, Any]] = [
    ("/agents/register", "", ROOT_REGISTRATION),
    ("/agents/register", "", {**ROOT_REGISTRATION, "port": 65535}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "port": 0}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "port": 65536}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "port": "8001"}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "port": True}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "port": 80.5}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "port": None}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "type": "gpu"}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "type": "Cost"}),
    *[
        ("/agents/register", "", {**ROOT_REGISTRATION, "type": t})
        for t in ("cost", "resource", "application")
    ],
    (
        "/agents/register",
        "",
        {k: v for k, v in ROOT_REGISTRATION.items() if k != "host"},
    ),
    ("/agents/register", "", {**ROOT_REGISTRATION, "host": "a b"}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "host": "fd00::1"}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "host": "h" * 254}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "name": ""}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "name": "   "}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "name": "Perf Agent 1"}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "name": "bad\x01"}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "name": "n" * 128}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "name": "n" * 129}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "capabilities": ["a", "a"]}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "capabilities": ["bad cap"]}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "capabilities": "a"}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "capabilities": None}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "capabilities": ["c"] * 257}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "status": "active"}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "status": "degraded"}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "status": "unreachable"}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "version": ""}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "version": "v" * 65}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "version": None}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "metadata": []}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "metadata": {"k": [1]}}),
    ("/agents/register", "", {**ROOT_REGISTRATION, "unknown": 1}),
    ("/agents/register", "", ["not", "an", "object"]),
    ("/api/v1/agents/register", "", {**V1_REGISTRATION, "endpoint": "http://h:8004"}),
    ("/api/v1/agents/register", "", {**V1_REGISTRATION, "endpoint": "https://h"}),
    ("/api/v1/agents/register", "", {**V1_REGISTRATION, "endpoint": "ftp://h:21"}),
    ("/api/v1/agents/register", "", {**V1_REGISTRATION, "host": "h", "port": 8004}),
    ("/api/v1/agents/register", "", {**V1_REGISTRATION, "host": "h"}),
    ("/api/v1/agents/register", "", V1_REGISTRATION),
    (
        "/api/v1/agents/register",
        "",
        {**V1_REGISTRATION, "endpoint": None, "host": "h", "port": 8004},
    ),
    (
        "/api/v1/agents/register",
        "",
        {**V1_REGISTRATION, "host": "h", "port": 1, "agent_name": "App Agent"},
    ),
    ("/api/v1/agents/register", "", {**V1_REGISTRATION, "agent_id": "bad id"}),
    ("/api/v1/agents/register", "", {"agent_id": "x", "host": "h", "port": 1}),
    (
        "/api/v1/agents/register",
        "",
        {**V1_REGISTRATION, "host": "h", "port": 1, "status": "active"},
    ),
    ("/agents/{agent_id}/heartbeat", "/agents/{id}/heartbeat", {}),
    ("/agents/{agent_id}/heartbeat", "/agents/{id}/heartbeat", {"status": "active"}),
    ("/agents/{agent_id}/heartbeat", "/agents/{id}/heartbeat", {"status": "down"}),
    ("/agents/{agent_id}/heartbeat", "/agents/{id}/heartbeat", {"metrics": 5}),
    ("/agents/{agent_id}/heartbeat", "/agents/{id}/heartbeat", {"metadata": None}),
    ("/agents/{agent_id}/heartbeat", "/agents/{id}/heartbeat", [1]),
    ("/api/v1/agents/heartbeat", "", {"agent_id": "{id}"}),
    ("/api/v1/agents/heartbeat", "", {"agent_id": "{id}", "timestamp": 1}),
    ("/api/v1/agents/heartbeat", "", {"status": "healthy"}),
    ("/api/v1/agents/heartbeat", "", {"agent_id": "{id}", "status": "unhealthy"}),
    ("/api/v1/agents/heartbeat", "", {"agent_id": "{id}", "status": "ok"}),
    ("/tasks", "", TASK),
    *[
        ("/tasks", "", {"task_type": task_type, "agent_type": agent_type})
        for task_type, agent_type in TASK_TYPES.items()
    ],
    ("/tasks", "", {**TASK, "agent_type": "resource"}),
    ("/tasks", "", {"task_type": "validate_quality", "agent_type": "cost"}),
    ("/tasks", "", {**TASK, "task_type": "dance-2"}),
    ("/tasks", "", {**TASK, "task_type": "Analyze_Cost"}),
    ("/tasks", "", {**TASK, "task_type": None}),
    ("/tasks", "", {**TASK, "agent_type": "gpu"}),
    ("/tasks", "", {"agent_type": "cost"}),
    ("/tasks", "", {"task_type": "analyze_cost"}),
    ("/tasks", "", {**TASK, "agent_id": "{id}"}),
    ("/tasks", "", {**TASK, "agent_id": None}),
    ("/tasks", "", {**TASK, "agent_id": "bad id"}),
    ("/tasks", "", {**TASK, "agent_id": ""}),
    ("/tasks", "", {**TASK, "agent_id": "a" * 128}),
    ("/tasks", "", {**TASK, "agent_id": "a" * 129}),
    ("/tasks", "", {**TASK, "agent_id": 5}),
    ("/tasks", "", {**TASK, "parameters": {"x": [1]}, "metadata": {}}),
    ("/tasks", "", {**TASK, "parameters": None, "metadata": None}),
    ("/tasks", "", {**TASK, "parameters": [1]}),
    ("/tasks", "", {**TASK, "parameters": "x"}),
    ("/tasks", "", {**TASK, "metadata": 5}),
    *[
        ("/tasks", "", {**TASK, "priority": priority})
        for priority in (1, 15, "low", "normal", "high", "critical", None)
    ],
    *[
        ("/tasks", "", {**TASK, "priority": priority})
        for priority in (0, 16, -1, "urgent", "High", "5", True, 5.5, [5])
    ],
    *[
        ("/tasks", "", {**TASK, "timeout_seconds": timeout})
        for timeout in (0.001, 12.5, 30, 300, None)
    ],
    *[
        ("/tasks", "", {**TASK, "timeout_seconds": timeout})
        for timeout in (0, 0.0005, -1, 300.5, 301, "30", True)
    ],
    *[("/tasks", "", {**TASK, "max_retries": retries}) for retries in (0, 3, 10, None)],
    *[
        ("/tasks", "", {**TASK, "max_retries": retries})
        for retries in (-1, 11, 1.5, "3", False)
    ],
    ("/tasks", "", {**TASK, "unknown": 1}),
    ("/tasks", "", ["not", "an", "object"]),
    ("/tasks", "", {}),
    *[(COORDINATE, "", body) for body in COORDINATIONS],
]


def fill(node: Any, agent_id: str) -> Any:
    if isinstance(node, str):
        return node.replace("{id}", agent_id)
    if isinstance(node, dict):
        return {key: fill(value, agent_id) for key, value in node.items()}
    return node


@pytest_twisted.ensureDeferred
async def test_the_document_and_the_service_agree_on_bodies(
    start_service: StartService,
) -> None:
    service = await start_service()
    _, registered = await call(
        service, "POST", "/agents/register", json=ROOT_REGISTRATION
    )
    agent_id = registered["agent_id"]
    verdicts = []
    disagreements = []
    for template, target, body in BODIES:
        body = fill(body, agent_id)
        documented = not problems(request_schema(template, "post"), body)
        code, answer = await call(
            service, "POST", fill(target or template, agent_id), template, json=body
        )
        assert code < 300 or code == 400, (template, body, code, answer)
        verdicts.append(documented)
        if documented != (code < 300):
            disagreements.append((template, body, documented, answer))
    assert not disagreements, [d[:3] for d in disagreements]
    assert verdicts.count(True) > 10
    assert verdicts.count(False) > 10
