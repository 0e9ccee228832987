"""
The embedded backend: one SQLite file under the state directory.

SQLite allows one writer at a time, so one dedicated thread owns the one
connection and runs every unit of work in turn; the reactor thread never waits on
the database.  WAL mode lets readers outside this process (backups, sqlite3 CLI)
look without blocking it.

A commit normally waits for C{fsync} (C{synchronous=FULL}): what was answered
survives a power cut.  Work whose loss on a power cut the task leases already
recover (a claim, an agent's answer) may be committed I{relaxed}
(L{SQLiteBackend.run_relaxed}, C{synchronous=NORMAL}): it is on disk with the
next durable commit, or within L{SYNC_WITHIN} seconds, whichever is first.  The
log is written in order, so a durable commit never survives without the relaxed
ones before it.  L{SQLiteBackend.sync} waits for the disk on a thread of its
own, so that the database thread goes on committing meanwhile.

Checkpoints (copying the log into the database file, two fsyncs) run on that
thread too, on a connection of their own, every L{CHECKPOINT_EVERY} seconds
while there are writes: left to SQLite they ran on the database thread at the
commit that filled 1,000 pages, which stalled every unit queued behind it.

A passive checkpoint never stops the writer, and so, under steady writes, never
catches up with it: the log is only started again from its beginning when a
write begins with every frame already copied, and there is always a tail.  Left
so, the log grew by ~25 KB a task without end (3 GB in four minutes at 500
tasks/s).  So once the log passes L{WAL_RESTART_BYTES}, the database thread
itself, between two batches, copies the short tail the passive checkpoint left
and truncates the log (C{wal_checkpoint(TRUNCATE)}): a pause of a few
milliseconds, since the passive one did the bulk of the copying off the thread.
C{journal_size_limit} caps what a log left behind by any other path keeps.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar, cast

import structlog
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from optiinfra.store.barrier import Barriers
from optiinfra.store.interface import (
    IBackend,
    StoreUnavailable,
    Transaction,
)
from optiinfra.store.schema import migrate

T = TypeVar("T")

_log = structlog.get_logger("optiinfra.store")

#: Units of work committed together at most.
_MAX_BATCH = 256
#: Callers answered in one turn of the reactor (see L{SQLiteBackend._answer}).
_ANSWERS_PER_TURN: Final = 16
#: Seconds a relaxed commit may wait for its fsync at most.
SYNC_WITHIN: Final = 0.2
#: Seconds between checkpoints while there are writes.
CHECKPOINT_EVERY: Final = 0.5
#: A log larger than this, all but its tail copied, is truncated.
WAL_RESTART_BYTES: Final = 8 * 1024 * 1024
#: What SQLite keeps of a log it starts again (C{journal_size_limit}).
WAL_LIMIT_BYTES: Final = 64 * 1024 * 1024


class _Thread:
    """
    One thread running calls in turn, each answered on the reactor thread: a
    plain thread and a queue, not a Twisted thread pool, whose bookkeeping
    per call cost more than a short unit of work itself.
    """

    def __init__(self, reactor: IReactorThreads, name: str) -> None:
        self._reactor = reactor
        self._name = name
        #: What the thread runs next; None stops it.
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self._name)
            self._thread.start()

    def stop(self) -> None:
        """End the thread once what is queued has run."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    def call(self, call: Callable[..., T], *args: Any) -> Deferred[T]:
        done: Deferred[T] = Deferred()

        def job() -> None:
            try:
                result = call(*args)
            except BaseException:
                self._reactor.callFromThread(done.errback, Failure())
            else:
                self._reactor.callFromThread(done.callback, result)

        self._jobs.put(job)
        return done


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
    #: One process on one host: its clock is the database's.
    clock_offset = 0.0

    def __init__(
        self,
        path: Path,
        reactor: IReactorThreads,
        wal_restart_bytes: int = WAL_RESTART_BYTES,
    ) -> None:
        self.path = path
        self.wal_restart_bytes = wal_restart_bytes
        self._reactor = reactor
        self._database = _Thread(reactor, "sqlite")
        self._syncer = _Thread(reactor, "sqlite-sync")
        self._clock = (
            cast(IReactorTime, reactor) if IReactorTime.providedBy(reactor) else None
        )
        self._connection: sqlite3.Connection | None = None
        #: (work, its answer, whether its commit must be durable)
        self._queue: list[tuple[Callable[[Transaction], Any], Deferred[Any], bool]] = []
        self._pumping = False
        #: The setting of C{synchronous} on the connection: FULL when True.
        self._synchronous_full = True
        self._sync_call: IDelayedCall | None = None
        #: Checkpoints run on the sync thread, on this connection.
        self._checkpointer: sqlite3.Connection | None = None
        self._checkpoint_call: IDelayedCall | None = None
        #: fsyncs of the log, each shared by every caller waiting for one.
        self._barriers = Barriers(lambda: self._syncer.call(self._fsync_log))
        self._closed = False

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
            connection.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
            if self._clock is not None:  # checkpoints are ours: see the module
                connection.execute("PRAGMA wal_autocheckpoint=0")
                self._checkpointer = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False
                )
        except (OSError, sqlite3.Error) as error:
            raise StoreUnavailable(f"cannot open {self.path}: {error}") from error
        self._connection = connection
        applied = self._transaction(migrate, True)
        if applied:
            _log.info("schema migrated", backend=self.name, versions=applied)

    def start(self) -> None:
        self._database.start()
        self._syncer.start()

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
        unit that raises rolls back to its savepoint alone.  Reads need no
        fsync: only batches with a write are durable.
        """
        return self._enqueue(work, write)

    def ping(self) -> Deferred[None]:
        def ping(tx: Transaction) -> None:
            tx.execute("SELECT 1")

        return self.run(ping, write=False)

    def run_relaxed(self, work: Callable[[Transaction], T]) -> Deferred[T]:
        """
        As L{run}, but answered before its commit is on disk: a power cut (not
        a crash) within L{SYNC_WITHIN} seconds may undo it.  For work that is
        redone anyway when it is lost; saves an fsync on the way.
        """
        return self._enqueue(work, False)

    def sync(self) -> Deferred[None]:
        """
        Fires once every commit so far, relaxed ones too, is on disk.  Calls
        made while an fsync is going on share the next one.
        """
        if self._closed:
            return fail(StoreUnavailable("the SQLite store is closed"))
        return self._barriers.wait()

    def _enqueue(self, work: Callable[[Transaction], T], durable: bool) -> Deferred[T]:
        done: Deferred[T] = Deferred()
        self._queue.append((work, done, durable))
        if not self._pumping:
            self._pumping = True
            self._pump()
        return done

    def _pump(self) -> None:
        batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
        durable = any(unit[2] for unit in batch)
        ran = self._database.call(self._batch, [work for work, _, _ in batch], durable)

        def deliver(ran: tuple[list[tuple[bool, Any]], bool]) -> None:
            outcomes, wrote = ran
            if wrote:
                self._checkpoint_soon()
                if not durable:
                    self._sync_soon()
            self._answer(
                [
                    (done, ok, value)
                    for (_, done, _), (ok, value) in zip(batch, outcomes, strict=True)
                ]
            )

        def fail_all(failure: Failure) -> None:
            for _, done, _ in batch:
                done.errback(failure)

        def next_batch(_: object) -> None:
            if self._queue:
                self._pump()
            else:
                self._pumping = False

        ran.addCallbacks(deliver, fail_all).addBoth(next_batch)

    def _answer(self, answers: list[tuple[Deferred[Any], bool, Any]]) -> None:
        """
        Answer a batch's callers, L{_ANSWERS_PER_TURN} a turn of the reactor:
        each answer runs its caller on (rendering, writing a response), and a
        full batch answered at once held the reactor for tens of milliseconds
        in which no probe or other socket was served.
        """
        now, rest = answers[:_ANSWERS_PER_TURN], answers[_ANSWERS_PER_TURN:]
        if rest:
            if self._clock is None:
                now, rest = answers, []
            else:
                self._clock.callLater(0, self._answer, rest)
        for done, ok, value in now:
            if ok:
                done.callback(value)
            else:
                done.errback(Failure(value))

    def _sync_soon(self) -> None:
        """Have the relaxed commits on disk within L{SYNC_WITHIN} seconds."""
        if self._clock is None or (
            self._sync_call is not None and self._sync_call.active()
        ):
            return
        self._sync_call = self._clock.callLater(SYNC_WITHIN, self._sync)

    def _checkpoint_soon(self) -> None:
        if self._clock is None or (
            self._checkpoint_call is not None and self._checkpoint_call.active()
        ):
            return
        self._checkpoint_call = self._clock.callLater(
            CHECKPOINT_EVERY, self._checkpoint
        )

    def _checkpoint(self) -> None:
        checkpointing = self._syncer.call(self._copy_log)
        checkpointing.addCallback(self._restart_log_if_large)
        checkpointing.addErrback(
            lambda failure: _log.warn(
                "checkpoint failed", backend=self.name, error=failure.getErrorMessage()
            )
        )

    def _copy_log(self) -> None:
        """
        Copy what the log holds into the database file, without waiting for
        (or stopping) the database thread; it then writes the log from its
        start again.
        """
        if self._checkpointer is not None:
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def wal_bytes(self) -> int:
        """The size of the write-ahead log file now (0 when there is none)."""
        try:
            return os.stat(f"{self.path}-wal").st_size
        except FileNotFoundError:
            return 0

    def _restart_log_if_large(self, _: object = None) -> Deferred[None] | None:
        if self._closed or self.wal_bytes() < self.wal_restart_bytes:
            return None
        return self._database.call(self._truncate_log)

    def _truncate_log(self) -> None:
        """
        Copy what is left of the log and truncate it, on the database thread
        between batches (no write of ours is open).  A reader outside this
        process holding an old snapshot makes it give up at once rather than
        stall the writer: the next checkpoint tries again.
        """
        connection = self._connection
        if connection is None:
            return
        connection.execute("PRAGMA busy_timeout=0")
        try:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            connection.execute("PRAGMA busy_timeout=5000")

    def _sync(self) -> None:
        syncing = self.sync()
        # A store that failed or closed meanwhile: close() syncs, or it is lost.
        syncing.addErrback(lambda _: None)

    def _batch(
        self, works: list[Callable[[Transaction], Any]], durable: bool = True
    ) -> tuple[list[tuple[bool, Any]], bool]:
        """The units' outcomes, and whether they wrote."""
        connection = self._connection
        if connection is None:
            raise StoreUnavailable("the SQLite store is closed")
        if durable != self._synchronous_full:
            # This commit waits for fsync, or does not: see the module.
            connection.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._synchronous_full = durable
        changes = connection.total_changes
        outcomes = self._units(works)
        return outcomes, connection.total_changes != changes

    def _units(
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

    def _fsync_log(self) -> None:
        """Flush the write-ahead log to disk, as a FULL commit does."""
        try:
            descriptor = os.open(f"{self.path}-wal", os.O_RDONLY)
        except FileNotFoundError:
            return  # checkpointed and removed: nothing left unsynced
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def in_list(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        marks = ", ".join("?" * len(values))
        return f"{column} IN ({marks})", list(values)

    def lock_suffix(self) -> str:
        return ""  # BEGIN IMMEDIATE already holds the only write lock

    def close(self) -> Deferred[None]:
        self._closed = True
        for call in (self._sync_call, self._checkpoint_call):
            if call is not None and call.active():
                call.cancel()

        def done_checkpointing() -> None:
            if self._checkpointer is not None:
                self._checkpointer.close()
                self._checkpointer = None

        if self._syncer.running:
            self._syncer.call(done_checkpointing).addErrback(lambda _: None)
        else:
            done_checkpointing()

        def finish() -> None:
            if self._connection is not None:
                self._fsync_log()  # relaxed commits too
                self._connection.close()
                self._connection = None

        self._syncer.stop()
        if not self._database.running:  # never started, or closed already
            finish()
            return succeed(None)
        closing = self._database.call(finish)
        self._database.stop()
        return closing

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
