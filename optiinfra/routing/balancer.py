"""Least outstanding requests, by the power of two random choices."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


class Outstanding:
    """How many calls this process has in flight to each agent."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def __getitem__(self, agent_id: str) -> int:
        return self._counts.get(agent_id, 0)

    def agents(self) -> list[str]:
        """The agents with calls outstanding."""
        return list(self._counts)

    def started(self, agent_id: str) -> None:
        self._counts[agent_id] = self[agent_id] + 1

    def finished(self, agent_id: str) -> None:
        left = self[agent_id] - 1
        if left > 0:
            self._counts[agent_id] = left
        else:
            self._counts.pop(agent_id, None)


def pick(
    candidates: Sequence[str], outstanding: Outstanding, rng: random.Random
) -> str:
    """
    Two candidates at random, the one with fewer calls in flight.

    Cheaper than scanning all and, unlike "least loaded", it does not send a
    burst of tasks to the one agent that happened to be idle a moment ago.
    """
    if len(candidates) == 1:
        return candidates[0]
    first, second = rng.sample(list(candidates), 2)
    return first if outstanding[first] <= outstanding[second] else second
