"""
The PostgreSQL backend's deadlines, on a cluster of the test's own that is
frozen (SIGSTOP): every unit of work is answered by its deadline, queued ones
too; the store is then known down and refuses work at once, and comes back
with the first ping after the database does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList

from optiinfra.store.interface import DatabaseLost, StoreUnavailable, Transaction
from optiinfra.store.postgres import PostgresBackend

from ..pgcluster import PrivateCluster, private_cluster  # noqa: F401 - a fixture


def one(tx: Transaction) -> int:
    [(value,)] = tx.execute("SELECT 1")
    return int(value)


@pytest_twisted.async_yield_fixture
async def backend(
    private_cluster: PrivateCluster,  # noqa: F811 - the fixture
) -> AsyncIterator[PostgresBackend]:
    opened = PostgresBackend(
        private_cluster.url, reactor, max_connections=1, timeout=1.0, max_waiting=3
    )
    opened.open()
    opened.start()
    yield opened
    private_cluster.thaw()
    await opened.close()


@pytest_twisted.ensureDeferred
async def test_frozen_work_is_answered_by_its_deadline_queued_work_too(
    backend: PostgresBackend,
    private_cluster: PrivateCluster,  # noqa: F811 - the fixture
) -> None:
    assert await backend.run(one) == 1
    private_cluster.freeze()
    # one thread: the first unit runs (and hangs), the next two wait for it
    waiting = [backend.run(one) for _ in range(3)]
    with pytest.raises(StoreUnavailable, match="too much work waiting"):
        await backend.run(one)
    results = await DeferredList(waiting, consumeErrors=True)
    assert [ok for ok, _ in results] == [False] * 3
    assert all(failure.check(DatabaseLost) for _, failure in results)
    assert backend.down is not None
    with pytest.raises(DatabaseLost, match="the database is down"):
        await backend.run(one)  # at once, while it is known down
    private_cluster.thaw()
    for _ in range(20):
        try:
            await backend.ping()
            break
        except StoreUnavailable:
            continue
    assert backend.down is None
    assert await backend.run(one) == 1  # on a new connection
