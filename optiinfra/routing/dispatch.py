"""
One attempt at a task: C{POST http://host:port/task} to an agent, via treq.

The agent's answer decides what happens next, and this module only says which
kind of answer it was: done, failed for good, or worth another try.
"""

from __future__ import annotations

from functools import lru_cache
from http.cookiejar import DefaultCookiePolicy
from typing import Any, Final, cast

import attrs
import orjson
import treq
from hyperlink import EncodedURL
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectError, ConnectionLost, TimeoutError
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

from optiinfra.registry.model import Agent
from optiinfra.routing.model import Task

#: Larger answers are refused: an agent's result is a summary, not a data set.
MAX_ANSWER_BYTES: Final = 4 * 1024 * 1024


@attrs.frozen
class Completed:
    result: Any
    execution_time_ms: float | None = None


@attrs.frozen
class Failed:
    """The agent answered and said no (its own failure or a 4xx): not retried."""

    error: str


@attrs.frozen
class Retryable:
    """No usable answer (5xx, connection trouble, attempt timeout): try again."""

    error: str


Outcome = Completed | Failed | Retryable


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
    treq makes of bytes would write it a reactor turn later, in a packet of
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


class _AgentURL(EncodedURL):
    """
    An agent's C{/task} address, put in URI form once.

    treq puts every URL it is given in URI form and back into text on each
    call, IDNA-encoding the host (about a sixth of a call's CPU); an agent's
    address does not change between calls.  Doing it here also lets IPv6
    literals through, which the IDNA step refuses.
    """

    _text: str

    @classmethod
    def of(cls, text: str) -> _AgentURL:
        """C{text}, already in URI form."""
        url = cast(_AgentURL, cls.from_text(text))
        url._text = text
        return url

    def to_uri(self) -> EncodedURL:
        return self

    def to_text(self, with_password: bool = False) -> str:
        return self._text


#: Addresses kept: far more than one orchestrator has agents.
_ADDRESSES: Final = 4096


@lru_cache(maxsize=_ADDRESSES)
def agent_url(host: str, port: int) -> EncodedURL:
    """Where an agent at C{host:port} takes tasks."""
    if ":" in host:  # an IPv6 literal
        return _AgentURL.of(f"http://[{host}]:{port}/task")
    # A name that is not ASCII is IDNA-encoded here, once.
    named = EncodedURL.from_text(f"http://{host}:{port}/task")
    return _AgentURL.of(named.to_uri().to_text())


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """
    One endpoint per agent address, made once: twisted.web's L{WebAgent}
    makes a L{HostnameEndpoint} per request, IDNA-encoding the host again,
    even when the pool then hands back a connection it already has.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.endpoint = lru_cache(maxsize=_ADDRESSES)(self._make)

    def _make(self, host: bytes, port: int) -> IStreamClientEndpoint:
        return HostnameEndpoint(self._reactor, host, port)

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme != b"http":
            raise ValueError(f"agents are called over http, not {uri.scheme!r}")
        return self.endpoint(uri.host, uri.port)


def _no_cookies() -> IndexableCookieJar:
    """
    A jar that keeps nothing: tasks are independent, and a cookie set by one
    agent must never reach another.
    """
    return IndexableCookieJar(DefaultCookiePolicy(allowed_domains=[]))


class Dispatcher:
    """Sends attempts over a shared connection pool."""

    def __init__(self, reactor: Any, pool: HTTPConnectionPool) -> None:
        # One client for every call: treq.post would build an Agent each time.
        agent = WebAgent.usingEndpointFactory(reactor, _Endpoints(reactor), pool)
        #: Also given on every call, so that treq does not make a jar each time.
        self._cookies = _no_cookies()
        self._client = HTTPClient(agent, cookiejar=self._cookies)

    async def send(self, agent: Agent, task: Task, seconds_left: float) -> Outcome:
        """
        One attempt, telling the agent it has C{seconds_left} seconds.  The caller
        enforces time: cancelling the coroutine's Deferred aborts the call and
        raises L{CancelledError} here.
        """
        headers = Headers(
            {
                b"Content-Type": [b"application/json"],
                b"X-Deadline-Ms": [b"%d" % max(0, int(seconds_left * 1000))],
            }
        )
        if task.request_id:
            headers.setRawHeaders(b"X-Request-ID", [task.request_id.encode()])
        if task.traceparent:
            headers.setRawHeaders(b"traceparent", [task.traceparent.encode()])
        try:
            response = await self._client.post(
                agent_url(agent.host, agent.port),
                data=_Body(orjson.dumps(task_body(task, seconds_left))),
                headers=headers,
                allow_redirects=False,
                cookies=self._cookies,
            )
            content = await treq.content(response)
        except (ResponseNeverReceived, ResponseFailed) as error:
            if any(reason.check(CancelledError) for reason in error.reasons):
                raise CancelledError() from None
            return Retryable(f"the connection failed: {error.reasons[0].value!r}")
        except (ConnectError, ConnectionLost, TimeoutError) as error:
            return Retryable(f"{type(error).__name__}: {error}".strip())
        return classify(response.code, content)


def classify(code: int, content: bytes) -> Outcome:
    """What an agent's HTTP answer means for the task."""
    if code >= 500:
        return Retryable(f"agent answered {code}")
    if len(content) > MAX_ANSWER_BYTES:
        return Failed(f"agent answered with more than {MAX_ANSWER_BYTES} bytes")
    try:
        answer = orjson.loads(content) if content else {}
    except orjson.JSONDecodeError:
        answer = None
    if code >= 400:
        detail = answer.get("error") if isinstance(answer, dict) else None
        return Failed(f"agent refused the task ({code}): {detail or 'no detail'}")
    if not isinstance(answer, dict):
        return Failed("agent answered with something other than a JSON object")
    status = answer.get("status")
    if status == "completed":
        elapsed = answer.get("execution_time_ms")
        return Completed(
            answer.get("result"),
            float(elapsed) if isinstance(elapsed, int | float) else None,
        )
    if status == "failed":
        return Failed(str(answer.get("error") or "the agent reported a failure"))
    return Failed(f"agent answered with an unknown status {status!r}")
