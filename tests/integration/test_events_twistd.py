"""The change feed in a real twistd: SIGTERM ends every stream, and no drain waits."""

from __future__ import annotations

import signal
import socket

import pytest

from .twistd import Twistd

pytestmark = pytest.mark.slow

CLEAN_EXITS = (0, -signal.SIGTERM, 128 + signal.SIGTERM)


def open_stream(port: int) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port), timeout=30)
    client.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
    head = b""
    while b"retry:" not in head:  # headers, then the first lines of the stream
        head += client.recv(4096)
    assert head.startswith(b"HTTP/1.1 200"), head
    return client


def read_to_the_end(client: socket.socket) -> bytes:
    chunks = []
    while chunk := client.recv(65536):
        chunks.append(chunk)
    client.close()
    return b"".join(chunks)


def test_sigterm_ends_streams_cleanly_and_the_drain_does_not_wait(
    processes: list[Twistd],
) -> None:
    # A drain that waited for the streams would outlast every timeout below.
    process = Twistd(
        "--port",
        "tcp:0:interface=127.0.0.1",
        env={"AUTH_DISABLED": "1", "DRAIN_TIMEOUT": "120"},
    )
    processes.append(process)
    port = process.port()
    streams = [open_stream(port) for _ in range(3)]
    process.signal(signal.SIGTERM)
    for stream in streams:
        # Each response ends with the last chunk: ended by the server, not cut.
        assert read_to_the_end(stream).endswith(b"0\r\n\r\n")
    assert process.wait(timeout=30) in CLEAN_EXITS
    ending = process.wait_for_message("ending change feed streams")
    assert ending["streams"] == 3
    process.wait_for_message("drained")
