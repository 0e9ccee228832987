"""
Keeping this replica's leases on its tasks in flight, through a drain too.

A lease is how long a replica's claim on a task in flight lasts unless it is
renewed; past it, any replica takes the task back and sends it again.  So the
claim must be renewed for as long as the call is open (a drain included), and a
replica that cannot renew (its database is lost) must end its calls before
the lease it last renewed lapses: else the task would be out twice at once.
"""

from __future__ import annotations

import structlog
from twisted.internet.interfaces import IReactorTime

from optiinfra.registry.loops import Every
from optiinfra.routing.router import Router
from optiinfra.store.interface import StoreUnavailable

_log = structlog.get_logger("optiinfra.routing")


class LeaseKeeper(Every):
    """
    Every C{every} seconds, renew the leases of the calls in flight.  While
    renewals fail, cut the calls short one renewal and one C{store_timeout}
    before the last lease renewed would lapse (their tasks are then taken
    back, by this replica or another, once it has).
    """

    def __init__(
        self, router: Router, clock: IReactorTime, every: float, store_timeout: float
    ) -> None:
        super().__init__("task-leases", every, clock)
        self._router = router
        self._clock = clock
        self._every = every
        self._store_timeout = store_timeout
        self._held_until = clock.seconds() + router.config.lease

    async def run_once(self) -> None:
        asked = self._clock.seconds()
        try:
            await self._router.renew()
        except StoreUnavailable as error:
            margin = self._every + self._store_timeout
            if self._router.in_flight and asked + margin >= self._held_until:
                _log.error(
                    "leases could not be renewed: ending the calls in flight",
                    calls=self._router.in_flight,
                    error=str(error),
                )
                self._router.give_up_calls()
        else:
            self._held_until = asked + self._router.config.lease
