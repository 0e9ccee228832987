"""sd_notify: READY=1, WATCHDOG=1 and STOPPING=1 on a real AF_UNIX socket."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from typing import cast

import attrs
import orjson
import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock

from optiinfra.logs import render_event
from optiinfra.systemd import SystemdNotifier, notify, send

from .conftest import LogCapture


@attrs.define
class NotifySocket:
    """The systemd end: an AF_UNIX datagram socket, read without blocking."""

    sock: socket.socket
    address: str

    def received(self) -> list[str]:
        """Every datagram queued so far."""
        messages = []
        while True:
            try:
                messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return messages


def fields(message: str) -> dict[str, str]:
    """C{KEY=value} lines as a dict, as systemd reads them."""
    return dict(line.split("=", 1) for line in message.splitlines())


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    # A short directory: AF_UNIX paths are limited to 108 bytes, and pytest's
    # tmp_path can be longer than that.
    with (
        tempfile.TemporaryDirectory(prefix="sdnotify-") as directory,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        path = os.path.join(directory, "notify")
        sock.bind(path)
        sock.setblocking(False)
        yield NotifySocket(sock, path)


@pytest.fixture
def abstract_notify_socket() -> Iterator[NotifySocket]:
    name = f"optiinfra-test-{os.getpid()}-{os.urandom(4).hex()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)
        yield NotifySocket(sock, "@" + name)


@attrs.define
class FakePort:
    """Just enough of an IListeningPort for the notifier."""

    address: IPv4Address | IPv6Address = attrs.field(
        factory=lambda: IPv4Address("TCP", "127.0.0.1", 8080)
    )

    def getHost(self) -> IPv4Address | IPv6Address:
        return self.address


def listening_port(address: IPv4Address | IPv6Address | None = None) -> IListeningPort:
    return cast(IListeningPort, FakePort() if address is None else FakePort(address))


def notifier(
    socket_path: str | None, watchdog_usec: int | None = None
) -> tuple[SystemdNotifier, Clock, Deferred[IListeningPort]]:
    clock = Clock()
    listening: Deferred[IListeningPort] = Deferred()
    return (
        SystemdNotifier(clock, listening, socket_path, watchdog_usec),
        clock,
        listening,
    )


def test_ready_only_once_the_port_is_bound(notify_socket: NotifySocket) -> None:
    service, clock, listening = notifier(notify_socket.address, 2_000_000)
    service.startService()
    clock.advance(60)
    assert notify_socket.received() == []

    listening.callback(listening_port())

    [ready] = notify_socket.received()
    assert fields(ready) == {"READY": "1", "STATUS": "Serving on 127.0.0.1:8080"}
    service.stopService()


def test_ready_when_the_port_was_bound_before_the_service_started(
    notify_socket: NotifySocket,
) -> None:
    """twistd binds ports (privilegedStartService) before startService runs."""
    service, _, listening = notifier(notify_socket.address)
    listening.callback(listening_port(IPv6Address("TCP", "::", 8080)))
    assert notify_socket.received() == []

    service.startService()

    [ready] = notify_socket.received()
    assert fields(ready) == {"READY": "1", "STATUS": "Serving on [::]:8080"}
    service.stopService()


def test_abstract_socket_address(abstract_notify_socket: NotifySocket) -> None:
    service, _, listening = notifier(abstract_notify_socket.address)
    service.startService()
    listening.callback(listening_port())
    service.stopService()

    ready, stopping = abstract_notify_socket.received()
    assert fields(ready)["READY"] == "1"
    assert fields(stopping)["STOPPING"] == "1"


def test_watchdog_every_half_period_from_ready_on(notify_socket: NotifySocket) -> None:
    service, clock, listening = notifier(notify_socket.address, watchdog_usec=2_000_000)
    service.startService()
    clock.advance(5)
    assert notify_socket.received() == [], "no pings before READY=1"

    listening.callback(listening_port())
    assert [fields(m).get("READY") for m in notify_socket.received()] == ["1"]

    clock.advance(0.999)
    assert notify_socket.received() == []
    clock.advance(0.001)
    assert notify_socket.received() == ["WATCHDOG=1"]
    for _ in range(9):
        clock.advance(1)
    assert notify_socket.received() == ["WATCHDOG=1"] * 9
    service.stopService()


def test_no_watchdog_without_a_period(notify_socket: NotifySocket) -> None:
    service, clock, listening = notifier(notify_socket.address, watchdog_usec=None)
    service.startService()
    listening.callback(listening_port())
    notify_socket.received()

    assert clock.getDelayedCalls() == []
    service.stopService()


def test_stopping_on_stop_and_the_watchdog_ends(notify_socket: NotifySocket) -> None:
    service, clock, listening = notifier(notify_socket.address, watchdog_usec=2_000_000)
    service.startService()
    listening.callback(listening_port())
    clock.advance(1)
    assert len(notify_socket.received()) == 2  # READY=1, WATCHDOG=1

    service.stopService()

    [stopping] = notify_socket.received()
    assert fields(stopping) == {"STOPPING": "1", "STATUS": "Draining connections"}
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert notify_socket.received() == []


def test_no_ready_after_stopping(notify_socket: NotifySocket) -> None:
    """A port bound after the stop began must not make systemd think we are up."""
    service, clock, listening = notifier(notify_socket.address, watchdog_usec=2_000_000)
    service.startService()
    service.stopService()
    listening.callback(listening_port())
    clock.advance(10)

    assert [fields(m) for m in notify_socket.received()] == [
        {"STOPPING": "1", "STATUS": "Draining connections"}
    ]
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("socket_path", [None, ""])
def test_nothing_without_a_socket(
    socket_path: str | None, monkeypatch: pytest.MonkeyPatch, logs: LogCapture
) -> None:
    def no_sockets(*args: object, **kwargs: object) -> socket.socket:
        raise AssertionError("no socket may be opened when not run by systemd")

    service, clock, listening = notifier(socket_path, watchdog_usec=2_000_000)
    monkeypatch.setattr(socket, "socket", no_sockets)
    service.startService()
    listening.callback(listening_port())
    clock.advance(10)
    service.stopService()

    assert clock.getDelayedCalls() == []
    assert logs.named("optiinfra.systemd") == []


def test_a_send_failure_is_logged_not_raised(logs: LogCapture) -> None:
    with tempfile.TemporaryDirectory() as directory:
        missing = os.path.join(directory, "no-such-socket")
        service, _, listening = notifier(missing)
        service.startService()
        listening.callback(listening_port())  # must not raise
        service.stopService()

    ready, stopping = logs.named("optiinfra.systemd")
    assert ready["event"] == "could not notify systemd"
    assert ready["notification"].startswith("READY=1\n")
    assert ready["notify_socket"] == missing
    assert "No such file or directory" in ready["error"]
    assert stopping["notification"].startswith("STOPPING=1\n")
    # The rendered line keeps the notification (a field named "message" would
    # be swallowed by the line's own message).
    line = orjson.loads(render_event(ready))
    assert line["message"] == "could not notify systemd"
    assert line["notification"].startswith("READY=1")
    assert line["level"] == "warn"


def test_failing_pings_are_logged_once_until_they_work_again(
    notify_socket: NotifySocket, logs: LogCapture
) -> None:
    service, clock, listening = notifier(notify_socket.address, watchdog_usec=2_000_000)
    service.startService()
    listening.callback(listening_port())
    notify_socket.received()
    path = notify_socket.address
    notify_socket.sock.close()
    os.unlink(path)

    for _ in range(5):
        clock.advance(1)

    assert [e["event"] for e in logs.named("optiinfra.systemd")] == [
        "could not notify systemd"
    ]
    assert clock.getDelayedCalls() != [], "the watchdog keeps trying"

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.setblocking(False)
        clock.advance(1)
        assert sock.recv(4096) == b"WATCHDOG=1"
    assert [e["event"] for e in logs.named("optiinfra.systemd")] == [
        "could not notify systemd",
        "notifying systemd again",
    ]
    service.stopService()


def test_notify_reports_success(notify_socket: NotifySocket) -> None:
    assert notify(notify_socket.address, "STATUS=hello") is True
    assert notify_socket.received() == ["STATUS=hello"]


@pytest.mark.parametrize("address", ["relative/notify", "vsock:2:1234"])
def test_only_absolute_or_abstract_addresses(address: str, logs: LogCapture) -> None:
    with pytest.raises(OSError, match="unsupported NOTIFY_SOCKET"):
        send(address, "READY=1")
    assert notify(address, "READY=1") is False
    [warning] = logs.named("optiinfra.systemd")
    assert warning["notify_socket"] == address
