"""
The live change feed: Server-Sent Events from the event log to each client.

One L{Feed} per process reads the log after the last id it has seen (at once
when this process recorded something, else every C{poll_interval} seconds, which
is how changes made by other replicas arrive), encodes each event once, and
offers it to every open L{Stream}.  A stream that resumes (C{Last-Event-ID})
first replays from the log, holding live events meanwhile.

A slow client never stalls the reactor nor grows memory without end: each
stream is a push producer for its connection, so when the socket's buffer is
full the transport pauses it; what arrives meanwhile waits in a backlog of at
most C{buffer_bytes}, and past that the client gets one C{overflow} event and
is closed (it reconnects and resumes, or reloads).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, cast

import attrs
import orjson
import structlog
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IRequest
from twisted.web.server import Request
from zope.interface import implementer

from optiinfra.store.events import IEventLog, StoredEvent

_log = structlog.get_logger("optiinfra.events")

_HEARTBEAT: Final = b": keep-alive\n\n"


@attrs.frozen
class FeedConfig:
    #: Seconds between reads of the log for other replicas' events.
    poll_interval: float = 0.25
    #: Seconds between two reads at least, however many changes come.
    min_read_interval: float = 0.05
    #: Seconds between comment lines that keep idle streams (and proxies) open.
    heartbeat: float = 15.0
    #: Bytes a paused client may have waiting before it is cut off.
    buffer_bytes: int = 256 * 1024
    #: Events read from the log at a time.
    page: int = 500
    #: Milliseconds a client should wait before reconnecting.
    retry_ms: int = 2000
    #: Seconds a cut-off slow client has to read its last bytes.
    cut_off_grace: float = 10.0


@attrs.frozen
class Filters:
    """Which events a client wants: topics, and labels that must match."""

    topics: frozenset[str]
    labels: Mapping[str, str] = attrs.field(factory=dict)
    #: Every topic and no labels: every event is wanted.
    everything: bool = False

    def match(self, event: StoredEvent) -> bool:
        return event.topic in self.topics and all(
            event.labels.get(name) == value for name, value in self.labels.items()
        )


def encode(event: StoredEvent) -> bytes:
    """One event as the stream carries it."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (
        event.id,
        event.topic.encode(),
        event.document,
    )


