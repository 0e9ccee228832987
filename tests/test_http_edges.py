"""
The edges of HTTP, in process over real sockets: bodies nested too deep or with
integers too wide, paths Werkzeug would redirect, what Twisted refuses, slow
clients and too many connections.  tests/integration/test_http_edges.py does the
same against a real twistd.
"""

from __future__ import annotations

import re
import socket
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from werkzeug.routing import RequestRedirect

from optiinfra.web.app import render_failure
from optiinfra.web.body import MAX_DEPTH

from .agents import StartAgent
from .client import raw_http
from .conftest import LogCapture, RunningService, StartService


def nested(depth: int) -> bytes:
    """C{depth} levels of arrays and objects around a 1, as JSON text."""
    opening = "".join('{"a":' if level % 2 else "[" for level in range(depth))
    closing = "".join("}" if level % 2 else "]" for level in reversed(range(depth)))
    return f"{opening}1{closing}".encode()


def embed(document: dict[str, Any], deep: bytes) -> bytes:
    """C{document} as JSON, with C{deep} where it says C{"DEEP"}."""
    return orjson.dumps(document).replace(b'"DEEP"', deep)


def port_of(service: RunningService) -> int:
    return int(service.url.rsplit(":", 1)[1])


def exchange(port: int, data: bytes) -> bytes:
    return raw_http(port, data, timeout=15)


def split(answer: bytes) -> tuple[int, bytes, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), head, orjson.loads(body)


async def post(service: RunningService, path: str, document: Any, **kw: Any) -> Any:
    response = await service.request(
        "POST",
        path,
        data=document if isinstance(document, bytes) else orjson.dumps(document),
        headers={"Content-Type": "application/json", **kw.pop("headers", {})},
        **kw,
    )
    return response.code, await response.json()


REGISTER = {"name": "cost-1", "type": "cost", "host": "127.0.0.1", "port": 8001}
TASK = {"task_type": "analyze_cost", "agent_type": "cost"}


# Bodies ---------------------------------------------------------------------


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 256, 1024, 1025, 5000])
@pytest_twisted.ensureDeferred
async def test_deep_parameters_are_a_400_naming_the_field(
    service: RunningService, depth: int
) -> None:
    for headers in ({}, {"Idempotency-Key": f"deep-{depth}"}):
        code, body = await post(
            service,
            "/tasks",
            embed({**TASK, "parameters": {"x": "DEEP"}}, nested(depth)),
            headers=headers,
        )
        assert code == 400, body
        assert "nest" in body["detail"]
        assert str(MAX_DEPTH) in body["detail"]
        if depth < 1000:  # past 1,024 in all, orjson refuses the whole body
            assert body["field"] == "parameters"


@pytest_twisted.ensureDeferred
async def test_deep_fields_everywhere_are_400s(service: RunningService) -> None:
    deep = "DEEP"
    cases = [
        ("/agents/register", {**REGISTER, "metadata": {"x": deep}}, "metadata"),
        ("/agents/whoever/heartbeat", {"metadata": {"x": deep}}, "metadata"),
        (
            "/api/v1/agents/register",
            {"agent_id": "a1", "agent_type": "cost", "metadata": {"d": deep}},
            "metadata",
        ),
        (
            "/coordination/coordinate",
            {"customer_id": "c", "recommendations": [{"metadata": {"x": deep}}]},
            "recommendations",
        ),
    ]
    for path, document, field in cases:
        code, body = await post(service, path, embed(document, nested(300)))
        assert (code, body["field"]) == (400, field), (path, body)
    # A field no reader looks at, with an Idempotency-Key (whose check encodes
    # the whole body again).
    for path, document in [
        ("/tasks", TASK),
        ("/coordination/coordinate", {"customer_id": "c", "recommendations": []}),
    ]:
        code, body = await post(
            service,
            path,
            embed({**document, "unread": "DEEP"}, nested(300)),
            headers={"Idempotency-Key": "k-1"},
        )
        assert (code, body["field"]) == (400, "unread"), (path, body)


