"""
The embedded backend: one SQLite file under the state directory.

SQLite allows one writer at a time, so one dedicated thread owns the one
connection and runs every unit of work in turn; the reactor thread never waits on
the database.  WAL mode lets readers outside this process (backups, sqlite3 CLI)
look without blocking it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import structlog
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from optiinfra.store.interface import (
    IBackend,
    StoreUnavailable,
    Transaction,
)
from optiinfra.store.interface import (
    stop_pool as _stop_pool,
)
from optiinfra.store.schema import migrate

T = TypeVar("T")

_log = structlog.get_logger("optiinfra.store")

#: Units of work committed together at most.
_MAX_BATCH = 256


class _SQLiteTransaction:
    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._connection.execute(sql, params).fetchall()

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._connection.executemany(sql, rows)


@implementer(IBackend)
class SQLiteBackend:
    name = "sqlite"

    def __init__(self, path: Path, reactor: IReactorThreads) -> None:
        self.path = path
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="sqlite")
        self._connection: sqlite3.Connection | None = None
        self._queue: list[tuple[Callable[[Transaction], Any], Deferred[Any]]] = []
        self._pumping = False

    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit that was answered survives a power cut, not just a
            # crash; group commit keeps the cost per heartbeat small.
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("PRAGMA busy_timeout=5000")
        except (OSError, sqlite3.Error) as error:
            raise StoreUnavailable(f"cannot open {self.path}: {error}") from error
        self._connection = connection
        applied = self._transaction(migrate, True)
        if applied:
            _log.info("schema migrated", backend=self.name, versions=applied)

    def start(self) -> None:
        self._pool.start()

    def _transaction(self, work: Callable[[Transaction], T], write: bool) -> T:
        connection = self._connection
        if connection is None:
            raise StoreUnavailable("the SQLite store is closed")
        try:
            connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                result = work(_SQLiteTransaction(connection))
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
        except sqlite3.OperationalError as error:
            raise StoreUnavailable(str(error)) from error
        return result

    def run(self, work: Callable[[Transaction], T], write: bool = True) -> Deferred[T]:
        """
        Queue C{work}; the writer thread runs everything queued meanwhile in
        one transaction, each unit in a savepoint of its own.

        One commit (one fsync) then answers many callers: group commit, the
        only way an embedded database keeps up with a busy orchestrator.  A
        unit that raises rolls back to its savepoint alone.
        """
        done: Deferred[T] = Deferred()
        self._queue.append((work, done))
        if not self._pumping:
            self._pumping = True
            self._pump()
        return done

    def _pump(self) -> None:
        batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
        ran = deferToThreadPool(
            self._reactor, self._pool, self._batch, [work for work, _ in batch]
        )

        def deliver(outcomes: list[tuple[bool, Any]]) -> None:
            for (_, done), (ok, value) in zip(batch, outcomes, strict=True):
                if ok:
                    done.callback(value)
                else:
                    done.errback(Failure(value))

        def fail_all(failure: Failure) -> None:
            for _, done in batch:
                done.errback(failure)

        def next_batch(_: object) -> None:
            if self._queue:
                self._pump()
            else:
                self._pumping = False

        ran.addCallbacks(deliver, fail_all).addBoth(next_batch)

    def _batch(
        self, works: list[Callable[[Transaction], Any]]
    ) -> list[tuple[bool, Any]]:
        if len(works) == 1:  # no savepoint needed
            try:
                return [(True, self._transaction(works[0], True))]
            except Exception as error:
                return [(False, error)]

        def each(tx: Transaction) -> list[tuple[bool, Any]]:
            outcomes: list[tuple[bool, Any]] = []
            for work in works:
                tx.execute("SAVEPOINT unit")
                try:
                    outcomes.append((True, work(tx)))
                except sqlite3.OperationalError:
                    raise  # the database itself failed: the whole batch does
                except Exception as error:
                    tx.execute("ROLLBACK TO unit")
                    outcomes.append((False, error))
                tx.execute("RELEASE unit")
            return outcomes

        return self._transaction(each, True)

    def in_list(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        marks = ", ".join("?" * len(values))
        return f"{column} IN ({marks})", list(values)

    def lock_suffix(self) -> str:
        return ""  # BEGIN IMMEDIATE already holds the only write lock

    def close(self) -> Deferred[None]:
        def finish() -> None:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

        if not self._pool.started:  # never started, or closed already
            finish()
            return succeed(None)

        closing: Deferred[None] = deferToThreadPool(
            self._reactor,
            self._pool,
            finish,
        )
        return closing.addBoth(_stop_pool, self._pool)

    def agent_documents_sql(self, where: str) -> str:
        stamp = "strftime('%Y-%m-%dT%H:%M:%fZ', {}, 'unixepoch')"
        return (
            "SELECT COUNT(*), COALESCE(json_group_array(json(doc)), '[]') FROM ("
            " SELECT json_object("
            "'id', id, 'name', name, 'type', type, 'host', host, 'port', port,"
            " 'capabilities', json(capabilities),"
            " 'status', CASE WHEN last_seen < ? THEN 'unreachable' ELSE status END,"
            " 'version', version, 'registered_at', COALESCE(registered_at_text,"
            f" {stamp.format('registered_at')}),"
            " 'last_seen', COALESCE(last_seen_text,"
            f" {stamp.format('last_seen')}),"
            " 'metadata', json(metadata), 'endpoint', endpoint,"
            " 'health_check_endpoint', health_check_endpoint) AS doc"
            f" FROM agents WHERE {where} ORDER BY id)"
        )

    def has_capabilities(self, wanted: Sequence[str]) -> tuple[str, list[Any]]:
        condition = " AND ".join(
            "EXISTS (SELECT 1 FROM json_each(capabilities) WHERE value = ?)"
            for _ in wanted
        )
        return condition or "1 = 1", list(wanted)
