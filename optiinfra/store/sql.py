"""
The store's logic, written once over any L{IBackend}.

Heartbeats are group-committed: those that arrive while a batch is being written
wait for the next batch, and each is answered only once its batch has committed.
Under load one transaction carries many heartbeats, which is what lets an
embedded database keep up with thousands of agents.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, TypeVar

import attrs
import orjson
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from optiinfra.errors import Conflict
from optiinfra.registry.model import (
    UNREACHABLE,
    Agent,
    AgentQuery,
    AgentState,
    Heartbeat,
)
from optiinfra.store.coordination import CoordinationStore
from optiinfra.store.interface import IBackend, IStore, Transaction
from optiinfra.store.tasks import TaskStore
from optiinfra.timefmt import rfc3339_ms

T = TypeVar("T")

_COLUMNS: Final = (
    "id, name, type, host, port, capabilities, status, version, registered_at,"
    " last_seen, metadata, endpoint, health_check_endpoint"
)

#: Looks and inserts one registration makes while others race it, at most.
_REGISTER_TRIES: Final = 3

#: Heartbeats written in one transaction at most.
MAX_BATCH: Final = 500


def _agent(row: Sequence[Any]) -> Agent:
    return Agent(
        id=row[0],
        name=row[1],
        type=row[2],
        host=row[3],
        port=row[4],
        capabilities=tuple(orjson.loads(row[5])),
        status=row[6],
        version=row[7],
        registered_at=row[8],
        last_seen=row[9],
        metadata=orjson.loads(row[10]),
        endpoint=row[11],
        health_check_endpoint=row[12],
    )


def _values(agent: Agent) -> tuple[Any, ...]:
    return (
        agent.id,
        agent.name,
        agent.type,
        agent.host,
        agent.port,
        orjson.dumps(list(agent.capabilities)).decode(),
        agent.status,
        agent.version,
        agent.registered_at,
        agent.last_seen,
        orjson.dumps(dict(agent.metadata)).decode(),
        agent.endpoint,
        agent.health_check_endpoint,
    )


_UPSERT_SET: Final = (
    "name = ?, type = ?, host = ?, port = ?, capabilities = ?, status = ?,"
    " version = ?, last_seen = ?, metadata = ?, endpoint = ?,"
    " health_check_endpoint = ?, last_seen_text = ?"
)


def _refresh_values(agent: Agent) -> tuple[Any, ...]:
    values = _values(agent)
    # everything but id and registered_at, in _UPSERT_SET's order
    return (*values[1:8], *values[9:], rfc3339_ms(agent.last_seen))


@implementer(IStore)
class SQLStore:
    """L{IStore} on any backend."""

    def __init__(self, backend: IBackend, clock: IReactorTime) -> None:
        self.backend = backend
        self.tasks = TaskStore(backend)
        self.coordination = CoordinationStore(backend)
        self._clock = clock
        self._pending: list[tuple[Heartbeat, Deferred[AgentState | None]]] = []
        self._flushing = False

    def ping(self) -> Deferred[None]:
        return self.backend.ping()

    # Registration -----------------------------------------------------------

    def register_agent(self, agent: Agent, by_id: bool) -> Deferred[tuple[Agent, bool]]:
        lock = self.backend.lock_suffix()

        def refresh(tx: Transaction) -> Agent | None:
            if by_id:
                # The same agent registered earlier under another id (it chose a
                # new one) is replaced: name, host and port are its identity too.
                tx.execute(
                    "DELETE FROM agents WHERE name = ? AND host = ? AND port = ?"
                    " AND id <> ?",
                    (agent.name, agent.host, agent.port, agent.id),
                )
                rows = tx.execute(
                    f"SELECT {_COLUMNS} FROM agents WHERE id = ?{lock}", (agent.id,)
                )
            else:
                rows = tx.execute(
                    f"SELECT {_COLUMNS} FROM agents"
                    f" WHERE name = ? AND host = ? AND port = ?{lock}",
                    (agent.name, agent.host, agent.port),
                )
            if not rows:
                return None
            existing = _agent(rows[0])
            stored = attrs.evolve(
                agent, id=existing.id, registered_at=existing.registered_at
            )
            tx.execute(
                f"UPDATE agents SET {_UPSERT_SET} WHERE id = ?",
                (*_refresh_values(stored), stored.id),
            )
            return stored

        def register(tx: Transaction) -> tuple[Agent, bool]:
            for _ in range(_REGISTER_TRIES):
                refreshed = refresh(tx)
                if refreshed is not None:
                    return refreshed, False
                inserted = tx.execute(
                    f"INSERT INTO agents ({_COLUMNS}, registered_at_text,"
                    f" last_seen_text) VALUES ({', '.join('?' * 15)})"
                    " ON CONFLICT DO NOTHING RETURNING id",
                    (
                        *_values(agent),
                        rfc3339_ms(agent.registered_at),
                        rfc3339_ms(agent.last_seen),
                    ),
                )
                if inserted:
                    return agent, True
                # Registered by a concurrent request since the look above
                # (PostgreSQL waited for its commit): refresh that one.
            raise Conflict(
                "the agent is being registered by other requests; try again",
                name=agent.name,
            )

        return self.backend.run(register)

    # Heartbeats -------------------------------------------------------------

    def heartbeat(self, beat: Heartbeat) -> Deferred[AgentState | None]:
        answer: Deferred[AgentState | None] = Deferred()
        self._pending.append((beat, answer))
        if not self._flushing:
            self._flushing = True
            self._clock.callLater(0, self._flush)
        return answer

    def _flush(self) -> None:
        batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        beats = [beat for beat, _ in batch]
        written = self.backend.run(lambda tx: self._write_heartbeats(tx, beats))

        def answer(previous: list[AgentState | None]) -> None:
            for (_, waiting), agent in zip(batch, previous, strict=True):
                waiting.callback(agent)

        def fail(failure: Failure) -> None:
            for _, waiting in batch:
                waiting.errback(failure)

        def next_batch(_: object) -> None:
            if self._pending:
                self._flush()
            else:
                self._flushing = False

        written.addCallbacks(answer, fail).addBoth(next_batch)

    def _write_heartbeats(
        self, tx: Transaction, beats: list[Heartbeat]
    ) -> list[AgentState | None]:
        """
        One batch: read what the beats change, write each agent once.

        This runs on the database thread but still holds the GIL in Python,
        so it decodes only the metadata a beat merges into.
        """
        ids = sorted({beat.agent_id for beat in beats})
        condition, params = self.backend.in_list("id", ids)
        rows = tx.execute(
            f"SELECT id, type, status, last_seen, metadata FROM agents"
            f" WHERE {condition} ORDER BY id{self.backend.lock_suffix()}",
            params,
        )
        states = {row[0]: AgentState(*row[:4]) for row in rows}
        metadata: dict[str, str] = {row[0]: row[4] for row in rows}
        previous: list[AgentState | None] = []
        for beat in beats:
            before = states.get(beat.agent_id)
            previous.append(before)
            if before is None:
                continue
            states[beat.agent_id] = AgentState(
                before.id,
                before.type,
                beat.status,
                max(before.last_seen, beat.seen_at),
            )
            if beat.metadata:
                merged = {**orjson.loads(metadata[before.id]), **beat.metadata}
                metadata[before.id] = orjson.dumps(merged).decode()
        tx.executemany(
            "UPDATE agents SET status = ?, last_seen = ?, last_seen_text = ?,"
            " metadata = ? WHERE id = ?",
            [
                (
                    state.status,
                    state.last_seen,
                    rfc3339_ms(state.last_seen),
                    metadata[state.id],
                    state.id,
                )
                for state in states.values()
            ],
        )
        return previous

    # Reads ------------------------------------------------------------------

    def get_agent(self, agent_id: str) -> Deferred[Agent | None]:
        def get(tx: Transaction) -> Agent | None:
            rows = tx.execute(
                f"SELECT {_COLUMNS} FROM agents WHERE id = ?", (agent_id,)
            )
            return _agent(rows[0]) if rows else None

        return self.backend.run(get, write=False)

    def list_agents(self, query: AgentQuery) -> Deferred[list[Agent]]:
        def list_(tx: Transaction) -> list[Agent]:
            if query.type is None:
                rows = tx.execute(f"SELECT {_COLUMNS} FROM agents ORDER BY id")
            else:
                rows = tx.execute(
                    f"SELECT {_COLUMNS} FROM agents WHERE type = ? ORDER BY id",
                    (query.type,),
                )
            return [_agent(row) for row in rows]

        return self.backend.run(list_, write=False)

    def agent_documents(
        self, query: AgentQuery, silent_since: float, agent_id: str | None = None
    ) -> Deferred[tuple[int, bytes]]:
        conditions: list[str] = []
        params: list[Any] = [silent_since]
        if agent_id is not None:
            conditions.append("id = ?")
            params.append(agent_id)
        if query.type is not None:
            conditions.append("type = ?")
            params.append(query.type)
        if query.status is not None:
            conditions.append("(CASE WHEN last_seen < ? THEN ? ELSE status END) = ?")
            params.extend((silent_since, UNREACHABLE, query.status))
        if query.capabilities:
            condition, values = self.backend.has_capabilities(query.capabilities)
            conditions.append(condition)
            params.extend(values)
        sql = self.backend.agent_documents_sql(" AND ".join(conditions) or "1 = 1")

        def render(tx: Transaction) -> tuple[int, bytes]:
            [(count, document)] = tx.execute(sql, params)
            return int(count), document.encode()

        return self.backend.run(render, write=False)

    def count_agents(self, silent_since: float) -> Deferred[dict[tuple[str, str], int]]:
        def count(tx: Transaction) -> dict[tuple[str, str], int]:
            rows = tx.execute(
                "SELECT type, CASE WHEN last_seen < ? THEN ? ELSE status END AS s,"
                " COUNT(*) FROM agents GROUP BY type, s",
                (silent_since, UNREACHABLE),
            )
            return {(kind, status): int(n) for kind, status, n in rows}

        return self.backend.run(count, write=False)

    # Removal and the sweep ----------------------------------------------------

    def delete_agent(self, agent_id: str) -> Deferred[Agent | None]:
        def delete(tx: Transaction) -> Agent | None:
            rows = tx.execute(
                f"DELETE FROM agents WHERE id = ? RETURNING {_COLUMNS}", (agent_id,)
            )
            return _agent(rows[0]) if rows else None

        return self.backend.run(delete)

    def mark_unreachable(self, silent_since: float) -> Deferred[list[Agent]]:
        lock = self.backend.lock_suffix()

        def mark(tx: Transaction) -> list[Agent]:
            # Locked, then re-checked by PostgreSQL after any wait, so of two
            # replicas sweeping at once only one sees (and reports) each agent.
            silent = [
                _agent(row)
                for row in tx.execute(
                    f"SELECT {_COLUMNS} FROM agents WHERE status <> ?"
                    f" AND last_seen < ? ORDER BY id{lock}",
                    (UNREACHABLE, silent_since),
                )
            ]
            tx.executemany(
                "UPDATE agents SET status = ? WHERE id = ?",
                [(UNREACHABLE, agent.id) for agent in silent],
            )
            return silent

        return self.backend.run(mark)

    def remove_silent(self, silent_since: float) -> Deferred[list[Agent]]:
        return self._changed(
            f"DELETE FROM agents WHERE last_seen < ? RETURNING {_COLUMNS}",
            (silent_since,),
        )

    def _changed(self, sql: str, params: tuple[Any, ...]) -> Deferred[list[Agent]]:
        def change(tx: Transaction) -> list[Agent]:
            return sorted((_agent(row) for row in tx.execute(sql, params)), key=_id)

        return self.backend.run(change)


def _id(agent: Agent) -> str:
    return agent.id
