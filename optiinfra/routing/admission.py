"""
Admission: refuse a task at the door, before it reaches the store, when it
cannot be done in time.

Taking every task while the agents fall behind fills the store with tasks that
will only time out, and each of them costs a write, reads and an expiry that
the tasks which could still run are waiting for: under three times the load it
could carry, the orchestrator completed a fifth of what it did unloaded.  So
every submission is asked, from memory alone:

 - are more tasks waiting than an operator allows (C{MAX_WAITING_TASKS})?
 - would it wait for an agent more than half its timeout?  The queue is served
   by priority, then in order: the tasks ahead of it (waiting for the same
   agent type, at least as urgent) divided by the rate at which such tasks
   start now is its expected wait (Little's law).  Half, because the other
   half is the agent's to do the work in.
 - with no start to measure a rate from: has the longest-waiting task ahead
   of it already waited longer than its whole timeout?

The store is counted once a second (L{Backlog}), every replica's tasks; between
counts this process adds what it queued and takes away what it took from the
queue, so a burst is seen before the next count.  The start rate is this
process's own: with several replicas each sees only its share of the starts,
so each refuses somewhat early, never late.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import attrs

#: Seconds a refused client is told to wait: the backlog is counted again by then.
RETRY_AFTER: Final = 1
#: A count older than this says nothing about the queue now (the store may be
#: down, or the count failing): the queue-delay rules are not applied on it.
STALE_AFTER: Final = 10.0
#: The share of its timeout a task may expect to wait for an agent.
WAIT_SHARE: Final = 0.5
#: Seconds of starts the start rate is measured over, in this many buckets.
RATE_SECONDS: Final = 2.0
_BUCKETS: Final = 8


@attrs.frozen
class Backlog:
    """Waiting tasks as last counted in the store, every replica's."""

    #: (agent type, priority) -> (how many, the earliest time one of them was due).
    by_kind: Mapping[tuple[str, int], tuple[int, float]] = attrs.field(factory=dict)

    @property
    def total(self) -> int:
        return sum(count for count, _ in self.by_kind.values())

    def ahead(self, agent_type: str, priority: int) -> int:
        """Waiting tasks of C{agent_type} served before one of C{priority}."""
        return sum(
            count
            for (kind, urgency), (count, _) in self.by_kind.items()
            if kind == agent_type and urgency >= priority
        )

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


class StartRate:
    """Calls started per second by agent type, over the last L{RATE_SECONDS}."""

    def __init__(self) -> None:
        #: Agent type -> per bucket: (the bucket's number, starts in it).
        self._buckets: dict[str, list[tuple[int, int]]] = {}

    def started(self, agent_type: str, now: float) -> None:
        number = int(now * _BUCKETS / RATE_SECONDS)
        buckets = self._buckets.setdefault(agent_type, [(-1, 0)] * _BUCKETS)
        slot = number % _BUCKETS
        seen, count = buckets[slot]
        buckets[slot] = (number, count + 1 if seen == number else 1)

    def per_second(self, agent_type: str, now: float) -> float:
        """
        Starts a second, over the window or since the first start in it: a
        burst after a quiet spell is not spread over seconds nothing started.
        """
        width = RATE_SECONDS / _BUCKETS
        newest = int(now / width)
        recent = [
            (number, count)
            for number, count in self._buckets.get(agent_type, ())
            if newest - _BUCKETS < number <= newest and count
        ]
        if not recent:
            return 0.0
        since = min(number for number, _ in recent) * width
        return sum(count for _, count in recent) / max(width, now - since)


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
        self.starts = StartRate()
        self._backlog = Backlog()
        self._counted_at = float("-inf")
        #: Agent type -> queued (+) and taken from the queue (-) by this
        #: process since the count.
        self._change: dict[str, int] = {}

    def counted(self, backlog: Backlog, now: float) -> None:
        self._backlog = backlog
        self._counted_at = now
        self._change = {}

    def queued(self, agent_type: str, count: int = 1) -> None:
        self._change[agent_type] = self._change.get(agent_type, 0) + count

    def dequeued(self, agent_type: str, count: int = 1) -> None:
        self.queued(agent_type, -count)

    @property
    def waiting(self) -> int:
        return max(0, self._backlog.total + sum(self._change.values()))

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
        ahead = max(
            0,
            self._backlog.ahead(agent_type, priority) + self._change.get(agent_type, 0),
        )
        rate = self.starts.per_second(agent_type, now)
        if ahead and rate:
            wait = ahead / rate
            if wait >= timeout_seconds * WAIT_SHARE:
                return Refusal(
                    "queue_delay",
                    f"{ahead} tasks for {agent_type} agents wait before this one"
                    f" and such tasks start about {rate:.0f} a second: it would"
                    f" wait about {wait:.1f} s of its {timeout_seconds:g} s",
                    field="timeout_seconds",
                )
            return None
        waited = self._counted_at - self._backlog.oldest_due(agent_type, priority)
        if waited >= timeout_seconds:
            return Refusal(
                "queue_delay",
                f"a task for {agent_type} agents at least as urgent has waited"
                f" {waited:.1f} s for an agent; this one would time out after"
                f" {timeout_seconds:g} s before its turn",
                field="timeout_seconds",
            )
        return None