@pytest.mark.parametrize("brackets_in_a_string", [0, 200])
@pytest_twisted.ensureDeferred
async def test_nesting_up_to_the_limit_is_kept_and_one_more_is_not(
    service: RunningService, brackets_in_a_string: int
) -> None:
    padding = {"note": "[{" * brackets_in_a_string}
    # The body and "parameters" are two levels; "x" holds the rest.
    at_limit = embed({**TASK, "parameters": {"x": "DEEP"}, **padding}, nested(62))
    code, created = await post(service, "/tasks", at_limit)
    assert code == 201, created
    response = await service.get(f"/tasks/{created['task_id']}")
    assert response.code == 200
    await response.content()
    past_limit = embed({**TASK, "parameters": {"x": "DEEP"}, **padding}, nested(63))
    code, body = await post(service, "/tasks", past_limit)
    assert (code, body["field"]) == (400, "parameters")


@pytest_twisted.ensureDeferred
async def test_many_shallow_containers_are_fine(service: RunningService) -> None:
    parameters = {"rows": [[{"a": [i]}] for i in range(300)]}
    code, created = await post(service, "/tasks", {**TASK, "parameters": parameters})
    assert code == 201, created


@pytest.mark.parametrize(
    "literal",
    [
        b"123456789012345678901234567890",
        b"18446744073709551616",
        b"-9223372036854775809",
        b"9" * 300,  # longer ones orjson refuses itself, as infinite
    ],
)
@pytest_twisted.ensureDeferred
async def test_integers_beyond_64_bits_are_refused(
    service: RunningService, literal: bytes
) -> None:
    raw = b'{"task_type":"analyze_cost","agent_type":"cost","parameters":{"n":[1,%s]}}'
    response = await service.request(
        "POST",
        "/tasks",
        data=raw % literal,
        headers={"Content-Type": "application/json"},
    )
    body = await response.json()
    assert response.code == 400, body
    assert body["field"] == "parameters.n[1]"
    assert "beyond 64 bits" in body["detail"]


@pytest_twisted.ensureDeferred
async def test_64_bit_integers_and_big_floats_reach_the_agent_exactly(
    start_service: StartService, start_agent: StartAgent
) -> None:
    from .test_routing import FAST, register, wait_for

    service = await start_service(**FAST)
    agent = await start_agent()
    await register(service, agent)
    parameters = {
        "top": 2**64 - 1,
        "bottom": -(2**63),
        "float": 1.5e300,
        "digits in a string": "12345678901234567890123",
    }
    code, created = await post(service, "/tasks", {**TASK, "parameters": parameters})
    assert code == 201, created
    assert (await wait_for(service, created["task_id"]))["status"] == "completed"
    [received] = agent.received
    assert received.body["parameters"] == parameters
    assert isinstance(received.body["parameters"]["top"], int)


# Paths ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "//agents//register",
        "//agents/register",
        "/agents//register",
        "/agents/register//",
        "//api/v1/agents/register",
        "/api/v1//agents/register",
        "/api/v1/agents//register",
        "/agents//a1/heartbeat",
        "/api/v1/agents//a1/heartbeat",
        "//api/v1/agents/heartbeat",
        "//agents/a1/heartbeat",
        "/tasks//x",
    ],
)
@pytest_twisted.ensureDeferred
async def test_doubled_slashes_are_a_json_404_not_a_redirect(
    service: RunningService, path: str
) -> None:
    response = await service.request(
        "POST", path, data=orjson.dumps(REGISTER), allow_redirects=False
    )
    assert response.code == 404, await response.text()
    assert (await response.json())["error"] == "not found"


def test_a_redirect_always_says_where_to() -> None:
    from twisted.web.test.requesthelper import DummyRequest

    request = DummyRequest([b""])
    body = render_failure(request, Failure(RequestRedirect("http://x/agents/register")))
    assert request.responseCode == 308
    assert request.responseHeaders.getRawHeaders(b"location") == [
        b"http://x/agents/register"
    ]
    assert orjson.loads(body)["error"]


