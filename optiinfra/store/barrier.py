"""
Group commit for durability barriers: one flush answers every caller waiting.

A caller asks for a barrier once its own commit is done; a barrier begun
before that call may have missed the commit, so the caller waits for the next
one.  Every call made while one barrier runs shares that next one: under load
one flush answers many.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


class Barriers:
    """Runs C{flush} (a barrier) on demand, never two at once, shared by callers."""

    def __init__(self, flush: Callable[[], Deferred[None]]) -> None:
        self._flush = flush
        self._waiting: list[Deferred[None]] = []
        self._running = False

    def wait(self) -> Deferred[None]:
        """Fires once a barrier begun after this call has finished."""
        done: Deferred[None] = Deferred()
        self._waiting.append(done)
        if not self._running:
            self._next()
        return done

    def _next(self) -> None:
        waiting, self._waiting = self._waiting, []
        self._running = True

        def answer(result: Failure | None) -> None:
            self._running = False
            for done in waiting:
                if isinstance(result, Failure):
                    done.errback(result)
                else:
                    done.callback(None)
            if self._waiting:
                self._next()

        self._flush().addBoth(answer)
