"""
One attempt at a task: C{POST http://host:port/task} to an agent.

The agent's answer decides what happens next, and this module only says which
kind of answer it was: done, failed for good, or worth another try.
"""

from __future__ import annotations

from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any, Final
from urllib.parse import urlsplit

import attrs
import orjson
from hyperlink import EncodedURL
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import (
    ConnectError,
    ConnectionLost,
    DNSLookupError,
    TimeoutError,
)
from twisted.internet.interfaces import IConsumer, IStreamClientEndpoint
from twisted.web.client import (
    URI,
    HTTPConnectionPool,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.client import Agent as WebAgent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from optiinfra import exactjson
from optiinfra.bounded import bounded
from optiinfra.destinations import CheckedReactor, CheckingResolver, Destinations
from optiinfra.registry.model import Agent
from optiinfra.routing.answer import AnswerRefused, read_answer
from optiinfra.routing.model import Task

#: Larger answers are refused: an agent's result is a summary, not a data set.
MAX_ANSWER_BYTES: Final = 4 * 1024 * 1024


@attrs.frozen
class Completed:
    result: Any
    execution_time_ms: float | None = None


@attrs.frozen
class Failed:
    """
    The agent answered and said no: its own verdict (C{"status": "failed"},
    whatever the HTTP status), a refusal (4xx), or an answer that cannot be
    used.  Final: not retried, and not held against the agent, which is alive.
    """

    error: str
    execution_time_ms: float | None = None


@attrs.frozen
class Retryable:
    """
    No usable answer (a 5xx without a verdict, connection trouble, an attempt
    timed out): try again, and count it against the agent's circuit.
    """

    error: str


@attrs.frozen
class Throttled:
    """
    The agent is alive but busy (429, or 503 with C{Retry-After}): try again
    after C{after} seconds (or the usual back-off when it gave none), without
    counting it against the agent's circuit.
    """

    error: str
    after: float | None = None


Outcome = Completed | Failed | Retryable | Throttled


def task_body(task: Task, timeout_seconds: float) -> dict[str, Any]:
    return {
        "task_id": task.id,
        "task_type": task.task_type,
        "parameters": task.parameters,
        "timeout_seconds": timeout_seconds,
        "priority": task.priority,
        "metadata": task.metadata,
    }


class AgentPool(Service):
    """Closes the connections to agents once nothing uses them any more."""

    def __init__(self, pool: HTTPConnectionPool) -> None:
        self._pool = pool

    def stopService(self) -> Deferred[None]:
        super().stopService()
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed


@implementer(IBodyProducer)
class _Body:
    """
    A request body written whole, with the headers: the C{FileBodyProducer}
    treq would make of bytes writes it a reactor turn later, in a packet of
    its own (about 0.3 ms a call).
    """

    def __init__(self, data: bytes) -> None:
        self.length = len(data)
        self._data = data

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        """Written already: nothing to pause."""

    def resumeProducing(self) -> None:
        """Written already: nothing to resume."""

    def stopProducing(self) -> None:
        """Written already: nothing to stop."""


#: Addresses kept: far more than one orchestrator has agents.
_ADDRESSES: Final = 4096


@lru_cache(maxsize=_ADDRESSES)
def agent_uri(host: str, port: int, endpoint: str | None = None) -> bytes:
    """
    Where an agent at C{host:port} takes tasks: C{/task} under the path of its
    registered C{endpoint} (C{http://host:8002/agent} -> C{/agent/task}), over
    the endpoint's scheme; plain C{http://host:port/task} without one.
    """
    scheme, prefix = "http", ""
    if endpoint is not None:
        parts = urlsplit(endpoint)
        scheme, prefix = parts.scheme or "http", parts.path.rstrip("/")
    if ":" in host:  # an IPv6 literal
        return f"{scheme}://[{host}]:{port}{prefix}/task".encode("ascii")
    # A name that is not ASCII is IDNA-encoded here, once, and so is the path.
    named = EncodedURL.from_text(f"{scheme}://{host}:{port}{prefix}/task")
    return named.to_uri().to_text().encode("ascii")


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """
    One endpoint per agent address, made once: twisted.web's L{WebAgent}
    makes a L{HostnameEndpoint} per request, IDNA-encoding the host again,
    even when the pool then hands back a connection it already has.  C{https}
    agents are called over TLS, their certificate checked against their name.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.endpoint = lru_cache(maxsize=_ADDRESSES)(self._make)

    def _make(self, scheme: bytes, host: bytes, port: int) -> IStreamClientEndpoint:
        # The reactor given resolves through the destinations' check: every
        # address connected to is one that may be called.
        plain = HostnameEndpoint(self._reactor, host, port)
        if scheme == b"http":
            return plain
        # Only with the tls extra installed; registration refuses https
        # endpoints without it (L{tls_available}).
        from twisted.internet.ssl import optionsForClientTLS

        return wrapClientTLS(optionsForClientTLS(host.decode("ascii")), plain)

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme not in (b"http", b"https"):
            raise ValueError(f"agents are called over http(s), not {uri.scheme!r}")
        return self.endpoint(uri.scheme, uri.host, uri.port)


class Dispatcher:
    """Sends attempts over a shared connection pool."""

    def __init__(
        self,
        reactor: Any,
        pool: HTTPConnectionPool,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
        destinations: Destinations | None = None,
    ) -> None:
        self._resolver = CheckingResolver(
            reactor.nameResolver, destinations or Destinations()
        )
        # twisted.web's Agent itself, not treq's client: it keeps no cookies
        # (tasks are independent; a cookie set by one agent must never reach
        # another), follows no redirects, and inflates nothing behind the
        # cap's back.
        self._agent = WebAgent.usingEndpointFactory(
            reactor,
            _Endpoints(CheckedReactor(reactor, self._resolver)),
            pool,
        )
        self._reactor = reactor
        self.max_answer_bytes = max_answer_bytes

    async def send(self, agent: Agent, task: Task, seconds_left: float) -> Outcome:
        """
        One attempt, telling the agent it has C{seconds_left} seconds.  The caller
        enforces time: cancelling the coroutine's Deferred aborts the call and
        raises L{CancelledError} here.
        """
        headers = Headers(
            {
                b"Content-Type": [b"application/json"],
                b"Accept-Encoding": [b"identity"],
                b"X-Deadline-Ms": [b"%d" % max(0, int(seconds_left * 1000))],
            }
        )
        if task.request_id:
            headers.setRawHeaders(b"X-Request-ID", [task.request_id.encode()])
        if task.traceparent:
            headers.setRawHeaders(b"traceparent", [task.traceparent.encode()])
        try:
            response = await self._agent.request(
                b"POST",
                agent_uri(agent.host, agent.port, agent.endpoint),
                headers,
                _Body(orjson.dumps(task_body(task, seconds_left))),
            )
            content = await read_answer(response, self.max_answer_bytes)
        except AnswerRefused as error:
            return Failed(str(error))
        except (ResponseNeverReceived, ResponseFailed) as error:
            if any(reason.check(CancelledError) for reason in error.reasons):
                raise CancelledError() from None
            reason = bounded(repr(error.reasons[0].value), 1024)
            return Retryable(f"the connection failed: {reason}")
        except DNSLookupError as error:
            why = self._resolver.refused.get(agent.host)
            if why is not None:
                return Failed(f"the agent's address may not be called: {why}")
            return Retryable(f"{type(error).__name__}: {error}".strip())
        except (ConnectError, ConnectionLost, TimeoutError) as error:
            return Retryable(f"{type(error).__name__}: {error}".strip())
        retry_after = response.headers.getRawHeaders(b"retry-after")
        return classify(
            response.code,
            content,
            None
            if retry_after is None
            else seconds_until(retry_after[-1], self._reactor.seconds()),
        )


def seconds_until(value: bytes, now: float) -> float | None:
    """A C{Retry-After} value (seconds, or an HTTP date) as seconds from C{now}."""
    text = value.decode("latin-1").strip()
    if text.isdigit():
        return float(min(int(text), 86400))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - now)


def _verdict(answer: dict[str, Any]) -> Failed:
    """The agent's own C{"status": "failed"}, its error cut to size."""
    error = answer.get("error")
    if error is None or error == "":
        text = "the agent reported a failure without saying why"
    else:
        text = error if isinstance(error, str) else orjson.dumps(error).decode()
    return Failed(bounded(text), _milliseconds(answer))


def _milliseconds(answer: dict[str, Any]) -> float | None:
    elapsed = answer.get("execution_time_ms")
    if isinstance(elapsed, bool) or not isinstance(elapsed, int | float):
        return None
    return float(elapsed)


def classify(code: int, content: bytes, retry_after: float | None = None) -> Outcome:
    """
    What an agent's HTTP answer means for the task.

    A JSON body saying C{"status": "failed"} is the agent's verdict whatever the
    code: the shared Flask handler answers a handler that raised with a 500 and
    such a body, and retrying a deterministic failure only wastes the agent.
    """
    inexact: str | None = None
    try:
        answer = exactjson.loads(content) if content else {}
    except orjson.JSONDecodeError:
        answer = None
    except exactjson.NotExact as error:
        answer, inexact = None, str(error)
    if isinstance(answer, dict) and answer.get("status") == "failed":
        return _verdict(answer)
    if code == 429 or (code == 503 and retry_after is not None):
        return Throttled(f"agent busy ({code})", retry_after)
    if code >= 500:
        return Retryable(f"agent answered {code}")
    if inexact is not None:
        return Failed(f"the agent's answer cannot be stored exactly: {inexact}")
    if code >= 400:
        detail = answer.get("error") if isinstance(answer, dict) else None
        shown = bounded(str(detail)) if detail else "no detail"
        return Failed(f"agent refused the task ({code}): {shown}")
    if not isinstance(answer, dict):
        return Failed("agent answered with something other than a JSON object")
    status = answer.get("status")
    if status == "completed":
        result = answer.get("result")
        try:
            exactjson.check_storable(result)
        except exactjson.NotExact as error:
            return Failed(f"the agent's result cannot be stored: {error}")
        return Completed(result, _milliseconds(answer))
    shown_status = bounded(repr(status), 256)
    return Failed(f"agent answered with an unknown status {shown_status}")
