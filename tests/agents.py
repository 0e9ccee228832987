"""
Small real agents for the routing tests: Twisted servers on 127.0.0.1 that answer
C{POST /task} the way they are told to: complete, fail, refuse, crash with a 500,
hang, answer slowly, or die mid-task.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import orjson
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

COMPLETE = "complete"
FAIL = "fail"
REFUSE = "refuse"
CRASH = "crash"
HANG = "hang"
DIE = "die"


@attrs.define
class Received:
    body: dict[str, Any]
    headers: dict[str, str]


class FakeAgent(Resource):
    """One agent; C{behaviour} may be changed while it runs."""

    isLeaf = True

    def __init__(self, behaviour: str = COMPLETE, delay: float = 0.0) -> None:
        super().__init__()
        self.behaviour = behaviour
        #: Task type -> behaviour, for agents that do some things and not others.
        self.overrides: dict[str, str] = {}
        self.delay = delay
        self.received: list[Received] = []
        self.cancelled = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.port: IListeningPort | None = None
        #: Set on every answer, to check that the orchestrator keeps no cookies.
        self.cookie: bytes | None = None

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
        self.received.append(Received(body, headers))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        behaviour = self.overrides.get(body.get("task_type"), self.behaviour)

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

    def _answer(self, request: Request, body: dict[str, Any], behaviour: str) -> None:
        if behaviour == DIE:
            assert request.channel is not None
            request.channel.transport.abortConnection()
            return
        code, answer = {
            COMPLETE: (200, {"status": "completed", "result": {"by": self.name}}),
            FAIL: (200, {"status": "failed", "error": "could not do it"}),
            REFUSE: (400, {"error": "unknown task type"}),
            CRASH: (500, {"status": "failed", "error": "handler raised"}),
        }[behaviour]
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        if self.cookie is not None:
            request.setHeader(b"set-cookie", self.cookie)
        request.write(orjson.dumps({"task_id": body["task_id"], **answer}))
        request.finish()

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