def control(name: str, last_id: int, payload: dict[str, object]) -> bytes:
    """A C{reset} or C{overflow} event: the feed speaking for itself."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (
        last_id,
        name.encode(),
        orjson.dumps(payload),
    )


class FeedClosed(Exception):
    """The feed is not running (starting, or the process is stopping)."""


@implementer(IPushProducer)
class Stream:
    """One client's stream: what it wants, what it has seen, what waits."""

    def __init__(
        self,
        feed: Feed,
        request: IRequest,
        filters: Filters,
        last_id: int,
        buffer_bytes: int,
    ) -> None:
        self._feed = feed
        self._request = cast(Request, request)
        self.filters = filters
        #: The newest id this stream has passed (sent or filtered out).
        self.last_id = last_id
        self._limit = buffer_bytes
        self._paused = False
        self._resumed: Deferred[None] | None = None
        self._backlog: list[bytes] = []
        self._backlog_bytes = 0
        #: Live events that came while replaying: None once live.
        self._held: list[tuple[StoredEvent, bytes]] | None = None
        self._held_bytes = 0
        self.closed = False
        #: Fires with the last bytes (none) once the stream has ended.
        self.done: Deferred[bytes] = Deferred(lambda _: self._end())

    # Writing ----------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.closed:
            return
        if not self._paused:
            self._request.write(data)
            return
        self._backlog.append(data)
        self._backlog_bytes += len(data)
        if self._backlog_bytes > self._limit:
            self.overflow()

    def offer(self, event: StoredEvent, data: bytes) -> None:
        """A new event from the log; sent if wanted and not seen already."""
        if self.closed or event.id <= self.last_id:
            return
        if self._held is not None:
            self._held.append((event, data))
            self._held_bytes += len(data)
            if self._held_bytes > self._limit:
                self.overflow()
            return
        self.last_id = event.id
        if self.filters.match(event):
            self._write(data)

    def offer_all(self, batch: list[tuple[StoredEvent, bytes]], joined: bytes) -> None:
        """
        New events from the log, in order, sent in one write: a read of the
        log costs one write per client, however many events it found.
        C{joined} is all of them, for the clients that want everything.
        """
        if self.closed:
            return
        if self._held is not None:
            for event, data in batch:
                self.offer(event, data)
            return
        if self.filters.everything and batch[0][0].id > self.last_id:
            self.last_id = batch[-1][0].id
            self._write(joined)
            return
        wanted = []
        for event, data in batch:
            if event.id <= self.last_id:
                continue
            self.last_id = event.id
            if self.filters.match(event):
                wanted.append(data)
        if wanted:
            self._write(b"".join(wanted))

    def heartbeat(self) -> None:
        if not self._paused:
            self._write(_HEARTBEAT)

    async def replay(self) -> None:
        """Send what the log holds after L{last_id}, then go live."""
        self._held = []
        try:
            while not self.closed:
                if self._resumed is not None:
                    await self._resumed
                    continue
                page = await self._feed.log.after(self.last_id, self._feed.config.page)
                for event in page:
                    if self.is_closed():
                        return
                    self.last_id = event.id
                    if self.filters.match(event):
                        self._write(encode(event))
                if len(page) < self._feed.config.page:
                    break
        finally:
            held, self._held = self._held or [], None
        for event, data in held:
            self.offer(event, data)

    def overflow(self) -> None:
        """The client cannot keep up: tell it so, once, and close."""
        if self.closed:
            return
        _log.warn("feed client too slow: closed", backlog_bytes=self._backlog_bytes)
        self._request.write(
            control(
                "overflow",
                self.last_id,
                {"reason": "the client did not keep up; reconnect to resume"},
            )
        )
        channel = self._request.channel
        self.close()
        # The connection goes too: what it still buffers is freed once the
        # client reads it, or after a grace period when it never does.
        if channel is not None:
            self._feed.cut_off(channel)

    def is_closed(self) -> bool:
        return self.closed

    # IPushProducer: the transport says when its buffer fills and empties. -----

    def pauseProducing(self) -> None:
        self._paused = True
        if self._resumed is None:
            self._resumed = Deferred()

    def resumeProducing(self) -> None:
        self._paused = False
        backlog, self._backlog = self._backlog, []
        self._backlog_bytes = 0
        if backlog and not self.closed:
            self._request.write(b"".join(backlog))
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.callback(None)

    def stopProducing(self) -> None:
        self._end()

    # Ending -----------------------------------------------------------------

    def close(self) -> None:
        """End the stream from our side: the response finishes cleanly."""
        if self.closed:
            return
        self._end()
        self.done.callback(b"")

    def _end(self) -> None:
        """Forget the stream (its client left, or we close it)."""
        if self.closed:
            return
        self.closed = True
        self._backlog = []
        self._feed.forget(self)
        if self._request.channel is not None:  # None once the client has gone
            self._request.unregisterProducer()
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.callback(None)


