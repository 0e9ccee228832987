"""A small Server-Sent Events client on treq, for the change feed's tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import orjson
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool, ResponseDone

_LOST = Failure(ConnectionError("lost"))


@attrs.frozen
class Event:
    id: int | None
    name: str
    data: Any


class SSE(Protocol):
    """Collects events (and comments) from a streamed body as they arrive."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.comments: list[str] = []
        self.ended: Deferred[None] = Deferred()
        self.finished_cleanly: bool | None = None
        self._buffer = b""
        self._waiters: list[tuple[Callable[[], bool], Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n\n" in self._buffer:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            self._block(block.decode())
        self._check()

    def _block(self, block: str) -> None:
        event_id, name, data = None, "message", []
        for line in block.split("\n"):
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "id":
                event_id = int(value)
            elif field == "event":
                name = value
            elif field == "data":
                data.append(value)
        if data:
            self.events.append(Event(event_id, name, orjson.loads("\n".join(data))))

    def connectionLost(self, reason: Failure = _LOST) -> None:
        self.finished_cleanly = reason.check(ResponseDone) is not None
        self.ended.callback(None)
        self._check()

    def _check(self) -> None:
        for waiter in list(self._waiters):
            predicate, done = waiter
            if predicate():
                self._waiters.remove(waiter)
                done.callback(None)

    def until(
        self, predicate: Callable[[], bool], timeout: float = 20.0
    ) -> Deferred[None]:
        """Fires once C{predicate()} holds; fails after C{timeout} seconds."""
        done: Deferred[None] = Deferred()
        if predicate():
            done.callback(None)
            return done
        self._waiters.append((predicate, done))
        timer: IDelayedCall = reactor.callLater(  # type: ignore[attr-defined]
            timeout, self._give_up, predicate, done
        )
        done.addBoth(
            lambda result: (timer.cancel() if timer.active() else None, result)[1]
        )
        return done

    def _give_up(self, predicate: Callable[[], bool], done: Deferred[None]) -> None:
        for waiter in list(self._waiters):
            if waiter[1] is done:
                self._waiters.remove(waiter)
                done.errback(
                    AssertionError(
                        f"not seen in time; events so far: {self.events!r}"
                        f" ended={self.finished_cleanly}"
                    )
                )

    def named(self, name: str) -> list[Event]:
        return [e for e in self.events if e.name == name]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


async def open_feed(
    url: str,
    pool: HTTPConnectionPool | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[Any, SSE]:
    """GET C{url} (the feed); the response and its events as they come."""
    response = await treq.get(url, headers=headers or {}, unbuffered=True, pool=pool)
    stream = SSE()
    if response.code == 200:
        response.deliverBody(stream)
    return response, stream
