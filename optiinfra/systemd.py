"""
The sd_notify protocol: tell systemd when the service is ready, alive, stopping.

One datagram per message to the AF_UNIX socket named by C{NOTIFY_SOCKET}; an
address starting with C{@} is in the abstract namespace.  Unmaintained client
libraries are not worth a dependency for this.

systemd only arms the watchdog once the service is ready and disarms it as soon
as the service stops, so pings run from C{READY=1} to C{STOPPING=1}.
"""

from __future__ import annotations

import errno
import socket

import structlog
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

_log = structlog.get_logger("optiinfra.systemd")

WATCHDOG = "WATCHDOG=1"
STOPPING = "STOPPING=1\nSTATUS=Draining connections"


def send(socket_path: str, message: str) -> None:
    """
    Send C{message} to the notification socket C{socket_path}.

    Like C{sd_notify(3)}, only an absolute path or an abstract C{@name} is
    accepted.

    @raise OSError: when it cannot be sent.
    """
    if socket_path.startswith("@"):
        address = "\0" + socket_path[1:]
    elif socket_path.startswith("/"):
        address = socket_path
    else:
        raise OSError(errno.EAFNOSUPPORT, "unsupported NOTIFY_SOCKET address")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        # The reactor thread must never wait on systemd: a full queue is an error.
        sock.setblocking(False)
        sock.sendto(message.encode(), address)


def notify(socket_path: str, message: str) -> bool:
    """Send C{message} to systemd; False (and logged) when it cannot be sent."""
    try:
        send(socket_path, message)
    except OSError as error:
        _log.warn(
            "could not notify systemd",
            # Not "message": that key is the log line's own text.
            notification=message,
            notify_socket=socket_path,
            error=str(error),
        )
        return False
    return True


def _describe(port: IListeningPort) -> str:
    address = port.getHost()
    host = getattr(address, "host", None)
    number = getattr(address, "port", None)
    if host is None or number is None:
        return str(getattr(address, "name", address))
    return f"[{host}]:{number}" if ":" in host else f"{host}:{number}"


class SystemdNotifier(Service):
    """
    C{READY=1} once the port is bound, C{WATCHDOG=1} every half watchdog period
    from then on, C{STOPPING=1} when stopping.  Does nothing when not run by
    systemd (no C{socket_path}).
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
        self._waiting = False
        #: A failed ping is logged once, not every period until it works again.
        self._pings_failing = False

    def startService(self) -> None:
        super().startService()
        if not self._socket_path or self._waiting:
            return
        self._waiting = True
        self._listening.addCallbacks(self._ready, self._never_listened)

    def _ready(self, port: IListeningPort) -> IListeningPort:
        self._waiting = False
        if not self.running or not self._socket_path:
            return port
        notify(self._socket_path, f"READY=1\nSTATUS=Serving on {_describe(port)}")
        if self._watchdog_usec:
            self._watchdog = LoopingCall(self._ping, self._socket_path)
            self._watchdog.clock = self._clock
            self._watchdog.start(self._watchdog_usec / 2_000_000, now=False).addErrback(
                self._watchdog_died
            )
        return port

    def _never_listened(self, failure: Failure) -> None:
        self._waiting = False
        _log.error(
            "not telling systemd READY=1: the port never listened",
            error=failure.getErrorMessage(),
        )

    def _ping(self, socket_path: str) -> None:
        try:
            send(socket_path, WATCHDOG)
        except OSError as error:
            if not self._pings_failing:
                _log.warn(
                    "could not notify systemd",
                    notification=WATCHDOG,
                    notify_socket=socket_path,
                    error=str(error),
                )
            self._pings_failing = True
        else:
            if self._pings_failing:
                _log.info("notifying systemd again", notification=WATCHDOG)
            self._pings_failing = False

    def _watchdog_died(self, failure: Failure) -> None:
        _log.error(
            "systemd watchdog pings stopped",
            error=failure.getErrorMessage(),
            exception=failure.getTraceback(),
        )

    def stopService(self) -> None:
        super().stopService()
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None
        if self._socket_path:
            notify(self._socket_path, STOPPING)
