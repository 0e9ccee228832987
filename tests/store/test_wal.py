"""The embedded store's write-ahead log stays bounded under steady writes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.task import deferLater

from optiinfra.routing.model import COMPLETED, IN_FLIGHT
from optiinfra.store.sql import SQLStore
from optiinfra.store.sqlite import SQLiteBackend
from optiinfra.store.tasks import _IS_IN_FLIGHT, _IS_WAITING, Claim

from .test_store import a_task

#: Small, so that a few seconds of writes pass it many times over.
RESTART = 256 * 1024


@pytest_twisted.ensureDeferred
async def test_the_log_is_truncated_while_writes_never_stop(tmp_path: Path) -> None:
    """
    Tasks created and completed without a pause, as a busy orchestrator does,
    for 3 s: the log passes its restart size many times and is truncated each
    time, so once writes pause it is back under its restart size.  A passive
    checkpoint alone never caught up here: the log only ever grew (tens of MB
    in these 3 s), and kept its size after.
    """
    backend = SQLiteBackend(tmp_path / "db", reactor, wal_restart_bytes=RESTART)
    backend.open()
    backend.start()
    store = SQLStore(backend, reactor)
    limit = DeferredSemaphore(32)
    largest = 0
    written = 0

    async def one(number: int) -> None:
        nonlocal largest, written
        task = a_task(number, id=f"task-{number:08d}", parameters={"pad": "x" * 400})
        claim = Claim("agent-1", "me", 1e12, "sent to agent-1")
        await store.tasks.create_task(task, claim, durable=False)
        await store.tasks.change_task(
            task.id, IN_FLIGHT, COMPLETED, 101.0, durable=False
        )
        written += 1
        largest = max(largest, backend.wal_bytes())

    until = time.monotonic() + 3.0
    number = 0
    batch: list[Deferred[None]] = []
    while time.monotonic() < until:
        for _ in range(64):
            number += 1
            batch.append(limit.run(lambda n=number: Deferred.fromCoroutine(one(n))))
        await gatherResults(batch)
        batch.clear()
    await deferLater(reactor, 0.6, lambda: None)  # one more checkpoint
    after = backend.wal_bytes()
    await backend.close()
    # Enough writes to have grown the log far past the bound without the fix.
    assert written * 4096 > 20 * RESTART, written
    assert largest < 64 * 1024 * 1024, (largest, written)
    assert after < RESTART, (after, largest, written)
    # Nothing written was lost by the truncations.
    reopened = SQLiteBackend(tmp_path / "db", reactor)
    reopened.open()
    reopened.start()
    rows = await reopened.run(
        lambda tx: tx.execute("SELECT COUNT(*), MIN(status), MAX(status) FROM tasks")
    )
    await reopened.close()
    assert rows == [(written, COMPLETED, COMPLETED)]


def test_the_log_limit_is_set_on_the_connection(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "db", reactor)
    backend.open()
    assert backend._connection is not None
    [(limit,)] = backend._connection.execute("PRAGMA journal_size_limit").fetchall()
    assert limit == 64 * 1024 * 1024
    backend._connection.close()


def test_the_queue_queries_use_the_partial_indexes(tmp_path: Path) -> None:
    """
    The waiting and finished indexes hold only the tasks their queries look
    for, so a task created already sent, or completed, writes no page of the
    waiting index; the queries must still find them by those indexes.
    """
    backend = SQLiteBackend(tmp_path / "db", reactor)
    backend.open()
    connection = backend._connection
    assert connection is not None
    due = (
        f"SELECT id FROM tasks WHERE {_IS_WAITING} AND not_before <= ?"  # noqa: S608
        " AND deadline > ? AND agent_type IN (?) ORDER BY priority DESC,"
        " created_at, id LIMIT ?"
    )
    purge = "SELECT id FROM tasks WHERE completed_at < ? ORDER BY completed_at"
    lost = f"SELECT id FROM tasks WHERE {_IS_IN_FLIGHT} AND lease_until < ?"  # noqa: S608
    plans = [
        " ".join(row[3] for row in connection.execute(f"EXPLAIN QUERY PLAN {q}", p))
        for q, p in ((due, (1, 1, "cost", 1)), (purge, (1,)), (lost, (1,)))
    ]
    connection.close()
    assert "USING INDEX tasks_waiting" in plans[0]
    assert "TEMP B-TREE" not in plans[0]
    assert "USING INDEX tasks_finished" in plans[1]
    assert "USING INDEX tasks_in_flight" in plans[2]
