"""
The HTTP server: a Site whose requests carry ids, are measured and access-logged,
have their bodies capped, and which can drain its connections on shutdown.

twisted.web has no graceful drain of its own.  L{OrchestratorSite} knows each open
channel; L{OrchestratorSite.drain} closes idle keep-alive connections at once, lets
busy ones finish their current request with C{Connection: close}, and aborts what
is still running when the timeout passes.  Because a channel class of our own
replaces twisted.web's protocol selector, this server speaks HTTP/1.1 only (HTTP/2
belongs to the proxy in front of it).

The channel also guards the edges of HTTP, answering in JSON wherever HTTP still
allows an answer: a request's headers must all arrive within C{header_timeout}
seconds of its first byte, and its body at C{min_body_rate} bytes a second once
that much time has passed again (408); Twisted's own refusals of a malformed or
oversized request line or header (400, 414, 431) are JSON too; and past
C{max_connections} open connections, a new one may only ask for a probe or the
metrics (once, then it is closed), while any other request gets a 503.  Past
C{max_connections + PROBE_RESERVE}, a new connection gets the 503 at once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from time import monotonic, time
from typing import Any, Final, cast

import orjson
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IReactorTime,
    ITCPTransport,
)
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

#: Connections let in beyond C{max_connections}, for probes and metrics only.
PROBE_RESERVE: Final = 16
#: What a connection beyond C{max_connections} may still ask for.
PROBE_PATHS: Final = frozenset({b"/health", b"/livez", b"/readyz", b"/metrics"})
_PROBE_METHODS: Final = frozenset({b"GET", b"HEAD"})
#: Seconds a refused client gets to read the answer before its connection is cut.
LINGER: Final = 2.0

_REASONS: Final = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}

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
        self._body_bytes += len(data)
        if self._body_bytes > self.channel.site.max_body_bytes:
            self._reject_too_large()
            return
        super().handleContentChunk(data)

    def _reject_too_large(self) -> None:
        """Answer 413 at once and close the connection, without reading the body."""
        self.channel.refuse(
            413,
            "body_too_large",
            {
                "error": "request body too large",
                "field": "body",
                "max_bytes": self.channel.site.max_body_bytes,
            },
        )

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


def json_answer(
    code: int, payload: dict[str, Any], request_id: str, extra: bytes = b""
) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, for refusals."""
    payload["request_id"] = request_id
    body = orjson.dumps(payload)
    return (
        b"HTTP/1.1 %d %s\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n"
        b"X-Request-ID: %s\r\n%s"
        b"Connection: close\r\n\r\n%s"
        % (code, _REASONS[code], len(body), request_id.encode(), extra, body)
    )


