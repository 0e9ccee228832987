"""
The HTTP server: a Site whose requests carry ids, are measured and access-logged,
have their bodies capped, and which can drain its connections on shutdown.

twisted.web has no graceful drain of its own.  L{OrchestratorSite} knows each open
channel; L{OrchestratorSite.drain} closes idle keep-alive connections at once, lets
busy ones finish their current request with C{Connection: close}, and aborts what
is still running when the timeout passes.  Because a channel class of our own
replaces twisted.web's protocol selector, this server speaks HTTP/1.1 only (HTTP/2
belongs to the proxy in front of it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from time import monotonic, time
from typing import Any, Final, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import IResource

from optiinfra.auth import Principal
from optiinfra.metrics import HttpMetrics
from optiinfra.timefmt import rfc3339_ms

#: A caller's X-Request-ID is kept only when it looks like a token.
_SANE_REQUEST_ID: Final = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_REQUEST_ID: Final = b"x-request-id"
_CLOSE: Final = [b"close"]

#: Status written to the access log for a request that never got its answer.
ABORTED: Final = 499

#: Where access records go: L{optiinfra.logs.AccessLog} in production.
AccessSink = Callable[[dict[str, Any]], None]


def new_request_id() -> str:
    return os.urandom(16).hex()


class OrchestratorRequest(server.Request):
    """A request with an id, a route template, a start time and a body cap."""

    site: OrchestratorSite
    channel: DrainingChannel

    #: The route template that matched, set by the router; bounds metric labels.
    route: str = "unmatched"
    #: Who presented a valid key, set by the guard; named in the access log.
    principal: Principal | None = None

    def __init__(self, channel: DrainingChannel, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        self.started = monotonic()
        self.request_id = ""
        self.aborted = False
        self._body_bytes = 0
        self._counted = False
        self._logged = False

    def _adopt_request_id(self) -> None:
        given = self.requestHeaders.getRawHeaders(_REQUEST_ID)
        if given and _SANE_REQUEST_ID.fullmatch(given[0]):
            self.request_id = given[0].decode("ascii")
        else:
            self.request_id = new_request_id()
        self.responseHeaders.setRawHeaders(_REQUEST_ID, [self.request_id.encode()])

    # Body cap -------------------------------------------------------------

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.channel.site.max_body_bytes:
            self._reject_too_large()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._logged:
            return
        self._body_bytes += len(data)
        if self._body_bytes > self.channel.site.max_body_bytes:
            self._reject_too_large()
            return
        super().handleContentChunk(data)

    def _reject_too_large(self) -> None:
        """
        Answer 413 at once and close the connection, without reading the body.

        The request has not been dispatched yet, so the answer is written
        straight to the transport; the rest of the body is never read.
        """
        site = self.channel.site
        # Not yet dispatched, so the request line is still the channel's.
        self.method = self.channel._command
        self.uri = self.channel._path
        self.path = self.uri.split(b"?", 1)[0]
        self._adopt_request_id()
        body = (
            b'{"error":"request body too large","field":"body","max_bytes":%d,'
            b'"request_id":"%s"}' % (site.max_body_bytes, self.request_id.encode())
        )
        self.code = 413
        self.sentLength = len(body)
        self.channel.write(
            b"HTTP/1.1 413 Payload Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n"
            b"X-Request-ID: %s\r\n"
            b"Connection: close\r\n\r\n%s" % (len(body), self.request_id.encode(), body)
        )
        site.log(self)
        self.channel.persistent = False
        self.channel.loseConnection()

    # Life cycle -----------------------------------------------------------

    def process(self) -> None:
        self._adopt_request_id()
        self._counted = True
        self.channel.site.in_flight += 1
        if self.channel.draining:
            self.responseHeaders.setRawHeaders(b"connection", _CLOSE)
        super().process()

    def connectionLost(self, reason: Failure) -> None:
        if not self.finished and not self._logged:
            self.aborted = True
            if not self.startedWriting:
                self.code = ABORTED
            self.channel.site.log(self)
        super().connectionLost(reason)


class DrainingChannel(http.HTTPChannel):
    """An HTTP/1.1 channel that its site can find, and close, when draining."""

    site: OrchestratorSite
    draining = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channel_opened(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self.site.channel_closed(self)

    def allHeadersReceived(self) -> None:
        super().allHeadersReceived()
        if self.draining:
            self.persistent = False

    @property
    def idle(self) -> bool:
        """No request is being received or answered on this connection."""
        return not self.requests

    def drain(self) -> None:
        """Finish what is in progress, then close; close now if idle."""
        self.draining = True
        if self.idle:
            self.loseConnection()
            return
        self.persistent = False
        for request in self.requests:
            if not request.startedWriting:
                request.responseHeaders.setRawHeaders(b"connection", _CLOSE)


class OrchestratorSite(server.Site):
    """
    A Site that writes one structured access line per request, counts it in the
    metrics, and can drain.
    """

    requestFactory = OrchestratorRequest
    protocol = DrainingChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: IResource,
        *,
        clock: IReactorTime,
        metrics: HttpMetrics,
        access_log: AccessSink,
        max_body_bytes: int,
        idle_timeout: float = 60.0,
    ) -> None:
        # The API takes JSON only.  twisted.web would otherwise parse the
        # Content-Type of every POST with the email package, looking for a form:
        # about a seventh of a heartbeat's cost, measured with py-spy.
        super().__init__(resource, timeout=idle_timeout, parsePOSTFormSubmission=False)
        self.noisy = False
        self.clock = clock
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self._access_log = access_log
        self._channels: set[DrainingChannel] = set()
        self._drained: Deferred[None] | None = None
        self._deadline: IDelayedCall | None = None
        self.draining = False
        #: Requests being processed; the metrics read it when scraped.
        self.in_flight = 0
        metrics.in_flight = lambda: self.in_flight

    # Connections ----------------------------------------------------------

    def channel_opened(self, channel: DrainingChannel) -> None:
        if self.draining:
            # Accepted just before the port closed: serve nothing new.
            channel.draining = True
        self._channels.add(channel)

    def channel_closed(self, channel: DrainingChannel) -> None:
        self._channels.discard(channel)
        if self.draining and not self._channels and self._drained is not None:
            drained, self._drained = self._drained, None
            if self._deadline is not None and self._deadline.active():
                self._deadline.cancel()
            drained.callback(None)

    @property
    def open_connections(self) -> int:
        return len(self._channels)

    def drain(self, timeout: float) -> Deferred[None]:
        """
        Close idle connections now, let busy ones finish, abort them after
        C{timeout} seconds.  Fires when no connection is left.

        Stop listening first, or new connections keep arriving.
        """
        self.draining = True
        for channel in list(self._channels):
            channel.drain()
        if not self._channels:
            return succeed(None)
        self._drained = Deferred()
        self._deadline = self.clock.callLater(timeout, self._abort_stragglers)
        return self._drained

    def _abort_stragglers(self) -> None:
        self._deadline = None
        for channel in list(self._channels):
            for request in channel.requests:
                request.aborted = True
            cast(ITCPTransport, channel.transport).abortConnection()

    # Access log and metrics -----------------------------------------------

    def log(self, request: OrchestratorRequest) -> None:  # type: ignore[override]
        """Called by twisted.web when a request finishes (and by us when it dies)."""
        if request._logged:
            return
        request._logged = True
        if request._counted:
            self.in_flight -= 1
        seconds = monotonic() - request.started
        method = request.method.decode("latin-1")
        status = request.code
        self.metrics.observe(method, request.route, status, seconds)
        path = request.path.decode("latin-1", "replace")
        client = request.getClientAddress()
        record: dict[str, Any] = {
            "timestamp": rfc3339_ms(time()),
            "level": "warn" if request.aborted else "info",
            "logger": "optiinfra.access",
            "message": f"{method} {path} {status}",
            "method": method,
            "path": path,
            "route": request.route,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "bytes": request.sentLength,
            "request_id": request.request_id,
            "client": getattr(client, "host", None) or str(client),
        }
        if request.principal is not None:
            record["key"] = request.principal.name  # its name, never the key
        if request.aborted:
            record["aborted"] = True
        self._access_log(record)