class Feed:
    """This process's end of the change feed."""

    def __init__(
        self, log: IEventLog, clock: IReactorTime, config: FeedConfig | None = None
    ) -> None:
        self.log = log
        self.config = config or FeedConfig()
        self._clock = clock
        self._streams: set[Stream] = set()
        #: The newest id read from the log; None until started.
        self.cursor: int | None = None
        self._reading: Deferred[None] | None = None
        self._again = False
        self._read_call: IDelayedCall | None = None
        self._last_read = float("-inf")
        #: Set for good when the process stops.
        self.stopped = False
        #: Streams asked for while the feed was starting.
        self._waiting: list[Deferred[None]] = []
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = clock

    @property
    def running(self) -> bool:
        return self.cursor is not None

    @property
    def streams(self) -> int:
        return len(self._streams)

    async def start(self) -> None:
        """Begin at the log's newest event: new clients hear what follows."""
        window = await self.log.window()
        if self.stopped or self.cursor is not None:
            return
        self.cursor = window.last_id
        self._heartbeat.start(self.config.heartbeat, now=False)
        self._release()

    def _release(self) -> None:
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(None)

    def stop(self) -> None:
        """End every stream now and refuse new ones (the process is stopping)."""
        self.stopped = True
        self.cursor = None
        if self._read_call is not None and self._read_call.active():
            self._read_call.cancel()
        self._release()
        if self._heartbeat.running:
            self._heartbeat.stop()
        for stream in list(self._streams):
            stream.close()

    def _beat(self) -> None:
        for stream in list(self._streams):
            stream.heartbeat()

    def forget(self, stream: Stream) -> None:
        self._streams.discard(stream)

    def cut_off(self, channel: HTTPChannel) -> None:
        """Close a slow client's connection; abort it if it does not drain."""
        tcp = cast(ITCPTransport, channel.transport)
        channel.loseConnection()
        self._clock.callLater(self.config.cut_off_grace, tcp.abortConnection)

    # Reading the log ------------------------------------------------------------

    def wake(self) -> None:
        """
        Read the log soon (this process recorded, or it is time): at once
        after a quiet spell, else once C{min_read_interval} has passed since
        the last read, so that a burst of changes costs each client a few
        writes rather than one per change.
        """
        if self.cursor is None:
            return
        if self._reading is not None:
            self._again = True
            return
        if self._read_call is not None and self._read_call.active():
            return
        wait = self._last_read + self.config.min_read_interval - self._clock.seconds()
        if wait > 0:
            self._read_call = self._clock.callLater(wait, self._start_read)
        else:
            self._start_read()

    def _start_read(self) -> None:
        if self.cursor is None or self._reading is not None:
            return
        self._last_read = self._clock.seconds()
        self._reading = ensureDeferred(self.read())
        self._reading.addErrback(
            lambda failure: _log.warn(
                "change feed could not read events", error=failure.getErrorMessage()
            )
        )
        self._reading.addBoth(self._read_done)

    def _read_done(self, _: object) -> None:
        self._reading = None
        if self._again:
            self._again = False
            self.wake()

    async def read(self) -> None:
        """Pass every event after the cursor to the streams."""
        while self.cursor is not None:
            page = await self.log.after(self.cursor, self.config.page)
            if not page or not self.running:
                return
            self.cursor = page[-1].id
            batch = [(event, encode(event)) for event in page]
            joined = b"".join(data for _, data in batch)
            for stream in list(self._streams):
                stream.offer_all(batch, joined)
            if len(page) < self.config.page:
                return

    # Opening streams -----------------------------------------------------------

    async def open(
        self, request: IRequest, filters: Filters, last_id: int | None
    ) -> Stream:
        """
        A stream for C{request}, headers sent; resumed after C{last_id} when
        given, or a C{reset} first when the log no longer reaches back there.
        """
        if self.cursor is None and not self.stopped:  # starting: wait for it
            waiter: Deferred[None] = Deferred()
            self._waiting.append(waiter)
            await waiter
        if self.cursor is None:
            raise FeedClosed()
        reset = False
        if last_id is not None:
            window = await self.log.window()
            if self.cursor is None:
                raise FeedClosed()
            if last_id < window.purged_through or last_id > window.last_id:
                reset, last_id = True, None
        start = self.cursor if last_id is None else last_id
        stream = Stream(self, request, filters, start, self.config.buffer_bytes)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        cast(Request, request).registerProducer(stream, True)
        self._streams.add(stream)
        request.write(b"retry: %d\n\n" % self.config.retry_ms)
        if reset:
            request.write(
                control(
                    "reset",
                    start,
                    {"reason": "the events after Last-Event-ID are gone; reload"},
                )
            )
        elif last_id is not None:
            replaying = ensureDeferred(stream.replay())

            def failed(failure: Failure) -> None:
                _log.warn("replay failed", error=failure.getErrorMessage())
                stream.close()

            replaying.addErrback(failed)
        return stream
