"""
The sd_notify protocol: tell systemd when the service is ready, alive, stopping.

One datagram per message to the AF_UNIX socket named by C{NOTIFY_SOCKET}; an
address starting with C{@} is in the abstract namespace.  Unmaintained client
libraries are not worth a dependency for this.
"""

from __future__ import annotations

import os
import socket

import structlog
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.task import LoopingCall

_log = structlog.get_logger("optiinfra.systemd")


def notify(socket_path: str, message: str) -> bool:
    """Send C{message} to systemd; False (and logged) when it cannot be sent."""
    address = "\0" + socket_path[1:] if socket_path.startswith("@") else socket_path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto(message.encode(), address)
    except OSError as error:
        _log.warn("could not notify systemd", message=message, error=str(error))
        return False
    return True


class SystemdNotifier(Service):
    """
    C{READY=1} once the port is bound, C{WATCHDOG=1} every half watchdog period,
    C{STOPPING=1} when stopping.  Does nothing when not run by systemd.
    """

    name = "systemd"

    def __init__(
        self,
        clock: IReactorTime,
        listening: Deferred[IListeningPort],
        socket_path: str | None,
        watchdog_usec: int | None,
    ) -> None:
        self._clock = clock
        self._listening = listening
        self._socket_path = socket_path
        self._watchdog_usec = watchdog_usec
        self._watchdog: LoopingCall | None = None

    def _send(self, message: str) -> None:
        if self._socket_path:
            notify(self._socket_path, message)

    def startService(self) -> None:
        super().startService()
        if not self._socket_path:
            return
        self._listening.addCallback(self._ready)
        if self._watchdog_usec:
            self._watchdog = LoopingCall(self._send, "WATCHDOG=1")
            self._watchdog.clock = self._clock
            self._watchdog.start(self._watchdog_usec / 2_000_000, now=True)

    def _ready(self, port: IListeningPort) -> IListeningPort:
        self._send(
            f"READY=1\nSTATUS=Serving on {port.getHost()}\nMAINPID={os.getpid()}"
        )
        return port

    def stopService(self) -> None:
        super().stopService()
        self._send("STOPPING=1\nSTATUS=Draining connections")
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
