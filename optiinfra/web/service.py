"""The listening port as a Twisted service that drains on stop."""

from __future__ import annotations

import resource

import structlog
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.python.failure import Failure

from optiinfra.readiness import Readiness
from optiinfra.web.site import PROBE_RESERVE, OrchestratorSite

_log = structlog.get_logger("optiinfra.server")


#: Descriptors kept for everything but clients: the store, agents, logs.
SPARE_FILES = 256


def raise_file_limit(connections: int) -> tuple[int, int]:
    """
    Make room for C{connections} clients under the open-file limit: raise the
    soft limit as far as the hard one allows (as Go's runtime does), and warn
    when even that is too low, since accepting then fails before the
    connection cap is reached.  The limits before and after.
    """
    needed = connections + SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    raised = soft
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        _log.info("open-file limit raised", previous=soft, limit=raised)
    if raised != resource.RLIM_INFINITY and raised < needed:
        _log.warn(
            "open-file limit below MAX_CONNECTIONS: connections past it wait"
            " unaccepted instead of being answered",
            limit=raised,
            needed=needed,
        )
    return soft, raised


def describe_port(port: IListeningPort) -> tuple[str, int | None]:
    """A printable address for C{port}, and its number when it has one."""
    address = port.getHost()
    number = getattr(address, "port", None)
    host = getattr(address, "host", None)
    if number is not None:
        return f"{type(address).__name__.lower()}:{host}:{number}", number
    return str(getattr(address, "name", address)), None


class HTTPService(Service):
    """
    Listen on C{endpoint} with C{site}; on stop, drain.

    Listening happens in C{privilegedStartService}, and a failure there (port in
    use, permission denied) is raised at once so that twistd exits non-zero
    instead of running without a socket.
    """

    name = "http"

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        site: OrchestratorSite,
        readiness: Readiness,
        drain_timeout: float,
    ) -> None:
        self._endpoint = endpoint
        self._site = site
        self._readiness = readiness
        self._drain_timeout = drain_timeout
        self._port: IListeningPort | None = None
        self._listening: Deferred[IListeningPort] | None = None
        self._waiters: list[Deferred[IListeningPort]] = []

    def when_listening(self) -> Deferred[IListeningPort]:
        """A Deferred that fires with the listening port once it is bound."""
        waiter: Deferred[IListeningPort] = Deferred()
        if self._port is not None:
            waiter.callback(self._port)
        else:
            self._waiters.append(waiter)
        return waiter

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self._listening is not None:
            return
        raise_file_limit(self._site.max_connections + PROBE_RESERVE)
        self._listening = self._endpoint.listen(self._site)
        failures: list[Failure] = []
        self._listening.addCallbacks(self._bound, failures.append)
        if failures:
            _log.error(
                "could not listen",
                endpoint=str(self._endpoint),
                error=failures[0].getErrorMessage(),
            )
            failures[0].raiseException()

    def startService(self) -> None:
        super().startService()
        self.privilegedStartService()

    def _bound(self, port: IListeningPort) -> IListeningPort:
        self._port = port
        address, number = describe_port(port)
        _log.info("Server starting", port=number, address=address)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(port)
        return port

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return ensureDeferred(self._drain())

    async def _drain(self) -> None:
        self._readiness.start_draining()
        open_connections = self._site.open_connections
        _log.info(
            "draining",
            open_connections=open_connections,
            drain_timeout_seconds=self._drain_timeout,
        )
        if self._port is not None:
            await maybeDeferred(self._port.stopListening)
        await self._site.drain(self._drain_timeout)
        _log.info("drained")