# What Twisted refuses ---------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code", "reason"),
    [
        (
            b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            414,
            "request line",
        ),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n", 431, "headers"),
        (b"GARBAGE\r\n\r\n", 400, "request line"),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400, "headers"),
        (b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400, "headers"),
        (
            b"POST /tasks HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            400,
            "body",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_twisted_refusals_are_json(
    service: RunningService, logs: LogCapture, data: bytes, code: int, reason: str
) -> None:
    answer = await deferToThread(exchange, port_of(service), data)
    status, head, body = split(answer)
    assert status == code, answer[:300]
    assert b"Content-Type: application/json" in head
    assert b"Connection: close" in head
    assert reason in body["detail"]
    assert body["request_id"]


@pytest_twisted.ensureDeferred
async def test_a_body_too_large_is_not_invited_with_100_continue(
    start_service: StartService,
) -> None:
    service = await start_service(max_body_bytes=64)
    answer = await deferToThread(
        exchange,
        port_of(service),
        b"POST /tasks HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: 1000\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 413")
    assert b"100 Continue" not in answer


@pytest_twisted.ensureDeferred
async def test_many_small_headers_over_the_total_are_a_431(
    service: RunningService,
) -> None:
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(20))
    answer = await deferToThread(
        exchange, port_of(service), b"GET /health HTTP/1.1\r\n" + headers + b"\r\n"
    )
    status, _, body = split(answer)
    assert status == 431
    assert "16384" in body["detail"]


# Slow clients -----------------------------------------------------------------


def trickle_headers(port: int, pause: float) -> bytes:
    """One header line every C{pause} seconds until the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        sock.settimeout(pause)
        answer = b""
        for number in range(200):
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                sock.sendall(b"X-Slow-%d: 1\r\n" % number)
                continue
            if not chunk:
                return answer
            answer += chunk
        return answer


@pytest_twisted.ensureDeferred
async def test_headers_trickling_in_are_cut_at_the_header_timeout(
    start_service: StartService, logs: LogCapture
) -> None:
    service = await start_service(header_timeout=0.5)
    answer = await deferToThread(trickle_headers, port_of(service), 0.1)
    status, _, body = split(answer)
    assert status == 408
    assert body["field"] == "headers"
    [access] = logs.named("optiinfra.access")
    assert (access["status"], access["path"]) == (408, "/health")
    metrics = await (await service.get("/metrics")).text()
    assert 'optiinfra_http_refused_total{reason="header_timeout"} 1.0' in metrics


def trickle_body(port: int, pause: float) -> bytes:
    """A body announced as 10,000 bytes, sent 10 at a time every C{pause} s."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(
            b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000\r\n\r\n"
        )
        sock.settimeout(pause)
        answer = b""
        for _ in range(500):
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                sock.sendall(b" " * 10)
                continue
            if not chunk:
                return answer
            answer += chunk
        return answer


@pytest_twisted.ensureDeferred
async def test_a_body_slower_than_the_minimum_rate_is_cut(
    start_service: StartService,
) -> None:
    service = await start_service(header_timeout=0.3, min_body_rate=1000)
    answer = await deferToThread(trickle_body, port_of(service), 0.05)
    status, _, body = split(answer)
    assert status == 408
    assert body["field"] == "body"
    assert "1000 bytes" in body["detail"]


@pytest_twisted.ensureDeferred
async def test_an_idle_keep_alive_connection_is_not_a_slow_request(
    start_service: StartService,
) -> None:
    service = await start_service(header_timeout=0.2)

    def two_requests_with_a_pause() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", port_of(service)), timeout=15) as s:
            answers = []
            for _ in range(2):
                s.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
                answers.append(s.recv(65536))
                # idle for longer than the header timeout: the idle timeout rules
                s.settimeout(0.6)
                with pytest.raises(TimeoutError):
                    s.recv(1)
                s.settimeout(15)
            return answers

    answers = await deferToThread(two_requests_with_a_pause)
    assert [a.split()[1] for a in answers] == [b"200", b"200"]


# Too many connections -----------------------------------------------------------


