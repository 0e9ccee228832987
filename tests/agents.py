"""
Small real agents for the routing tests: Twisted servers on 127.0.0.1 that answer
C{POST /task} the way they are told to: complete, fail, refuse, crash with a 500
as the shared Flask handler does, hang, answer slowly, die mid-task, or attack:
floods, compression bombs, answers the store cannot keep.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import orjson
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IPullProducer
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

COMPLETE = "complete"
FAIL = "fail"
REFUSE = "refuse"
CRASH = "crash"
HANG = "hang"
DIE = "die"
#: A proxy's error page: a 502 in HTML, no verdict.
BAD_GATEWAY = "bad-gateway"
#: Busy: 429 with C{Retry-After: retry_after}.
BUSY = "busy"
#: Busy: 503 with C{Retry-After: retry_after}.
UNAVAILABLE = "unavailable"
#: Announces C{Content-Length: 2**40} and streams zeros (at the reader's pace).
FLOOD_ANNOUNCED = "flood-announced"
#: Streams zeros, chunked, with no length announced.
FLOOD_CHUNKED = "flood-chunked"
#: A small gzip answer that inflates to C{BOMB_BYTES}.
GZIP_BOMB = "gzip-bomb"
#: A completed answer, gzipped though nobody asked.
GZIP_SMALL = "gzip-small"
#: A completed answer labelled with an encoding nobody asked for.
BROTLI = "brotli"
#: A gzip answer that is not gzip.
CORRUPT_GZIP = "corrupt-gzip"
#: The headers and half a body, then nothing until the connection is closed.
STALL_BODY = "stall-body"
#: A completed answer whose result is nested 300 deep.
DEEP = "deep"
#: A completed answer whose result holds 2**70.
HUGE_INT = "huge-int"
#: A failed answer with a 4 MB error message.
LONG_ERROR = "long-error"
#: A completed answer with a 3.5 MB result.
BIG_RESULT = "big-result"

#: What the floods send at most, and what the bomb inflates to.
FLOOD_BYTES = 512 * 1024 * 1024
BOMB_BYTES = 256 * 1024 * 1024
_CHUNK = b"\0" * (64 * 1024)
_bomb: list[bytes] = []


def gzip_bomb() -> bytes:
    """C{BOMB_BYTES} of zeros, gzipped (about 250 KB); made once."""
    if not _bomb:
        packer = zlib.compressobj(9, zlib.DEFLATED, 31)
        zeros = b"\0" * (1024 * 1024)
        parts = [packer.compress(zeros) for _ in range(BOMB_BYTES // len(zeros))]
        _bomb.append(b"".join(parts) + packer.flush())
    return _bomb[0]


@implementer(IPullProducer)
class _Flood:
    """Zeros written as fast as the reader takes them, and no faster."""

    def __init__(self, request: Request, total: int, agent: FakeAgent) -> None:
        self._request = request
        self._left = total
        self._agent = agent

    def resumeProducing(self) -> None:
        if self._left <= 0:
            self._request.unregisterProducer()
            self._request.finish()
            return
        self._request.write(_CHUNK)
        self._left -= len(_CHUNK)
        self._agent.flooded += len(_CHUNK)

    def stopProducing(self) -> None:
        self._left = 0


@attrs.define
class Received:
    body: dict[str, Any]
    headers: dict[str, str]
    path: str = "/task"
    secure: bool = False


class FakeAgent(Resource):
    """One agent; C{behaviour} may be changed while it runs."""

    isLeaf = True

    def __init__(self, behaviour: str = COMPLETE, delay: float = 0.0) -> None:
        super().__init__()
        self.behaviour = behaviour
        #: Task type -> behaviour, for agents that do some things and not others.
        self.overrides: dict[str, str] = {}
        #: Behaviours for the next calls, in order, before the others apply.
        self.script: list[str] = []
        self.delay = delay
        self.received: list[Received] = []
        self.cancelled = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.port: IListeningPort | None = None
        #: Set on every answer, to check that the orchestrator keeps no cookies.
        self.cookie: bytes | None = None
        #: The error of a failed answer, as the shared handler words it.
        self.error = "handler raised"
        #: Seconds sent in C{Retry-After} when busy.
        self.retry_after = "0"
        #: Bytes of the floods written to sockets so far.
        self.flooded = 0
        #: Calls whose connection was closed before the answer was whole.
        self.lost = 0

    @property
    def tasks(self) -> list[str]:
        return [r.body["task_id"] for r in self.received]

    @property
    def task_types(self) -> list[str]:
        return [r.body["task_type"] for r in self.received]

    def render_POST(self, request: Request) -> Any:
        body = orjson.loads(request.content.read())
        headers = {
            k.decode().lower(): v[0].decode()
            for k, v in request.requestHeaders.getAllRawHeaders()
        }
        self.received.append(
            Received(body, headers, request.path.decode(), request.isSecure())
        )
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        request.notifyFinish().addErrback(lambda _: self._lost())
        behaviour = (
            self.script.pop(0)
            if self.script
            else self.overrides.get(body.get("task_type"), self.behaviour)
        )

        def answer(_: object = None) -> None:
            self.in_flight -= 1
            if gone:
                self.cancelled += 1
                return
            self._answer(request, body, behaviour)

        if behaviour == HANG:
            request.notifyFinish().addErrback(lambda _: answer())
        elif self.delay:
            deferLater(reactor, self.delay).addCallback(answer)
        else:
            answer()
        return NOT_DONE_YET

    def _lost(self) -> None:
        self.lost += 1

    def _answer(self, request: Request, body: dict[str, Any], behaviour: str) -> None:
        if behaviour == DIE:
            assert request.channel is not None
            request.channel.transport.abortConnection()
            return
        if behaviour in (FLOOD_ANNOUNCED, FLOOD_CHUNKED, GZIP_BOMB, BAD_GATEWAY):
            self._attack(request, behaviour)
            return
        if behaviour in (GZIP_SMALL, BROTLI, CORRUPT_GZIP, STALL_BODY):
            self._encoded(request, body, behaviour)
            return
        code, answer = self._answer_for(behaviour)
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        if behaviour in (BUSY, UNAVAILABLE):
            request.setHeader(b"retry-after", self.retry_after.encode())
        if self.cookie is not None:
            request.setHeader(b"set-cookie", self.cookie)
        document = {"task_id": body["task_id"], **answer}
        # orjson cannot write 300 levels: the standard library can.
        data = (
            json.dumps(document).encode()
            if behaviour == DEEP
            else orjson.dumps(document)
        )
        if behaviour == HUGE_INT:  # orjson cannot write it: 2**70
            data = data.replace(b'"n":%d' % 2**62, b'"n":%d' % 2**70)
        request.write(data)
        request.finish()

    def _answer_for(self, behaviour: str) -> tuple[int, dict[str, Any]]:
        deep: Any = {"leaf": 1}
        if behaviour == DEEP:
            for _ in range(300):
                deep = {"down": deep}
        return {
            COMPLETE: (200, {"status": "completed", "result": {"by": self.name}}),
            FAIL: (200, {"status": "failed", "error": "could not do it"}),
            REFUSE: (400, {"error": "unknown task type"}),
            # Exactly what the shared Flask TaskHandler answers when the
            # handler raised.
            CRASH: (
                500,
                {"status": "failed", "error": self.error, "execution_time_ms": 3},
            ),
            BUSY: (429, {"error": "too many tasks"}),
            UNAVAILABLE: (503, {"error": "warming up"}),
            DEEP: (200, {"status": "completed", "result": deep}),
            HUGE_INT: (200, {"status": "completed", "result": {"n": 2**62}}),
            LONG_ERROR: (200, {"status": "failed", "error": "x" * 4_000_000}),
            BIG_RESULT: (
                200,
                {"status": "completed", "result": {"blob": "x" * 3_500_000}},
            ),
        }[behaviour]

    def _encoded(self, request: Request, body: dict[str, Any], behaviour: str) -> None:
        answer = orjson.dumps(
            {"task_id": body["task_id"], "status": "completed", "result": {"n": 1}}
        )
        data = {
            GZIP_SMALL: gzip.compress(answer),
            BROTLI: answer,
            CORRUPT_GZIP: b"\x1f\x8b" + b"not gzip at all" * 10,
            STALL_BODY: answer,
        }[behaviour]
        request.setHeader(b"content-type", b"application/json")
        if behaviour != STALL_BODY:
            encoding = b"br" if behaviour == BROTLI else b"gzip"
            request.setHeader(b"content-encoding", encoding)
            request.write(data)
            request.finish()
            return
        request.setHeader(b"content-length", b"%d" % len(data))
        request.write(data[: len(data) // 2])  # and the rest never comes

    def _attack(self, request: Request, behaviour: str) -> None:
        if behaviour == BAD_GATEWAY:
            request.setResponseCode(502)
            request.setHeader(b"content-type", b"text/html")
            request.write(b"<html><body><h1>502 Bad Gateway</h1></body></html>")
            request.finish()
        elif behaviour == GZIP_BOMB:
            bomb = gzip_bomb()
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-encoding", b"gzip")
            request.setHeader(b"content-length", b"%d" % len(bomb))
            request.write(bomb)
            request.finish()
        else:
            request.setHeader(b"content-type", b"application/json")
            if behaviour == FLOOD_ANNOUNCED:
                request.setHeader(b"content-length", b"%d" % 2**40)
            request.registerProducer(_Flood(request, FLOOD_BYTES, self), False)

    @property
    def name(self) -> str:
        assert self.port is not None
        return f"agent-{self.port.getHost().port}"


StartAgent = Callable[..., Any]


@pytest_twisted.async_yield_fixture
async def start_agent() -> AsyncIterator[StartAgent]:
    running: list[FakeAgent] = []

    async def start(
        behaviour: str = COMPLETE, delay: float = 0.0, interface: str = "127.0.0.1"
    ) -> FakeAgent:
        agent = FakeAgent(behaviour, delay)
        endpoint = (
            TCP6ServerEndpoint(reactor, 0, interface=interface)
            if ":" in interface
            else TCP4ServerEndpoint(reactor, 0, interface=interface)
        )
        site = Site(agent)
        site.noisy = False
        agent.port = await endpoint.listen(site)
        running.append(agent)
        return agent

    yield start
    for agent in running:
        if agent.port is not None:
            await agent.port.stopListening()


async def settle(seconds: float = 0.05) -> None:
    await deferLater(reactor, seconds)


async def until_sent(agent: FakeAgent, task_type: str, tries: int = 300) -> None:
    """Wait until C{agent} has been sent a task of C{task_type}."""
    for _ in range(tries):
        if task_type in agent.task_types:
            return
        await settle(0.01)
    raise AssertionError(f"{agent.name} was never sent {task_type}: {agent.task_types}")


def never() -> Deferred[None]:
    return Deferred()
