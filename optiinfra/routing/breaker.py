"""
A circuit breaker per agent.

After C{threshold} consecutive failures an agent gets no tasks for C{cooldown}
seconds; then one trial task decides: success closes the circuit, failure opens
it again for another cool-down.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import attrs
from twisted.internet.interfaces import IReactorTime

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"


@attrs.define
class _Circuit:
    failures: int = 0
    opened_at: float | None = None
    trial_out: bool = False


class Breakers:
    """The circuits of every agent this process has dispatched to."""

    def __init__(
        self, clock: IReactorTime, threshold: int = 5, cooldown: float = 30.0
    ) -> None:
        self._clock = clock
        self.threshold = threshold
        self.cooldown = cooldown
        self._circuits: dict[str, _Circuit] = {}
        #: Called with (agent id, C{OPEN} or C{CLOSED}) when a circuit opens
        #: or closes again.
        self.listeners: list[Callable[[str, str], object]] = []

    def _changed(self, agent_id: str, state: str) -> None:
        for listener in self.listeners:
            listener(agent_id, state)

    def state(self, agent_id: str) -> str:
        circuit = self._circuits.get(agent_id)
        if circuit is None or circuit.opened_at is None:
            return CLOSED
        if self._clock.seconds() - circuit.opened_at < self.cooldown:
            return OPEN
        return HALF_OPEN

    def allows(self, agent_id: str) -> bool:
        """May a task go to this agent now?  (Half-open: only the one trial.)"""
        state = self.state(agent_id)
        if state == CLOSED:
            return True
        if state == OPEN:
            return False
        return not self._circuits[agent_id].trial_out

    def sent(self, agent_id: str) -> None:
        """A task went out; in half-open state it is the trial."""
        if self.state(agent_id) == HALF_OPEN:
            self._circuits[agent_id].trial_out = True

    def released(self, agent_id: str) -> None:
        """A reserved trial did not go out after all."""
        circuit = self._circuits.get(agent_id)
        if circuit is not None:
            circuit.trial_out = False

    def succeeded(self, agent_id: str) -> None:
        circuit = self._circuits.pop(agent_id, None)
        if circuit is not None and circuit.opened_at is not None:
            self._changed(agent_id, CLOSED)

    def failed(self, agent_id: str) -> bool:
        """Count a failure; True when this failure opened the circuit."""
        circuit = self._circuits.setdefault(agent_id, _Circuit())
        was_open = circuit.opened_at is not None
        circuit.failures += 1
        circuit.trial_out = False
        if was_open or circuit.failures >= self.threshold:
            circuit.opened_at = self._clock.seconds()
            self._changed(agent_id, OPEN)
            return True
        return False

    def forget(self, agent_id: str) -> None:
        """The agent is gone: its circuit need not be kept (nor shown)."""
        self._circuits.pop(agent_id, None)

    def states(self) -> dict[str, str]:
        return {agent_id: self.state(agent_id) for agent_id in self._circuits}
