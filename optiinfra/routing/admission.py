"""
Admission: refuse a task at the door, before it reaches the store, when it
cannot be done in time.

Taking every task while the agents fall behind fills the store with tasks that
will only time out, and each of them costs a write, a read and an expiry that
the tasks which could still run are waiting for.  So two questions are asked of
every submission, from memory alone:

 - are more tasks waiting than an operator allows (C{MAX_WAITING_TASKS})?
 - has the longest-waiting task of the same agent type, at least as urgent,
   already waited longer than this one's whole timeout?  The queue is served
   by priority, then in order, so this task would start after it: the wait that
   task has seen is the best honest estimate of this one's.  It needs no guess
   at the agents' speed, and it holds with replicas, because it is read from
   the store every replica writes to.

The store is counted once a second (L{Backlog}); between counts this process
adds what it queued and takes away what it took from the queue, so a burst is
seen before the next count.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import attrs

#: Seconds a refused client is told to wait: the backlog is counted again by then.
RETRY_AFTER: Final = 1
#: A count older than this says nothing about the queue now (the store may be
#: down, or the count failing): the queue-delay rule is not applied on it.
STALE_AFTER: Final = 10.0


@attrs.frozen
class Backlog:
    """Waiting tasks as last counted in the store, every replica's."""

    #: (agent type, priority) -> (how many, the earliest time one of them was due).
    by_kind: Mapping[tuple[str, int], tuple[int, float]] = attrs.field(factory=dict)

    @property
    def total(self) -> int:
        return sum(count for count, _ in self.by_kind.values())

    def oldest_due(self, agent_type: str | None = None, priority: int = 0) -> float:
        """When the longest-waiting task (of a type, at least as urgent) was due."""
        return min(
            (
                due
                for (kind, urgency), (_, due) in self.by_kind.items()
                if (agent_type is None or kind == agent_type) and urgency >= priority
            ),
            default=float("inf"),
        )


@attrs.frozen
class Refusal:
    """Why a task is not taken; the client may try again after L{RETRY_AFTER}."""

    reason: str
    message: str
    field: str | None = None


class Admission:
    """Decides, from memory, whether a new task may join the queue."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._backlog = Backlog()
        self._counted_at = float("-inf")
        #: Queued (+) and taken from the queue (-) by this process since the count.
        self._change = 0

    def counted(self, backlog: Backlog, now: float) -> None:
        self._backlog = backlog
        self._counted_at = now
        self._change = 0

    def queued(self, count: int = 1) -> None:
        self._change += count

    def dequeued(self, count: int = 1) -> None:
        self._change -= count

    @property
    def waiting(self) -> int:
        return max(0, self._backlog.total + self._change)

    def oldest_wait(self, now: float) -> float:
        """Seconds the longest-waiting due task had waited at the last count."""
        due = self._backlog.oldest_due()
        return 0.0 if due == float("inf") else max(0.0, self._counted_at - due)

    def refuse(
        self, agent_type: str, priority: int, timeout_seconds: float, now: float
    ) -> Refusal | None:
        """Why a task like this one is not taken now; None to take it."""
        if self.waiting >= self.max_waiting:
            return Refusal(
                "backlog",
                f"{self.waiting} tasks are waiting for agents, the most allowed"
                f" is {self.max_waiting}",
            )
        if now - self._counted_at > STALE_AFTER:
            return None
        due = self._backlog.oldest_due(agent_type, priority)
        waited = self._counted_at - due
        if waited >= timeout_seconds:
            return Refusal(
                "queue_delay",
                f"a task for {agent_type} agents at least as urgent has waited"
                f" {waited:.1f} s for an agent; this one would time out after"
                f" {timeout_seconds:g} s before its turn",
                field="timeout_seconds",
            )
        return None
