"""Services that start in order and stop in reverse, one at a time."""

from __future__ import annotations

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred


class OrderedServices(MultiService):
    """
    A MultiService whose children stop one after another, last first.

    Twisted's own stops them all at once; the orchestrator needs the HTTP
    drain to finish before the loops it calls stop, and those before the store
    closes.
    """

    def stopService(self) -> Deferred[None]:
        self.running = 0
        return ensureDeferred(self._stop_in_turn())

    async def _stop_in_turn(self) -> None:
        children: list[IService] = list(self)
        for child in reversed(children):
            await maybeDeferred(child.stopService)
