"""
The tests' one way to talk HTTP to the service: C{call} for a service started
in the test's reactor, C{call_port} for a C{twistd} subprocess (blocking, from
the test's own thread), and C{raw_http} for bytes no client would send.
"""

from __future__ import annotations

import http.client
import socket
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from .conftest import RunningService


async def call(
    service: RunningService,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    **kw: Any,
) -> tuple[int, Any]:
    """C{method path} with C{body} as JSON; the status and the JSON answer."""
    response = await service.request(
        method, path, json=body, headers=headers or {}, **kw
    )
    return response.code, await response.json()


def call_port(
    port: int, method: str, path: str, body: Any = None, timeout: float = 10.0
) -> tuple[int, Any, dict[str, str]]:
    """
    C{call} for a service on C{port} of another process: the status, the JSON
    answer and the headers (names in lower case).
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = orjson.dumps(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if data else {}
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        return (
            response.status,
            orjson.loads(response.read()),
            {k.lower(): v for k, v in response.getheaders()},
        )
    finally:
        connection.close()


def raw_http(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes and read until the server closes (for malformed requests)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)
