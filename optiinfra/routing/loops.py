"""The router as a service: housekeeping on a timer, and a drain on stop."""

from __future__ import annotations

from contextlib import suppress

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime

from optiinfra.registry.loops import Every
from optiinfra.routing.leases import LeaseKeeper
from optiinfra.routing.router import Router
from optiinfra.settings import RENEW_EVERY
from optiinfra.store.interface import StoreUnavailable


class RouterService(Every):
    """
    Every C{interval}: purge old results, count the queue and look for work;
    the leases are renewed by a L{LeaseKeeper} of their own, which goes on
    through the drain.  On stop: calls in flight get C{grace} seconds, then
    go back to the queue for the next start or another replica.
    """

    def __init__(
        self,
        router: Router,
        clock: IReactorTime,
        interval: float,
        grace: float,
        store_timeout: float = 5.0,
    ) -> None:
        super().__init__("task-router", interval, clock)
        self.router = router
        self._grace = grace
        self._leases = LeaseKeeper(router, clock, RENEW_EVERY, store_timeout)

    def startService(self) -> None:
        super().startService()
        self._leases.startService()

    async def run_once(self) -> None:
        # A lost store is the store watch's to report; try again next time.
        with suppress(StoreUnavailable):
            await self.router.housekeeping()

    def stopService(self) -> Deferred[None]:
        stopped = super().stopService()

        async def drain() -> None:
            await stopped
            await self.router.drain(self._grace)
            await self._leases.stopService()  # the last call has ended

        return ensureDeferred(drain())
