"""The router as a service: housekeeping on a timer, and a drain on stop."""

from __future__ import annotations

from contextlib import suppress

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime

from optiinfra.registry.loops import Every
from optiinfra.routing.router import Router
from optiinfra.store.interface import StoreUnavailable


class RouterService(Every):
    """
    Every C{interval}: renew leases, purge old results, count the queue and
    look for work.  On stop: calls in flight get C{grace} seconds, then go
    back to the queue for the next start or another replica.
    """

    def __init__(
        self, router: Router, clock: IReactorTime, interval: float, grace: float
    ) -> None:
        super().__init__("task-router", interval, clock)
        self.router = router
        self._grace = grace

    async def run_once(self) -> None:
        # A lost store is the store watch's to report; try again next time.
        with suppress(StoreUnavailable):
            await self.router.housekeeping()

    def stopService(self) -> Deferred[None]:
        stopped = super().stopService()

        async def drain() -> None:
            await stopped
            await self.router.drain(self._grace)

        return ensureDeferred(drain())
