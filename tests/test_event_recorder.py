"""The recorder's stop when the store refuses at once (as one known down does)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest_twisted
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from optiinfra.events.record import Recorder
from optiinfra.store.events import NewEvent
from optiinfra.store.interface import StoreUnavailable


class DownLog:
    """An event log on a store known to be down: every append fails at once."""

    def __init__(self) -> None:
        self.tries = 0

    def append(self, events: Sequence[NewEvent]) -> Deferred[list[int]]:
        self.tries += 1
        return fail(StoreUnavailable("the store is down"))


@pytest_twisted.ensureDeferred
async def test_idle_ends_when_every_write_fails_at_once() -> None:
    """
    A write that failed before its callbacks were added left the recorder
    thinking it was still writing, and idle() (awaited at every stop) spun
    forever: a process stopping while its database was down never exited.
    """
    log = DownLog()
    clock = Clock()
    recorder = Recorder(log, clock)  # type: ignore[arg-type]
    for number in range(3):
        recorder.record("tasks", "status_changed", {"task_id": str(number)}, {})
    clock.advance(0)  # the flush: its write fails at once
    assert log.tries == 1
    # Nothing is being written any more (else idle() below would spin forever).
    assert recorder._writing is None
    await recorder.idle()
    assert log.tries >= 1
    recorder.record("tasks", "status_changed", {"task_id": "late"}, {})
    clock.advance(0)
    await recorder.idle()
