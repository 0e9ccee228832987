"""The registry's background work: the sweep, and watching the store."""

from __future__ import annotations

import structlog
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from optiinfra.readiness import Readiness
from optiinfra.registry.service import Registry
from optiinfra.store.interface import IStore, StoreUnavailable

_log = structlog.get_logger("optiinfra.registry")

#: Seconds this host's clock may differ from the database's and be ready.
MAX_CLOCK_SKEW = 1.0


class Every(Service):
    """
    Run an async job every C{interval} seconds on C{clock}; a failure is logged
    and the loop goes on (a plain LoopingCall would stop for good).
    """

    def __init__(self, name: str, interval: float, clock: IReactorTime) -> None:
        self.name = name
        self._interval = interval
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._running: Deferred[None] | None = None

    async def run_once(self) -> None:
        raise NotImplementedError

    def _tick(self) -> Deferred[None]:
        self._running = ensureDeferred(self.run_once())
        self._running.addErrback(
            lambda failure: _log.failure(  # pragma: no cover - run_once catches
                "background job failed", failure, job=self.name
            )
        )
        return self._running

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=True)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        running, self._running = self._running, None
        if running is None or running.called:
            return succeed(None)
        return running


class Sweeper(Every):
    """Marks silent agents unreachable and removes long-silent ones."""

    def __init__(self, registry: Registry, clock: IReactorTime) -> None:
        super().__init__("registry-sweep", registry.config.sweep_interval, clock)
        self._registry = registry

    async def run_once(self) -> None:
        try:
            await self._registry.sweep()
        except StoreUnavailable as error:
            _log.warn("sweep skipped: store unavailable", error=str(error))


class StoreWatch(Every):
    """Pings the store; while it does not answer, the process is not ready."""

    def __init__(
        self, store: IStore, readiness: Readiness, clock: IReactorTime, interval: float
    ) -> None:
        super().__init__("store-watch", interval, clock)
        self._store = store
        self._readiness = readiness
        self._failing: str | None = None
        self._skewed = False

    async def run_once(self) -> None:
        try:
            await self._store.ping()
        except StoreUnavailable as error:
            if self._failing is None:
                _log.error("store unavailable", error=str(error))
            self._failing = str(error) or "unavailable"
            self._readiness.set_failing("store", self._failing)
        else:
            if self._failing is not None:
                _log.info("store available again")
            self._failing = None
            self._readiness.set_failing("store", None)
            self._check_clock(self._store.backend.clock_offset)

    def _check_clock(self, offset: float) -> None:
        """
        Not ready while this host's clock is more than L{MAX_CLOCK_SKEW} off
        the database's: leases are corrected for it, but task deadlines and
        approval expiries are read with this host's clock.
        """
        skewed = abs(offset) > MAX_CLOCK_SKEW
        if skewed and not self._skewed:
            _log.error(
                "this host's clock is off the database's",
                offset_seconds=round(offset, 3),
                limit_seconds=MAX_CLOCK_SKEW,
            )
        elif self._skewed and not skewed:
            _log.info("this host's clock agrees with the database's again")
        self._skewed = skewed
        self._readiness.set_failing(
            "clock",
            f"{offset:+.3f} s off the database's clock" if skewed else None,
        )


class StoreService(Service):
    """
    Starts the store's threads with the service tree and closes the store when
    the process stops (after everything that uses it).
    """

    name = "store"

    def __init__(self, store: IStore) -> None:
        self._store = store

    def startService(self) -> None:
        super().startService()
        self._store.backend.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self._store.backend.close()
