"""
Slow and greedy clients, and what Twisted itself refuses, with raw sockets
against a real twistd (tests/test_http_edges.py covers the same in process).
"""

from __future__ import annotations

import socket

import orjson
import pytest

from optiinfra.web.site import PROBE_RESERVE

from ..test_http_edges import exchange, hold, split, trickle_body, trickle_headers
from .twistd import Twistd

LOCAL = "tcp:0:interface=127.0.0.1"
CLOSE_WITH_BODY = b"Connection: close\r\nContent-Length: 2\r\n\r\n{}"

pytestmark = pytest.mark.slow


def test_slow_headers_and_bodies_are_cut_with_a_json_408(
    processes: list[Twistd],
) -> None:
    process = Twistd(
        "--port", LOCAL, env={"HEADER_TIMEOUT": "1", "MIN_BODY_RATE": "1000"}
    )
    processes.append(process)
    port = process.port()
    # One header line every 0.2 s used to restart the 60 s idle timeout forever.
    status, head, body = split(trickle_headers(port, 0.2))
    assert (status, body["field"]) == (408, "headers")
    assert b"Content-Type: application/json" in head
    status, _, body = split(trickle_body(port, 0.1))
    assert (status, body["field"]) == (408, "body")
    access = process.wait_for(lambda line: line.get("status") == 408)
    assert access["logger"] == "optiinfra.access"
    metrics = exchange(
        port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    ).decode()
    assert 'optiinfra_http_refused_total{reason="header_timeout"} 1.0' in metrics
    assert 'optiinfra_http_refused_total{reason="body_too_slow"} 1.0' in metrics


def test_past_max_connections_probes_answer_and_the_rest_get_a_503(
    processes: list[Twistd],
) -> None:
    process = Twistd("--port", LOCAL, env={"MAX_CONNECTIONS": "3"})
    processes.append(process)
    port = process.port()
    held = [hold(port) for _ in range(3)]
    try:
        status, head, body = split(
            exchange(
                port,
                b"POST /agents/register HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: 2\r\n\r\n{}",
            )
        )
        assert (status, body["max_connections"]) == (503, 3)
        assert b"Retry-After: 1" in head
        for path in (b"/health", b"/metrics", b"/readyz", b"/livez"):
            answer = exchange(port, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            assert b"Connection: close" in answer.partition(b"\r\n\r\n")[0]
        metrics = exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (
            b'optiinfra_http_refused_total{reason="too_many_connections"} 1.0'
            in metrics
        )
        held += [
            socket.create_connection(("127.0.0.1", port), timeout=10)
            for _ in range(PROBE_RESERVE)
        ]
        # Past the reserve too: the 503 comes before the request is sent.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as late:
            answer = b""
            while chunk := late.recv(65536):
                answer += chunk
        assert split(answer)[0] == 503
    finally:
        for sock in held:
            sock.close()
    # Once the crowd has gone, everything is served again.
    for _ in range(200):
        answer = exchange(
            port, b"GET /agents HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        if answer.startswith(b"HTTP/1.1 200"):
            break
    assert orjson.loads(answer.partition(b"\r\n\r\n")[2])["count"] == 0


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (b"GET /" + b"a" * 17000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 17000 + b"\r\n\r\n", 431),
        (b"NOT A REQUEST LINE AT ALL\r\n\r\n", 400),
        (b"POST //agents//register HTTP/1.1\r\n" + CLOSE_WITH_BODY, 404),
        (b"POST //api/v1/agents/register HTTP/1.1\r\n" + CLOSE_WITH_BODY, 404),
    ],
)
def test_refusals_are_json(
    processes: list[Twistd], request_bytes: bytes, code: int
) -> None:
    process = Twistd("--port", LOCAL)
    processes.append(process)
    # What follows a refused request is never answered.
    answer = exchange(process.port(), request_bytes + b"GET /health HTTP/1.1\r\n\r\n")
    status, head, body = split(answer)
    assert status == code
    assert b"Content-Type: application/json" in head
    assert body["error"]
    assert b"Location" not in head
