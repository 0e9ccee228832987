"""
The shared backend: PostgreSQL, for several orchestrator replicas.

psycopg's blocking API runs on a few threads of our own, each with one
connection of its own; the reactor thread never waits on the network.

Every unit of work is bounded by C{timeout} (C{STORE_TIMEOUT}) from the moment
it is asked for, whatever the database does: queued work not started by then
is dropped; a unit still running has its connection's socket shut, which ends
the thread's wait even on a server that is frozen (a stopped process, a
stalled disk: the kernel still acknowledges, so keepalives alone never fire).
The caller hears L{StoreUnavailable} at the deadline, and the HTTP layer turns
it into a 503.

A unit that fails for want of the database (no connection, a broken one, the
deadline) marks the store I{down}: until a L{ping} succeeds again, work fails
at once instead of queueing.  A thread reconnects on its next unit after that,
so once PostgreSQL accepts connections again the next ping (every second, by
the store watch) brings the store back.
"""

from __future__ import annotations

import math
import os
import queue
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar, cast

import orjson
import psycopg
import structlog
from psycopg.conninfo import conninfo_to_dict
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from optiinfra.store.barrier import Barriers
from optiinfra.store.interface import (
    DatabaseLost,
    IBackend,
    StoreUnavailable,
    Transaction,
)
from optiinfra.store.schema import migrate

T = TypeVar("T")

_log = structlog.get_logger("optiinfra.store")

#: Serialises schema migrations between replicas starting at the same time.
_MIGRATION_LOCK = 0x6F707469  # "opti"
#: Units waiting for a thread at most, past which work is refused at once.
MAX_WAITING: Final = 1000


