"""
The change feed's window: every change recorded, for a while, in order.

Ids come from the one row of C{event_sequence}, bumped in the transaction that
inserts the events: PostgreSQL holds that row's lock until the commit, so the
replicas commit events in the order of their ids, and a reader that has seen
id N never later finds a smaller one appear.  (SQLite has one writer anyway.)
Every replica reads the table after the last id it has seen, which is how a
client of replica B hears of changes made on replica A.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import orjson
from twisted.internet.defer import Deferred
from zope.interface import Interface, implementer

from optiinfra.store.interface import IBackend, Transaction


@attrs.frozen
class NewEvent:
    """A change to record: its topic, what happened, and its document."""

    at: float
    topic: str
    kind: str
    #: What the feed's filters match: name -> value (agent_type, customer_id...).
    labels: Mapping[str, str]
    #: The event's JSON, already encoded (the REST view inside).
    document: bytes


@attrs.frozen
class StoredEvent:
    id: int
    at: float
    topic: str
    kind: str
    labels: Mapping[str, str]
    document: bytes


@attrs.frozen
class Window:
    """The ids the store holds: after C{purged_through}, up to C{last_id}."""

    last_id: int
    purged_through: int


class IEventLog(Interface):
    """Where the change feed's events are kept, whichever database holds them."""

    def append(events: Sequence[NewEvent]) -> Deferred[list[int]]:  # noqa: N805
        """Record C{events} in one transaction; fires with their ids, in order."""

    def after(last_id: int, limit: int) -> Deferred[list[StoredEvent]]:  # noqa: N805
        """Up to C{limit} events with ids above C{last_id}, oldest first."""

    def window() -> Deferred[Window]:
        """The newest id, and the newest id purged."""

    def purge(before: float) -> Deferred[int]:  # noqa: N805
        """Forget events recorded before C{before}; fires with how many."""


def _event(row: Sequence[Any]) -> StoredEvent:
    return StoredEvent(
        id=int(row[0]),
        at=float(row[1]),
        topic=row[2],
        kind=row[3],
        labels=orjson.loads(row[4]),
        document=row[5].encode(),
    )


@implementer(IEventLog)
class EventLog:
    """L{IEventLog} on any backend."""

    def __init__(self, backend: IBackend) -> None:
        self._backend = backend

    def append(self, events: Sequence[NewEvent]) -> Deferred[list[int]]:
        def append(tx: Transaction) -> list[int]:
            [(last,)] = tx.execute(
                "UPDATE event_sequence SET last_id = last_id + ? WHERE one = 1"
                " RETURNING last_id",
                (len(events),),
            )
            first = int(last) - len(events) + 1
            tx.executemany(
                "INSERT INTO events (id, at, topic, kind, labels, document)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        first + n,
                        event.at,
                        event.topic,
                        event.kind,
                        orjson.dumps(dict(event.labels)).decode(),
                        event.document.decode(),
                    )
                    for n, event in enumerate(events)
                ],
            )
            return list(range(first, first + len(events)))

        return self._backend.run(append)

    def after(self, last_id: int, limit: int) -> Deferred[list[StoredEvent]]:
        def read(tx: Transaction) -> list[StoredEvent]:
            rows = tx.execute(
                "SELECT id, at, topic, kind, labels, document FROM events"
                " WHERE id > ? ORDER BY id LIMIT ?",
                (last_id, limit),
            )
            return [_event(row) for row in rows]

        return self._backend.run(read, write=False)

    def window(self) -> Deferred[Window]:
        def read(tx: Transaction) -> Window:
            [(last, purged)] = tx.execute(
                "SELECT last_id, purged_through FROM event_sequence WHERE one = 1"
            )
            return Window(int(last), int(purged))

        return self._backend.run(read, write=False)

    def purge(self, before: float) -> Deferred[int]:
        def purge(tx: Transaction) -> int:
            [(newest, count)] = tx.execute(
                "SELECT MAX(id), COUNT(*) FROM events WHERE at < ?", (before,)
            )
            if not count:
                return 0
            tx.execute("DELETE FROM events WHERE id <= ?", (newest,))
            tx.execute(
                "UPDATE event_sequence SET purged_through = ?"
                " WHERE one = 1 AND purged_through < ?",
                (newest, newest),
            )
            return int(count)

        return self._backend.run(purge)
