"""Coordination's background work: approval expiry, and plans kept moving."""

from __future__ import annotations

from contextlib import suppress

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime

from optiinfra.coordination.service import Coordinator
from optiinfra.registry.loops import Every
from optiinfra.store.interface import StoreUnavailable


class CoordinationService(Every):
    """
    Every C{interval}: record expired approvals, move every active plan along
    (plans whose tasks ended in another replica, or before a restart), and
    forget coordinations older than C{retention} with nothing left to do.
    On stop, the passes under way finish; plans themselves live in the store.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        clock: IReactorTime,
        interval: float,
        retention: float,
    ) -> None:
        super().__init__("coordination", interval, clock)
        self._coordinator = coordinator
        self._retention = retention

    async def run_once(self) -> None:
        # A lost store is the store watch's to report; try again next time.
        with suppress(StoreUnavailable):
            await self._coordinator.expire_due()
            await self._coordinator.executor.reconcile()
            await self._coordinator.purge(self._retention)

    def stopService(self) -> Deferred[None]:
        stopped = super().stopService()

        async def finish() -> None:
            await stopped
            await self._coordinator.executor.idle()

        return ensureDeferred(finish())