def hold(port: int) -> socket.socket:
    """A connection that has been served once and stays open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    return sock


@pytest_twisted.ensureDeferred
async def test_past_max_connections_only_probes_are_served(
    start_service: StartService,
) -> None:
    from optiinfra.web.site import PROBE_RESERVE

    service = await start_service(max_connections=2)
    port = port_of(service)

    def crowd() -> dict[str, Any]:
        held = [hold(port), hold(port)]
        seen: dict[str, Any] = {}
        try:
            status, head, body = split(
                exchange(port, b"GET /agents HTTP/1.1\r\nHost: x\r\n\r\n")
            )
            seen["agents"] = (status, body, b"Retry-After: 1" in head)
            health = exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            seen["health"] = (split(health)[0], b"Connection: close" in health)
            metrics = exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            seen["metrics"] = metrics.decode()
            reserve = [
                socket.create_connection(("127.0.0.1", port), timeout=15)
                for _ in range(PROBE_RESERVE)
            ]
            held += reserve
            with socket.create_connection(("127.0.0.1", port), timeout=15) as late:
                answer = b""
                while chunk := late.recv(65536):  # answered without asking
                    answer += chunk
            seen["late"] = split(answer)[:3:2]
        finally:
            for sock in held:
                sock.close()
        return seen

    seen = await deferToThread(crowd)
    assert seen["agents"][0] == 503
    assert seen["agents"][1]["max_connections"] == 2
    assert seen["agents"][2]
    assert seen["health"] == (200, True)
    assert "200 OK" in seen["metrics"]
    assert (
        'optiinfra_http_refused_total{reason="too_many_connections"} 1.0'
        in (seen["metrics"])
    )
    # The two held and this one; refused ones may not have finished closing.
    [gauge] = re.findall(r"(?m)^optiinfra_http_open_connections (\S+)", seen["metrics"])
    assert float(gauge) >= 3
    assert seen["late"][0] == 503


# Settings -----------------------------------------------------------------------


def test_the_limits_are_settings() -> None:
    from optiinfra.settings import build_settings

    defaults = build_settings({})
    assert (defaults.header_timeout, defaults.min_body_rate) == (10.0, 1024)
    assert defaults.max_connections == 4096
    settings = build_settings(
        {"HEADER_TIMEOUT": "2.5", "MIN_BODY_RATE": "100", "MAX_CONNECTIONS": "10"}
    )
    assert (settings.header_timeout, settings.min_body_rate) == (2.5, 100)
    assert settings.max_connections == 10


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HEADER_TIMEOUT", "0"),
        ("HEADER_TIMEOUT", "soon"),
        ("MIN_BODY_RATE", "0"),
        ("MIN_BODY_RATE", "1k"),
        ("MAX_CONNECTIONS", "0"),
        ("MAX_CONNECTIONS", "many"),
    ],
)
def test_bad_limits_name_the_variable(variable: str, value: str) -> None:
    from optiinfra.settings import SettingsError, build_settings

    with pytest.raises(SettingsError) as raised:
        build_settings({variable: value})
    assert (raised.value.name, raised.value.value) == (variable, value)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (nested(100), "[0]"),  # a deep array as the whole body
        (b'"' + b"[" * 100 + b'"', "body"),  # brackets in a string are not depth
    ],
)
@pytest_twisted.ensureDeferred
async def test_bodies_that_are_not_objects(
    service: RunningService, raw: bytes, field: str
) -> None:
    code, body = await post(service, "/tasks", raw)
    assert (code, body["field"]) == (400, field)


@pytest_twisted.ensureDeferred
async def test_requests_arriving_in_pieces_within_the_deadlines_are_served(
    service: RunningService,
) -> None:
    def in_pieces() -> bytes:
        with socket.create_connection(("127.0.0.1", port_of(service)), timeout=15) as s:
            s.sendall(b"POST /tasks HTTP/1.1\r\nHost: x\r\n")
            s.sendall(b"Expect: 100-continue\r\nContent-Length: 2\r\n")
            s.sendall(b"Connection: close\r\n\r\n")
            continued = s.recv(65536)
            s.sendall(b"{")
            s.sendall(b"}")
            answer = continued
            while chunk := s.recv(65536):
                answer += chunk
            return answer

    answer = await deferToThread(in_pieces)
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    status, _, body = split(answer.partition(b"\r\n\r\n")[2])
    assert (status, body["field"]) == (400, "task_type")


def test_the_open_file_limit_makes_room_for_the_connections(logs: LogCapture) -> None:
    import os
    import resource

    from optiinfra.web.service import SPARE_FILES, raise_file_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = len(os.listdir("/proc/self/fd")) + 64
    if hard != resource.RLIM_INFINITY and hard < low + 2 * SPARE_FILES + 10:
        pytest.skip(f"the hard open-file limit ({hard}) leaves no room to test")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
        assert raise_file_limit(low) == (low, low + SPARE_FILES)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == low + SPARE_FILES
        assert raise_file_limit(10) == (low + SPARE_FILES,) * 2  # never lowered
        assert "open-file limit raised" in logs.messages()
        if hard != resource.RLIM_INFINITY:
            assert raise_file_limit(hard) == (low + SPARE_FILES, hard)
            [warning] = [e for e in logs.events if "below MAX" in str(e.get("event"))]
            assert warning["needed"] == hard + SPARE_FILES
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
