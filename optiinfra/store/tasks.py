"""
The task half of the store, over any backend.

Every change of a task's status is a compare-and-set: it names the statuses it
expects the task to be in (and, for work in flight, the replica that owns it),
so two replicas never both dispatch a task and a late answer never overwrites a
cancellation.  Each change also appends to C{task_events}, the task's history.

Leases are what replicas compare with each other, so they are kept in the
database's time: each replica adds the offset it measured between its clock and
the database's (L{IBackend.clock_offset}) to the leases it writes and to the
time it compares them with.  A replica whose clock is off by 30 s still sees
another's lease as the database does; likewise when it asks which waiting
tasks are due or past their deadline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, TypeVar

import attrs
import orjson
from twisted.internet.defer import Deferred

from optiinfra.routing.model import (
    FINISHED,
    IN_FLIGHT,
    PENDING,
    QUEUED,
    RETRYING,
    SENT,
    TIMEOUT,
    WAITING,
    Task,
    TaskEvent,
    TaskQuery,
)
from optiinfra.store.interface import IBackend, Transaction

T = TypeVar("T")

#: The columns are the model's fields, in its order.
_FIELDS: Final = tuple(field.name for field in attrs.fields(Task))
_COLUMNS: Final = ", ".join(_FIELDS)
#: Stored as JSON text.
_JSON: Final = frozenset({"parameters", "metadata", "result", "tried"})
#: What a status change may set besides the status.
CHANGEABLE: Final = frozenset(
    {
        "agent_id",
        "result",
        "error",
        "started_at",
        "completed_at",
        "retry_count",
        "not_before",
        "owner",
        "lease_until",
        "tried",
    }
)


def _encode(field: str, value: Any) -> Any:
    if field not in _JSON:
        return value
    if field == "result" and value is None:
        return None
    return orjson.dumps(list(value) if field == "tried" else value).decode()


def _task(row: Sequence[Any]) -> Task:
    values = dict(zip(_FIELDS, row, strict=True))
    for field in _JSON:
        raw = values[field]
        values[field] = None if raw is None else orjson.loads(raw)
    values["tried"] = tuple(values["tried"])
    return Task(**values)


def _marks(values: Sequence[Any]) -> str:
    return ", ".join("?" * len(values))


#: Waiting, written out: the C{tasks_waiting} index holds only waiting tasks,
#: and a database uses such a partial index only for a query whose condition
#: says so in the same words (a placeholder proves nothing to the planner).
_IS_WAITING: Final = "status IN ({})".format(", ".join(f"'{s}'" for s in WAITING))
#: In flight, likewise (the C{tasks_in_flight} index).
_IS_IN_FLIGHT: Final = "status IN ({})".format(", ".join(f"'{s}'" for s in IN_FLIGHT))


#: A waiting task that is due and at least as urgent as a new one of its type:
#: while there is one, the new task queues behind it instead of going out.
_AHEAD: Final = (
    f"SELECT 1 FROM tasks WHERE {_IS_WAITING} AND agent_type = ?"
    " AND priority >= ? AND not_before <= ? AND deadline > ? LIMIT 1"
)


@attrs.frozen
class Claim:
    """An agent this process reserved for a new task, to be sent on insert."""

    agent_id: str
    owner: str
    lease_until: float
    detail: str


class TaskStore:
    """Tasks on a backend; used by L{optiinfra.store.sql.SQLStore}."""

    def __init__(self, backend: IBackend) -> None:
        self._backend = backend

    def _run_relaxed(self, work: Callable[[Transaction], T]) -> Deferred[T]:
        """
        Commit C{work} without waiting for the disk, where the backend can: for
        changes a power cut may undo because leases redo them (a claim comes
        back as an abandoned task and is sent again, a lost answer likewise).
        What a caller was promised (a stored task, a cancellation) stays
        durable.
        """
        return self._backend.run_relaxed(work)

    def create_task(
        self,
        task: Task,
        claim: Claim | None = None,
        *,
        durable: bool = True,
        busy: bool = False,
    ) -> Deferred[tuple[Task, bool]]:
        """
        Insert C{task}; with an idempotency key already used, the old task.

        With a C{claim}, a new pending task is stored already C{sent} to the
        claimed agent (its history says C{pending}, then C{sent}) unless a due
        waiting task of its type at least as urgent is queued before it.  One
        unit of work instead of an insert, a read of due tasks and a claim: the
        task is out in one commit.  Nobody else can have seen the row yet, so
        no compare-and-set is needed.  The task as stored says which happened.
        A new task that is not sent (C{busy}: every agent that could take it
        is busy; or one is free but tasks wait before it) is stored C{queued}.

        Not C{durable}, the insert is committed but may wait for the disk (see
        L{_run_relaxed}): the caller can send the task on and then L{sync}
        before it tells anyone the task was accepted.
        """

        offset = self._backend.clock_offset

        def create(tx: Transaction) -> tuple[Task, bool]:
            if task.idempotency_key is not None:
                rows = tx.execute(
                    f"SELECT {_COLUMNS} FROM tasks WHERE idempotency_key = ?",
                    (task.idempotency_key,),
                )
                if rows:
                    return _task(rows[0]), False
            stored = task
            if (
                claim is not None
                and task.status == PENDING
                and not tx.execute(
                    _AHEAD,
                    (
                        task.agent_type,
                        task.priority,
                        task.created_at,
                        task.created_at,
                    ),
                )
            ):
                stored = attrs.evolve(
                    task,
                    status=SENT,
                    agent_id=claim.agent_id,
                    owner=claim.owner,
                    lease_until=claim.lease_until + offset,
                    started_at=task.created_at,
                )
            elif (claim is not None or busy) and task.status == PENDING:
                stored = attrs.evolve(task, status=QUEUED)
            inserted = tx.execute(
                f"INSERT INTO tasks ({_COLUMNS}) VALUES ({_marks(_FIELDS)})"
                " ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
                [_encode(f, getattr(stored, f)) for f in _FIELDS],
            )
            if not inserted:
                # Another submission with this key was stored since the look
                # above (PostgreSQL waited for its commit): this one replays it.
                rows = tx.execute(
                    f"SELECT {_COLUMNS} FROM tasks WHERE idempotency_key = ?",
                    (task.idempotency_key,),
                )
                return _task(rows[0]), False
            _event(tx, task.id, task.status, task.created_at, None)
            if claim is not None and stored.status == SENT:
                _event(tx, task.id, SENT, task.created_at, claim.detail)
            elif stored.status != task.status:
                _event(tx, task.id, QUEUED, task.created_at, "no agent free")
            return stored, True

        return self._backend.run(create) if durable else self._run_relaxed(create)

    def sync(self) -> Deferred[None]:
        """Fires once everything committed so far is on disk."""
        return self._backend.sync()

    def get_task(self, task_id: str) -> Deferred[tuple[Task, list[TaskEvent]] | None]:
        def get(tx: Transaction) -> tuple[Task, list[TaskEvent]] | None:
            rows = tx.execute(f"SELECT {_COLUMNS} FROM tasks WHERE id = ?", (task_id,))
            if not rows:
                return None
            # A task is pending first, whichever events share its millisecond.
            events = tx.execute(
                "SELECT task_id, status, at, detail FROM task_events"
                " WHERE task_id = ?"
                " ORDER BY at, CASE WHEN status = 'pending' THEN 0 ELSE 1 END",
                (task_id,),
            )
            return _task(rows[0]), [TaskEvent(*event) for event in events]

        return self._backend.run(get, write=False)

    def list_tasks(self, query: TaskQuery) -> Deferred[list[Task]]:
        conditions, params = [], []
        for field in ("status", "agent_id", "agent_type", "task_type"):
            value = getattr(query, field)
            if value is not None:
                conditions.append(f"{field} = ?")
                params.append(value)
        where = " AND ".join(conditions) or "1 = 1"

        def list_(tx: Transaction) -> list[Task]:
            rows = tx.execute(
                f"SELECT {_COLUMNS} FROM tasks WHERE {where}"
                " ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
                (*params, query.limit, query.offset),
            )
            return [_task(row) for row in rows]

        return self._backend.run(list_, write=False)

    def due_tasks(
        self, now: float, limit: int, agent_types: Sequence[str] | None = None
    ) -> Deferred[list[Task]]:
        """Waiting tasks whose back-off is over (of C{agent_types}), most urgent
        first."""
        kinds = ""
        now += self._backend.clock_offset  # compared as the database's time
        params: list[Any] = [now, now]
        if agent_types is not None:
            kinds = f" AND agent_type IN ({_marks(agent_types)})"
            params.extend(agent_types)

        def due(tx: Transaction) -> list[Task]:
            rows = tx.execute(
                f"SELECT {_COLUMNS} FROM tasks WHERE {_IS_WAITING}"
                f" AND not_before <= ? AND deadline > ?{kinds}"
                " ORDER BY priority DESC, created_at, id LIMIT ?",
                (*params, limit),
            )
            return [_task(row) for row in rows]

        return self._backend.run(due, write=False)

    def change_task(
        self,
        task_id: str,
        expected: Iterable[str],
        status: str,
        at: float,
        *,
        owner: str | None = None,
        detail: str | None = None,
        changes: Mapping[str, Any] | None = None,
        durable: bool = True,
    ) -> Deferred[Task | None]:
        """
        Set C{status} (and C{changes}) if the task is in one of C{expected}
        (and owned by C{owner}, when given); the task after, or None.  Not
        C{durable}: see L{_run_relaxed}.
        """
        changes = dict(changes or {})
        if changes.get("lease_until") is not None:
            changes["lease_until"] += self._backend.clock_offset
        unknown = set(changes) - CHANGEABLE
        if unknown:
            raise ValueError(f"cannot change {sorted(unknown)}")
        expected = tuple(expected)
        sets = ", ".join(["status = ?", *(f"{field} = ?" for field in changes)])
        guard = f"id = ? AND status IN ({_marks(expected)})"
        params: list[Any] = [
            status,
            *(_encode(f, v) for f, v in changes.items()),
            task_id,
            *expected,
        ]
        if owner is not None:
            guard += " AND owner = ?"
            params.append(owner)

        def change(tx: Transaction) -> Task | None:
            rows = tx.execute(
                f"UPDATE tasks SET {sets} WHERE {guard} RETURNING {_COLUMNS}", params
            )
            if not rows:
                return None
            _event(tx, task_id, status, at, detail)
            return _task(rows[0])

        return self._backend.run(change) if durable else self._run_relaxed(change)

    def renew_leases(
        self, owner: str, task_ids: Sequence[str], lease_until: float
    ) -> Deferred[set[str]]:
        """Extend the leases this owner still holds; the ids it still holds."""
        condition, params = self._backend.in_list("id", task_ids)
        offset = self._backend.clock_offset

        def renew(tx: Transaction) -> set[str]:
            rows = tx.execute(
                f"UPDATE tasks SET lease_until = ? WHERE owner = ?"
                f" AND status IN ({_marks(IN_FLIGHT)}) AND {condition} RETURNING id",
                (lease_until + offset, owner, *IN_FLIGHT, *params),
            )
            return {row[0] for row in rows}

        return self._run_relaxed(renew)

    def expire_waiting(self, now: float, limit: int = 2000) -> Deferred[list[Task]]:
        """
        Up to C{limit} waiting tasks whose deadline passed end C{timeout}, in
        one statement and one insert of their events: under overload thousands
        expire a second, and one round trip each would starve dispatching.
        """
        lock = self._backend.lock_suffix()
        detail = "the deadline passed before an agent took it"
        # Compared as the database's time, as leases are: a replica whose
        # clock runs ahead must not end other replicas' tasks early.
        offset = self._backend.clock_offset

        def expire(tx: Transaction) -> list[Task]:
            rows = tx.execute(
                f"UPDATE tasks SET status = ?, error = ?, owner = NULL,"
                f" lease_until = NULL, not_before = ?, completed_at = ?"
                f" WHERE id IN (SELECT id FROM tasks WHERE {_IS_WAITING}"
                f" AND deadline <= ? ORDER BY deadline LIMIT ?{lock})"
                f" AND {_IS_WAITING} RETURNING {_COLUMNS}",
                (TIMEOUT, detail, now, now, now + offset, limit),
            )
            expired = [_task(row) for row in rows]
            if expired:
                tx.executemany(
                    "INSERT INTO task_events (task_id, status, at, detail)"
                    " VALUES (?, ?, ?, ?)",
                    [(task.id, TIMEOUT, now, detail) for task in expired],
                )
            return expired

        return self._run_relaxed(expire)  # found again if a power cut undoes it

    def recover_abandoned(self, now: float) -> Deferred[list[Task]]:
        """
        Tasks in flight whose owner stopped renewing its lease (it died or
        restarted): back to waiting when their deadline allows, else failed.
        """

        def settle(task: Task) -> tuple[str, str]:
            if task.deadline > now:
                return RETRYING, "its orchestrator stopped; dispatching again"
            return "failed", "its orchestrator stopped while it was in flight"

        return self._settle(
            f"{_IS_IN_FLIGHT} AND lease_until < ?",
            (now + self._backend.clock_offset,),
            now,
            settle,
        )

    def _settle(
        self, where: str, params: Sequence[Any], now: float, decide: Any
    ) -> Deferred[list[Task]]:
        lock = self._backend.lock_suffix()

        def settle(tx: Transaction) -> list[Task]:
            settled = []
            rows = tx.execute(
                f"SELECT {_COLUMNS} FROM tasks WHERE {where} ORDER BY id{lock}", params
            )
            for task in map(_task, rows):
                status, detail = decide(task)
                finished = status in FINISHED
                tx.execute(
                    "UPDATE tasks SET status = ?, error = ?, owner = NULL,"
                    " lease_until = NULL, not_before = ?, completed_at = ?"
                    " WHERE id = ?",
                    (
                        status,
                        detail if finished else task.error,
                        now,
                        now if finished else None,
                        task.id,
                    ),
                )
                _event(tx, task.id, status, now, detail)
                settled.append(task)
            return settled

        return self._run_relaxed(settle)  # found again if a power cut undoes it

    def purge_finished(self, before: float, limit: int = 1000) -> Deferred[int]:
        """
        Delete up to C{limit} tasks finished before C{before}.  Only finished
        tasks have a completion time, so the C{completed_at} index alone finds
        them; bounded, so one purge never holds the writer for long.
        """

        def purge(tx: Transaction) -> int:
            rows = tx.execute(
                "SELECT id FROM tasks WHERE completed_at < ? ORDER BY completed_at"
                " LIMIT ?",
                (before, limit),
            )
            if not rows:
                return 0
            condition, params = self._backend.in_list("task_id", [r[0] for r in rows])
            tx.execute(f"DELETE FROM task_events WHERE {condition}", params)
            condition, params = self._backend.in_list("id", [r[0] for r in rows])
            tx.execute(f"DELETE FROM tasks WHERE {condition}", params)
            return len(rows)

        return self._run_relaxed(purge)

    def backlog(self) -> Deferred[dict[tuple[str, int], tuple[int, float]]]:
        """
        Waiting tasks by (agent type, priority): how many, and the earliest
        time one of them was due (created, or its back-off over).
        """

        def count(tx: Transaction) -> dict[tuple[str, int], tuple[int, float]]:
            rows = tx.execute(
                "SELECT agent_type, priority, COUNT(*), MIN(not_before) FROM tasks"
                f" WHERE {_IS_WAITING} GROUP BY agent_type, priority",
            )
            return {(kind, int(p)): (int(n), float(due)) for kind, p, n, due in rows}

        return self._backend.run(count, write=False)


def _event(
    tx: Transaction, task_id: str, status: str, at: float, detail: str | None
) -> None:
    tx.execute(
        "INSERT INTO task_events (task_id, status, at, detail) VALUES (?, ?, ?, ?)",
        (task_id, status, at, detail),
    )
