"""The event log on both backends: ids in commit order, reads after an id, purges."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet.defer import gatherResults

from optiinfra.store.events import EventLog, NewEvent, Window


def event(n: int, at: float = 1000.0) -> NewEvent:
    return NewEvent(
        at=at,
        topic="agents",
        kind="registered",
        labels={"agent_type": "cost", "n": str(n)},
        document=b'{"n":%d}' % n,
    )


@pytest_twisted.ensureDeferred
async def test_appended_events_read_back_in_order(open_store: Any) -> None:
    log = EventLog(open_store().backend)
    assert await log.window() == Window(0, 0)
    assert await log.append([event(1), event(2)]) == [1, 2]
    assert await log.append([event(3)]) == [3]
    read = await log.after(0, 10)
    assert [e.id for e in read] == [1, 2, 3]
    assert read[0].document == b'{"n":1}'
    assert read[0].labels == {"agent_type": "cost", "n": "1"}
    assert [e.id for e in await log.after(1, 1)] == [2]
    assert await log.window() == Window(3, 0)


@pytest_twisted.ensureDeferred
async def test_two_writers_on_one_database_never_share_or_skip_an_id(
    open_store: Any,
) -> None:
    first, second = EventLog(open_store().backend), EventLog(open_store().backend)
    written = await gatherResults(
        [(first, second)[n % 2].append([event(n), event(n)]) for n in range(40)]
    )
    ids = sorted(i for batch in written for i in batch)
    assert ids == list(range(1, 81))
    assert all(batch[1] == batch[0] + 1 for batch in written)
    assert [e.id for e in await first.after(0, 100)] == ids


@pytest_twisted.ensureDeferred
async def test_purge_forgets_the_old_and_remembers_where(open_store: Any) -> None:
    log = EventLog(open_store().backend)
    await log.append([event(1, at=10.0), event(2, at=20.0)])
    await log.append([event(3, at=30.0)])
    assert await log.purge(25.0) == 2
    assert await log.purge(25.0) == 0
    assert [e.id for e in await log.after(0, 10)] == [3]
    assert await log.window() == Window(3, 2)
    assert await log.append([event(4, at=40.0)]) == [4]  # ids never go back
