"""
An agent's answer kept while the store cannot record it.

The answer is the work an agent did; thrown away because the database was out
for a moment, the task would be sent again once its lease lapsed.  Instead the
recording is tried again until the store takes it, for as long as the lease
the task was held under could still cover it: the record itself is a
compare-and-set on this replica's claim, so one that comes too late (the task
was taken back meanwhile) changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from optiinfra.store.interface import StoreUnavailable

#: Seconds between tries to record an answer.
RETRY_EVERY = 0.5


async def record_until_stored(
    record: Callable[[], Coroutine[Any, Any, None]],
    clock: IReactorTime,
    until: float,
    give_up: Callable[[], bool] = lambda: False,
) -> None:
    """
    C{record()}; while the store is unavailable, again every L{RETRY_EVERY}
    seconds until C{until} (or until C{give_up()} says to stop, as a process
    that is stopping does); then the last failure is raised.
    """
    while True:
        try:
            await record()
        except StoreUnavailable:
            if give_up() or clock.seconds() + RETRY_EVERY >= until:
                raise
            await deferLater(clock, RETRY_EVERY)
        else:
            return