class DrainingChannel(http.HTTPChannel):
    """
    An HTTP/1.1 channel that its site can find, and close, when draining; that
    times out slow headers and bodies; and that refuses in JSON.
    """

    site: OrchestratorSite
    draining = False
    #: Let in beyond C{max_connections}: one probe or metrics request, no more.
    probe_only = False
    #: Answered and closing: whatever else arrives is read and dropped.
    refused = False
    _header_clock: IDelayedCall | None = None
    _body_clock: IDelayedCall | None = None
    _linger: IDelayedCall | None = None
    _body_started = 0.0
    _body_received = 0
    _at_request_line = True

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channel_opened(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for call in (self._header_clock, self._body_clock, self._linger):
            if call is not None and call.active():
                call.cancel()
        self._header_clock = self._body_clock = self._linger = None
        try:
            super().connectionLost(reason)
        finally:
            self.site.channel_closed(self)

    # Parsing, watched -----------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        super().dataReceived(data)
        self._watch()

    def lineReceived(self, line: bytes) -> None:
        if self.refused:
            return
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._too_long("header_too_large")
            return
        self._at_request_line = not self.requests
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._at_request_line = not self.requests
        self._too_long(
            "request_line_too_long" if self._at_request_line else "header_too_large"
        )

    def _too_long(self, reason: str) -> None:
        limit = self.totalHeadersSize
        if reason == "request_line_too_long":
            self.refuse(
                414,
                reason,
                {
                    "error": "request line too long",
                    "detail": f"the request line must fit in {limit} bytes",
                },
            )
        else:
            self.refuse(
                431,
                reason,
                {
                    "error": "request headers too large",
                    "detail": f"the request line and headers must fit in {limit} bytes",
                },
            )

    def _respondToBadRequestAndDisconnect(self) -> None:
        """Twisted's refusal of what it cannot parse, in JSON."""
        if self._at_request_line:
            part = "request line"
        else:
            part = "request headers" if self.line_mode else "request body"
        self.refuse(
            400, "bad_request", {"error": "bad request", "detail": f"malformed {part}"}
        )

    def rawDataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        if not self._handlingRequest:
            self._body_received += len(data)
        super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        if self.probe_only and not (
            self._command in _PROBE_METHODS
            and self._path.split(b"?", 1)[0] in PROBE_PATHS
        ):
            self.refuse_crowded()
            return
        self._body_started = self.site.clock.seconds()
        self._body_received = 0
        super().allHeadersReceived()
        if self.probe_only:
            self.persistent = False
            self.requests[-1].responseHeaders.setRawHeaders(b"connection", _CLOSE)
        elif self.draining:
            self.persistent = False

    def allContentReceived(self) -> None:
        if not self.refused:
            super().allContentReceived()

    def _send100Continue(self) -> None:
        if not self.refused:  # a body refused for its length is not invited
            super()._send100Continue()

    def requestDone(self, request: server.Request) -> None:
        super().requestDone(request)
        self._watch()

    # Deadlines ------------------------------------------------------------

    def _watch(self) -> None:
        """
        After the parser moved: start the clock of whatever is now awaited
        from the client (headers, or a body), stop the others.

        Checked after each read rather than per line, so a request arriving
        in one piece (nearly all of them) never starts a clock.
        """
        header = body = False
        if not (self._handlingRequest or self.refused):
            if self.line_mode:
                header = bool(self.requests or self._buffer)
            else:
                body = True
        if header:
            if self._header_clock is None:
                self._header_clock = self.site.clock.callLater(
                    self.site.header_timeout, self._headers_too_slow
                )
        elif self._header_clock is not None:
            self._header_clock.cancel()
            self._header_clock = None
        if body:
            if self._body_clock is None:
                self._body_clock = self.site.clock.callLater(
                    self._body_due(), self._check_body_rate
                )
        elif self._body_clock is not None:
            self._body_clock.cancel()
            self._body_clock = None

    def _body_due(self) -> float:
        """Seconds until the body is late unless another byte arrives."""
        site = self.site
        due = self._body_started + site.header_timeout
        due += (self._body_received + 1) / site.min_body_rate
        return max(due - site.clock.seconds(), 0.0)

    def _headers_too_slow(self) -> None:
        self._header_clock = None
        seconds = self.site.header_timeout
        self.refuse(
            408,
            "header_timeout",
            {
                "error": "request timeout",
                "field": "headers",
                "detail": f"the request's headers must arrive within {seconds:g} s",
            },
        )

    def _check_body_rate(self) -> None:
        self._body_clock = None
        due = self._body_due()
        if due > 0:
            self._body_clock = self.site.clock.callLater(due, self._check_body_rate)
            return
        site = self.site
        self.refuse(
            408,
            "body_too_slow",
            {
                "error": "request timeout",
                "field": "body",
                "detail": f"the body must arrive at {site.min_body_rate} bytes a"
                f" second or faster, after {site.header_timeout:g} s",
            },
        )

    # Refusals -------------------------------------------------------------

    def refuse_crowded(self) -> None:
        """The 503 of a connection past C{max_connections}."""
        self.refuse(
            503,
            "too_many_connections",
            {
                "error": "too many connections, try again later",
                "max_connections": self.site.max_connections,
            },
            extra=b"Retry-After: 1\r\n",
        )

    def refuse(
        self, code: int, reason: str, payload: dict[str, Any], extra: bytes = b""
    ) -> None:
        """
        Answer C{code} with C{payload} before any request is dispatched, and
        close: the write side at once, the connection once the client has
        read the answer (or after L{LINGER} seconds).

        Closing with unread data would make the kernel reset the connection,
        and a reset can destroy the answer before the client reads it; so what
        the client still sends is read and dropped until it goes.
        """
        if self.refused:
            return
        self.refused = True
        self.persistent = False
        site = self.site
        site.metrics.refused(reason)
        request = None
        if self.requests and not self._handlingRequest:
            request = cast(OrchestratorRequest, self.requests[-1])
            # Not dispatched, so the request line (if any) is still ours.
            request.method = getattr(self, "_command", b"-")
            request.uri = getattr(self, "_path", b"-")
            request.path = request.uri.split(b"?", 1)[0]
            request._adopt_request_id()
            request_id = request.request_id
        else:
            request_id = new_request_id()
        answer = json_answer(code, payload, request_id, extra)
        cast(ITCPTransport, self.transport).write(answer)
        if request is not None:
            request.code = code
            request.sentLength = len(answer) - answer.index(b"\r\n\r\n") - 4
            site.log(request)
        self._watch()
        transport = cast(ITCPTransport, self.transport)
        cast(IConsumer, transport).unregisterProducer()
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is None:
            transport.loseConnection()
            return
        half_close()
        self._linger = site.clock.callLater(LINGER, transport.abortConnection)

    # Draining -------------------------------------------------------------

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
        header_timeout: float = 10.0,
        min_body_rate: int = 1024,
        max_connections: int = 4096,
    ) -> None:
        # The API takes JSON only.  twisted.web would otherwise parse the
        # Content-Type of every POST with the email package, looking for a form:
        # about a seventh of a heartbeat's cost, measured with py-spy.
        super().__init__(resource, timeout=idle_timeout, parsePOSTFormSubmission=False)
        self.noisy = False
        self.clock = clock
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.header_timeout = header_timeout
        self.min_body_rate = min_body_rate
        self.max_connections = max_connections
        self._access_log = access_log
        self._channels: set[DrainingChannel] = set()
        self._drained: Deferred[None] | None = None
        self._deadline: IDelayedCall | None = None
        self.draining = False
        #: Requests being processed; the metrics read it when scraped.
        self.in_flight = 0
        metrics.in_flight = lambda: self.in_flight
        metrics.open_connections = lambda: len(self._channels)

    # Connections ----------------------------------------------------------

    def channel_opened(self, channel: DrainingChannel) -> None:
        if self.draining:
            # Accepted just before the port closed: serve nothing new.
            channel.draining = True
        crowd = len(self._channels) - self.max_connections
        self._channels.add(channel)
        if crowd >= PROBE_RESERVE:
            channel.refuse_crowded()
        elif crowd >= 0:
            channel.probe_only = True

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
