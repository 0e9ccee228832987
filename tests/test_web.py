"""The HTTP surface every capability shares, over real sockets."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
import pytest_twisted
from klein import Klein
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.iweb import IRequest

from optiinfra.web.app import route
from optiinfra.web.render import render_json

from .client import raw_http
from .conftest import LogCapture, RunningService, StartService

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
GO_DURATION = re.compile(r"(\d+h)?(\d+m)?\d+s")


@pytest_twisted.ensureDeferred
async def test_health_matches_the_contract(service: RunningService) -> None:
    response = await service.get("/health")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    body = await response.json()
    assert set(body) == {"status", "timestamp", "version", "uptime"}
    assert body["status"] == "healthy"
    assert body["version"] == "0.1.0"
    assert RFC3339_UTC.fullmatch(body["timestamp"])
    assert GO_DURATION.fullmatch(body["uptime"])
    assert response.length == len(orjson.dumps(body))  # not chunked


@pytest_twisted.ensureDeferred
async def test_head_answers_without_a_body(service: RunningService) -> None:
    response = await service.request("HEAD", "/health")
    assert response.code == 200
    assert await response.content() == b""


@pytest_twisted.ensureDeferred
async def test_index(service: RunningService) -> None:
    response = await service.get("/")
    assert await response.json() == {
        "service": "OptiInfra Orchestrator",
        "version": "0.1.0",
        "status": "running",
    }


@pytest_twisted.ensureDeferred
async def test_livez_and_readyz_until_draining(service: RunningService) -> None:
    assert (await service.get("/livez")).code == 200
    ready = await service.get("/readyz")
    assert (ready.code, await ready.json()) == (200, {"status": "ready"})
    service.http._readiness.start_draining()
    not_ready = await service.get("/readyz")
    assert not_ready.code == 503
    assert (await not_ready.json())["reasons"] == {"server": "draining"}


@pytest_twisted.ensureDeferred
async def test_unknown_path_is_a_json_404(service: RunningService) -> None:
    response = await service.get("/no/such/thing")
    assert response.code == 404
    body = await response.json()
    assert body["error"] == "not found"
    assert body["request_id"] == response.headers.getRawHeaders("x-request-id")[0]


@pytest_twisted.ensureDeferred
async def test_wrong_method_is_a_405_with_allow(service: RunningService) -> None:
    response = await service.request("DELETE", "/health")
    assert response.code == 405
    assert response.headers.getRawHeaders("allow") == ["GET, HEAD"]
    assert (await response.json())["error"] == "method not allowed"


def failing_routes(app: Klein) -> None:
    @route(app, "/boom", ("GET",))
    def boom(request: IRequest) -> bytes:
        raise RuntimeError("secret detail")


@pytest_twisted.ensureDeferred
async def test_unhandled_error_is_a_json_500_without_traceback(
    start_service: StartService, logs: LogCapture
) -> None:
    service = await start_service(mounts=[failing_routes])
    response = await service.get("/boom", headers={"X-Request-ID": "trace-me-1"})
    assert response.code == 500
    text = await response.text()
    assert "secret detail" not in text
    assert "Traceback" not in text
    assert await response.json() == {
        "error": "internal error",
        "request_id": "trace-me-1",
    }
    [failure] = [e for e in logs.events if e.get("event", "").startswith("unhandled")]
    assert failure["request_id"] == "trace-me-1"
    assert "RuntimeError: secret detail" in failure["exception"]
    [access] = logs.named("optiinfra.access")
    assert (access["status"], access["route"]) == (500, "/boom")


@pytest_twisted.ensureDeferred
async def test_request_id_is_kept_when_sane_and_replaced_otherwise(
    service: RunningService, logs: LogCapture
) -> None:
    kept = await service.get("/health", headers={"X-Request-ID": "abc-123_x.y:z"})
    assert kept.headers.getRawHeaders("x-request-id") == ["abc-123_x.y:z"]
    for insane in ("a" * 200, "bad id", "<script>", "-leading-dash"):
        replaced = await service.get("/health", headers={"X-Request-ID": insane})
        [given] = replaced.headers.getRawHeaders("x-request-id")
        assert given != insane
        assert re.fullmatch(r"[0-9a-f]{32}", given)
    ids = [e["request_id"] for e in logs.named("optiinfra.access")]
    assert ids[0] == "abc-123_x.y:z"
    assert len(set(ids)) == len(ids)


@pytest_twisted.ensureDeferred
async def test_access_line_has_the_fields_operators_need(
    service: RunningService, logs: LogCapture
) -> None:
    response = await service.get("/health")
    await response.content()
    [line] = logs.named("optiinfra.access")
    assert line["method"] == "GET"
    assert line["path"] == "/health"
    assert line["route"] == "/health"
    assert line["status"] == 200
    assert line["bytes"] == response.length
    assert line["client"] == "127.0.0.1"
    assert line["duration_ms"] >= 0
    assert line["request_id"] == response.headers.getRawHeaders("x-request-id")[0]


@pytest_twisted.ensureDeferred
async def test_metrics_count_requests_by_route_and_status(
    service: RunningService,
) -> None:
    for path in ("/health", "/health", "/missing/1", "/missing/2"):
        await (await service.get(path)).content()
    response = await service.get("/metrics")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain")
    text = await response.text()
    assert (
        'optiinfra_http_requests_total{method="GET",route="/health",status="200"} 2.0'
        in text
    )
    # Unknown paths share one label value: no cardinality explosion.
    assert (
        'optiinfra_http_requests_total{method="GET",route="unmatched",status="404"} 2.0'
        in text
    )
    assert "optiinfra_http_request_duration_seconds_bucket" in text
    # The /metrics request itself is in flight while it is rendered.
    assert "optiinfra_http_requests_in_flight 1.0" in text
    assert "process_resident_memory_bytes" in text


@pytest_twisted.ensureDeferred
async def test_oversized_body_is_refused_with_413(start_service: StartService) -> None:
    service = await start_service(max_body_bytes=64)
    port = int(service.url.rsplit(":", 1)[1])
    answer = await deferToThreadRaw(
        port,
        b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n" + b"x" * 100,
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert b"Connection: close" in head
    assert b'"field":"body"' in body
    assert b'"max_bytes":64' in body


@pytest_twisted.ensureDeferred
async def test_oversized_chunked_body_is_refused_with_413(
    start_service: StartService, logs: LogCapture
) -> None:
    service = await start_service(max_body_bytes=64)
    port = int(service.url.rsplit(":", 1)[1])
    chunk = b"40\r\n" + b"y" * 64 + b"\r\n"
    answer = await deferToThreadRaw(
        port,
        b"POST /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunk * 3,
    )
    assert answer.startswith(b"HTTP/1.1 413")
    [line] = logs.named("optiinfra.access")
    assert line["status"] == 413


@pytest_twisted.ensureDeferred
async def test_body_within_the_cap_is_served(start_service: StartService) -> None:
    service = await start_service(max_body_bytes=64)
    response = await service.request("POST", "/health", data=b"x" * 64)
    assert response.code == 405  # read in full, then routed


def deferToThreadRaw(port: int, data: bytes) -> Deferred[bytes]:
    from twisted.internet.threads import deferToThread

    return deferToThread(raw_http, port, data)


def slow_routes(gate: list[Deferred[None]]) -> Any:
    def mount(app: Klein) -> None:
        @route(app, "/slow", ("GET",))
        async def slow(request: IRequest) -> bytes:
            waiting: Deferred[None] = Deferred()
            gate.append(waiting)
            await waiting
            return render_json(request, {"done": True})

    return mount


@pytest_twisted.ensureDeferred
async def test_drain_lets_in_flight_requests_finish(
    start_service: StartService, logs: LogCapture
) -> None:
    gate: list[Deferred[None]] = []
    service = await start_service(mounts=[slow_routes(gate)], drain_timeout=5.0)
    idle = await service.get("/health")  # leaves an idle keep-alive connection
    await idle.content()
    in_flight = service.get("/slow")
    while not gate:
        await deferLater(reactor, 0.01)
    stopping = service.top.stopService()
    assert not service.http._readiness.ready
    await deferLater(reactor, 0.05)
    assert service.http._site.open_connections == 1  # the idle one was closed
    gate[0].callback(None)
    response = await in_flight
    assert await response.json() == {"done": True}
    await stopping
    statuses = [(e["path"], e["status"]) for e in logs.named("optiinfra.access")]
    assert ("/slow", 200) in statuses


@pytest_twisted.ensureDeferred
async def test_drain_aborts_requests_past_the_timeout(
    start_service: StartService, logs: LogCapture
) -> None:
    gate: list[Deferred[None]] = []
    service = await start_service(mounts=[slow_routes(gate)], drain_timeout=0.2)
    in_flight = service.get("/slow")
    while not gate:
        await deferLater(reactor, 0.01)
    await service.top.stopService()
    with pytest.raises(Exception):  # noqa: B017,PT011 - any connection failure
        await in_flight
    [line] = logs.named("optiinfra.access")
    assert line["aborted"] is True
    assert line["status"] == 499


@pytest_twisted.ensureDeferred
async def test_server_listens_on_an_endpoint_string(
    start_service: StartService,
) -> None:
    service = await start_service(port="tcp:0:interface=127.0.0.1:backlog=1024")
    assert (await service.get("/livez")).code == 200
