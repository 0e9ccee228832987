"""
The shared backend: PostgreSQL, for several orchestrator replicas.

psycopg's blocking API runs in a small thread pool, each unit of work on a
connection borrowed from a psycopg_pool pool; the reactor thread never waits on
the network.  A connection that breaks is dropped by the pool and the call fails
with L{StoreUnavailable}, which the HTTP layer turns into a 503.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import orjson
import psycopg
import structlog
from psycopg_pool import ConnectionPool, PoolTimeout
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from optiinfra.store.barrier import Barriers
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

#: Serialises schema migrations between replicas starting at the same time.
_MIGRATION_LOCK = 0x6F707469  # "opti"


class _PostgresTransaction:
    def __init__(self, connection: psycopg.Connection[tuple[Any, ...]]) -> None:
        self._connection = connection

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cursor = self._connection.execute(sql.replace("?", "%s"), params)
        return cursor.fetchall() if cursor.description is not None else []

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._connection.cursor() as cursor:
            cursor.executemany(sql.replace("?", "%s"), rows)


@implementer(IBackend)
class PostgresBackend:
    name = "postgresql"

    def __init__(
        self,
        url: str,
        reactor: IReactorThreads,
        max_connections: int = 4,
        connect_timeout: float = 5.0,
    ) -> None:
        self._reactor = reactor
        self._threads = ThreadPool(
            minthreads=1, maxthreads=max_connections, name="postgres"
        )
        self._connections = ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            open=False,
            timeout=connect_timeout,
            kwargs={"connect_timeout": max(1, int(connect_timeout))},
            name="optiinfra",
        )
        self._connect_timeout = connect_timeout
        self._barriers = Barriers(self._barrier)

    def open(self) -> None:
        try:
            self._connections.open(wait=True, timeout=self._connect_timeout)
        except (PoolTimeout, psycopg.Error) as error:
            self._connections.close()
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {error}") from error

        def migrate_locked(tx: Transaction) -> list[int]:
            tx.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
            return migrate(tx)

        applied = self._transaction(migrate_locked)
        if applied:
            _log.info("schema migrated", backend=self.name, versions=applied)

    def start(self) -> None:
        self._threads.start()

    def _transaction(self, work: Callable[[Transaction], T]) -> T:
        try:
            with self._connections.connection() as connection:
                return work(_PostgresTransaction(connection))
        except (PoolTimeout, psycopg.OperationalError) as error:
            raise StoreUnavailable(
                str(error).strip() or type(error).__name__
            ) from error

    def run(self, work: Callable[[Transaction], T], write: bool = True) -> Deferred[T]:
        return deferToThreadPool(
            self._reactor,
            self._threads,
            self._transaction,
            work,
        )

    def run_relaxed(self, work: Callable[[Transaction], T]) -> Deferred[T]:
        """
        As L{run}, but answered before the commit is flushed to the server's
        disk (C{synchronous_commit} off for this transaction only): a server
        crash within a fraction of a second may undo it, never half of it and
        never without what was committed after it.  For work that is redone
        anyway when it is lost.
        """

        def relaxed(tx: Transaction) -> T:
            tx.execute("SET LOCAL synchronous_commit TO OFF")
            return work(tx)

        return self.run(relaxed)

    def sync(self) -> Deferred[None]:
        """
        Fires once every commit so far, relaxed ones too, is on disk.

        PostgreSQL flushes the log at a commit only when the transaction wrote
        to it (an id alone is not enough: such a commit is not waited for).
        The barrier therefore changes a row, with C{synchronous_commit} on:
        its commit waits for the log to be flushed up to its own commit
        record, and so past every commit made before it.  Callers arriving
        while a barrier runs share the next one (L{Barriers}).
        """
        return self._barriers.wait()

    def _barrier(self) -> Deferred[None]:
        def barrier(tx: Transaction) -> None:
            tx.execute("SET LOCAL synchronous_commit TO ON")
            tx.execute("UPDATE store_sync SET flushes = flushes + 1 WHERE id = 1")

        return self.run(barrier)

    def in_list(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        return f"{column} = ANY(?)", [list(values)]

    def lock_suffix(self) -> str:
        return " FOR UPDATE"

    def close(self) -> Deferred[None]:
        def finish() -> None:
            self._connections.close()

        if not self._threads.started:  # never started, or closed already
            finish()
            return succeed(None)

        closing: Deferred[None] = deferToThreadPool(
            self._reactor,
            self._threads,
            finish,
        )
        return closing.addBoth(_stop_pool, self._threads)

    def agent_documents_sql(self, where: str) -> str:
        # Concatenated as text: capabilities and metadata are stored as JSON
        # already (written by orjson), so they are spliced in rather than parsed
        # again by json_build_object.  A third faster for 10,000 agents.
        stamp = (
            "to_json(COALESCE({0}_text, to_char(to_timestamp({0}) AT TIME ZONE 'UTC',"
            ' \'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"\')))::text'
        )

        def text(column: str) -> str:
            return f"COALESCE(to_json({column})::text, 'null')"

        return (
            "SELECT COUNT(*), '[' || COALESCE(string_agg(doc, ',' ORDER BY id), '')"
            " || ']' FROM (SELECT id,"
            f" '{{\"id\":' || {text('id')} || ',\"name\":' || {text('name')}"
            f" || ',\"type\":' || {text('type')} || ',\"host\":' || {text('host')}"
            " || ',\"port\":' || port || ',\"capabilities\":' || capabilities"
            " || ',\"status\":' || to_json(CASE WHEN last_seen < ?"
            " THEN 'unreachable' ELSE status END)::text"
            f" || ',\"version\":' || {text('version')}"
            f" || ',\"registered_at\":' || {stamp.format('registered_at')}"
            f" || ',\"last_seen\":' || {stamp.format('last_seen')}"
            " || ',\"metadata\":' || metadata"
            f" || ',\"endpoint\":' || {text('endpoint')}"
            " || ',\"health_check_endpoint\":' || "
            f"{text('health_check_endpoint')} || '}}' AS doc"
            f" FROM agents WHERE {where}) AS listed"
        )

    def has_capabilities(self, wanted: Sequence[str]) -> tuple[str, list[Any]]:
        if not wanted:
            return "TRUE", []
        return "capabilities::jsonb @> ?::jsonb", [orjson.dumps(list(wanted)).decode()]