def connection_options(url: str, timeout: float) -> dict[str, Any]:
    """
    libpq options bounding every wait by C{timeout}: connecting, each
    statement (on the server), and a peer gone from the network (keepalives,
    and unacknowledged data after C{tcp_user_timeout}).  Server options the
    URL sets are kept.
    """
    whole = max(1, math.ceil(timeout))
    given = conninfo_to_dict(url).get("options")
    server = f"-c statement_timeout={int(timeout * 1000)}"
    return {
        "connect_timeout": max(2, whole),  # libpq's least
        "keepalives": 1,
        "keepalives_idle": max(1, whole // 2),
        "keepalives_interval": 1,
        "keepalives_count": max(1, whole // 2),
        "tcp_user_timeout": int(timeout * 1000),
        "options": f"{given} {server}" if given else server,
    }


class _PostgresTransaction:
    def __init__(self, connection: psycopg.Connection[tuple[Any, ...]]) -> None:
        self._connection = connection

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cursor = self._connection.execute(sql.replace("?", "%s"), params)
        return cursor.fetchall() if cursor.description is not None else []

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._connection.cursor() as cursor:
            cursor.executemany(sql.replace("?", "%s"), rows)


class _Job:
    """One unit of work, from its request to its answer or its deadline."""

    def __init__(self, work: Callable[[Transaction], Any]) -> None:
        self.work = work
        self.answer: Deferred[Any] = Deferred()
        self.timer: IDelayedCall | None = None
        self._lock = threading.Lock()
        #: queued, running, expired or done
        self.state = "queued"
        self.connection: psycopg.Connection[tuple[Any, ...]] | None = None

    def begin(self, connection: psycopg.Connection[tuple[Any, ...]] | None) -> bool:
        """On the thread: whether to run it (not expired while it waited)."""
        with self._lock:
            if self.state != "queued":
                return False
            self.state = "running"
            self.connection = connection
            return True

    def attach(self, connection: psycopg.Connection[tuple[Any, ...]]) -> bool:
        """On the thread: the connection made for it; False once it expired."""
        with self._lock:
            self.connection = connection
            return self.state == "running"

    def finish(self) -> bool:
        """On the reactor: whether the answer is still awaited."""
        with self._lock:
            done = self.state in ("queued", "running")
            self.state = "done"
            return done

    def expire(self) -> bool:
        """On the reactor at the deadline: cut it off; whether it was awaited."""
        with self._lock:
            if self.state not in ("queued", "running"):
                return False
            if self.state == "running" and self.connection is not None:
                _shut(self.connection)
            self.state = "expired"
            return True


def _unavailable(error: psycopg.OperationalError, lost: bool) -> StoreUnavailable:
    """The store's word for a database error; C{lost}: the connection with it."""
    message = str(error).strip() or type(error).__name__
    return DatabaseLost(message) if lost else StoreUnavailable(message)


def _broken(connection: psycopg.Connection[tuple[Any, ...]]) -> bool:
    return connection.closed or connection.pgconn.status != psycopg.pq.ConnStatus.OK


def _shut(connection: psycopg.Connection[tuple[Any, ...]]) -> None:
    """End any wait on C{connection}'s socket, from another thread."""
    try:
        fd = connection.pgconn.socket
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, psycopg.Error):
        pass  # closed already


@implementer(IBackend)
class PostgresBackend:
    name = "postgresql"

    def __init__(
        self,
        url: str,
        reactor: IReactorThreads,
        max_connections: int = 4,
        timeout: float = 5.0,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        self._url = url
        self._reactor = reactor
        self._clock = cast(IReactorTime, reactor)
        self._threads_wanted = max_connections
        self.timeout = timeout
        self._options = connection_options(url, timeout)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._waiting = 0
        self._max_waiting = max_waiting
        #: The database's clock less this host's, as of the last ping: leases
        #: are written and compared in the database's time (see TaskStore).
        self.clock_offset = 0.0
        #: Why the store is down, or None while it answers.
        self.down: str | None = None
        #: Bumped when the store goes down: connections made before are dropped.
        self._epoch = 0
        self._closed = False
        self._barriers = Barriers(self._barrier)

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(self._url, autocommit=True, **self._options)

    def open(self) -> None:
        try:
            with self._connect() as connection:

                def migrate_locked(tx: Transaction) -> list[int]:
                    tx.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
                    return migrate(tx)

                with connection.transaction():
                    tx = _PostgresTransaction(connection)
                    applied = migrate_locked(tx)
                    self.clock_offset = self._clock_offset(tx)
        except psycopg.OperationalError as error:
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {error}") from error
        if applied:
            _log.info("schema migrated", backend=self.name, versions=applied)

    def start(self) -> None:
        while len(self._threads) < self._threads_wanted:
            thread = threading.Thread(
                target=self._work, name=f"postgres-{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    # The threads ----------------------------------------------------------------

    def _work(self) -> None:
        connection: psycopg.Connection[tuple[Any, ...]] | None = None
        epoch = self._epoch
        try:
            while (job := self._jobs.get()) is not None:
                if connection is not None and epoch != self._epoch:
                    connection.close()  # made before the store went down
                    connection = None
                if not job.begin(connection):
                    continue
                try:
                    if connection is None:
                        epoch = self._epoch
                        connection = self._connect()
                        if not job.attach(connection):
                            continue
                    result = self._transaction(connection, job.work)
                except BaseException as error:
                    failure = Failure()
                    if connection is not None and _broken(connection):
                        connection.close()
                        connection = None
                    if isinstance(error, psycopg.OperationalError):
                        failure = Failure(_unavailable(error, connection is None))
                    self._reactor.callFromThread(self._deliver, job, failure)
                else:
                    self._reactor.callFromThread(self._deliver, job, result)
        finally:
            if connection is not None:
                connection.close()

    @staticmethod
    def _transaction(
        connection: psycopg.Connection[tuple[Any, ...]],
        work: Callable[[Transaction], T],
    ) -> T:
        with connection.transaction():
            return work(_PostgresTransaction(connection))

    # The reactor's side -----------------------------------------------------------

    def run(self, work: Callable[[Transaction], T], write: bool = True) -> Deferred[T]:
        if self.down is not None:
            return fail(DatabaseLost(f"the database is down: {self.down}"))
        return self._submit(work)

    def ping(self) -> Deferred[None]:
        """
        Whether the database answers, tried even while the store is down: the
        one way it comes back up.  Measures L{clock_offset} on the way.
        """

        pinged = self._submit(self._clock_offset)

        def measured(offset: float) -> None:
            self.clock_offset = offset

        return pinged.addCallback(measured)

    def _clock_offset(self, tx: Transaction) -> float:
        """The database's clock less this host's, read halfway through the query."""
        before = self._clock.seconds()
        [(database,)] = tx.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp())")
        # to 10 ms: below that it is the query's own noise, and leases are seconds
        return round(float(database) - (before + self._clock.seconds()) / 2, 2)

    def _submit(self, work: Callable[[Transaction], T]) -> Deferred[T]:
        if self._closed:
            return fail(StoreUnavailable("the PostgreSQL store is closed"))
        if self._waiting >= self._max_waiting:
            return fail(StoreUnavailable("too much work waiting for the database"))
        job = _Job(work)
        self._waiting += 1
        job.timer = self._clock.callLater(self.timeout, self._expire, job)
        self._jobs.put(job)
        return job.answer

    def _deliver(self, job: _Job, result: Any) -> None:
        if not job.finish():
            return  # answered at its deadline already
        self._waiting -= 1
        if job.timer is not None and job.timer.active():
            job.timer.cancel()
        if isinstance(result, Failure):
            if result.check(DatabaseLost):
                self._went_down(result.getErrorMessage())
            if not job.answer.called:  # else its caller cancelled (hung up)
                job.answer.errback(result)
        else:
            self._came_back()
            if not job.answer.called:
                job.answer.callback(result)

    def _expire(self, job: _Job) -> None:
        if not job.expire():
            return
        self._waiting -= 1
        reason = f"no answer from PostgreSQL within {self.timeout:g} s"
        self._went_down(reason)
        if not job.answer.called:  # else its caller cancelled (hung up)
            job.answer.errback(DatabaseLost(reason))

    def _went_down(self, reason: str) -> None:
        if self.down is None:
            self._epoch += 1
            _log.error("database down", backend=self.name, error=reason)
        self.down = reason

    def _came_back(self) -> None:
        if self.down is not None:
            self.down = None
            _log.info("database available again", backend=self.name)

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

    def close(self) -> Deferred[None]:
        """
        Refuse new work, let the threads finish what is queued (each unit
        bounded by its deadline) and disconnect; fires when they are done, or
        after one more timeout whatever they do (they are daemons: a thread
        stuck in a call never keeps the process alive).
        """
        self._closed = True
        threads, self._threads = self._threads, []
        if not threads:
            return succeed(None)
        for _ in threads:
            self._jobs.put(None)
        done: Deferred[None] = Deferred()

        def joined() -> None:
            for thread in threads:
                thread.join(self.timeout)
            self._reactor.callFromThread(finished)

        def finished() -> None:
            if not done.called:
                done.callback(None)

        threading.Thread(target=joined, name="postgres-close", daemon=True).start()
        self._clock.callLater(2 * self.timeout, finished)
        return done

    def in_list(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        return f"{column} = ANY(?)", [list(values)]

    def lock_suffix(self) -> str:
        return " FOR UPDATE"

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
