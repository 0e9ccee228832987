"""The change feed's background work, and its place in the stop order."""

from __future__ import annotations

import structlog
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime

from optiinfra.events.feed import Feed
from optiinfra.events.record import Recorder
from optiinfra.registry.loops import Every

_log = structlog.get_logger("optiinfra.events")


class FeedReader(Every):
    """Starts the feed, then reads the log every poll interval: how events
    recorded by other replicas reach this one's clients."""

    def __init__(self, feed: Feed, clock: IReactorTime) -> None:
        super().__init__("events", feed.config.poll_interval, clock)
        self._feed = feed
        self._started: Deferred[None] | None = None

    def startService(self) -> None:
        self._started = ensureDeferred(self._feed.start())
        self._started.addErrback(
            lambda failure: _log.error(
                "change feed could not start; retrying",
                error=failure.getErrorMessage(),
            )
        )
        super().startService()

    async def run_once(self) -> None:
        if self._feed.stopped:
            return
        if not self._feed.running:
            if self._started is not None and not self._started.called:
                return
            self._started = ensureDeferred(self._feed.start())
            self._started.addErrback(lambda _: None)  # logged at the next try
            return
        self._feed.wake()


class EventPurge(Every):
    """Forgets events older than the retention: the window clients resume in."""

    def __init__(
        self,
        recorder: Recorder,
        feed: Feed,
        clock: IReactorTime,
        retention: float,
        interval: float = 60.0,
    ) -> None:
        super().__init__("event-purge", interval, clock)
        self._recorder = recorder
        self._feed = feed
        self._clock = clock
        self._retention = retention

    async def run_once(self) -> None:
        try:
            purged = await self._feed.log.purge(self._clock.seconds() - self._retention)
        except Exception as error:
            _log.warn("old events not purged", error=str(error))
            return
        if purged:
            _log.info("old events purged", count=purged)

    def stopService(self) -> Deferred[None]:
        # Events of the last changes are written before the store closes.
        stopped = super().stopService()
        return stopped.addCallback(lambda _: ensureDeferred(self._recorder.idle()))


class StreamsEnd(Service):
    """
    Placed after the HTTP service, so it stops before it: every stream ends
    cleanly at once and the drain never waits for streams, which would not
    end on their own.
    """

    name = "event-streams"

    def __init__(self, feed: Feed) -> None:
        self._feed = feed

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._feed.streams:
            _log.info("ending change feed streams", streams=self._feed.streams)
        self._feed.stop()
        return succeed(None)
