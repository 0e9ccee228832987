"""
The seams of the store.

L{IBackend} is what differs between databases: how to connect, which thread runs
the queries, the SQL dialect.  L{IStore} is what the domain asks for.  One
L{optiinfra.store.sql.SQLStore} implements L{IStore} on either backend, so both
behave the same by construction and one test suite checks both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.threadpool import ThreadPool
from zope.interface import Attribute, Interface

from optiinfra.registry.model import Agent, AgentQuery, AgentState, Heartbeat

T = TypeVar("T")


class StoreUnavailable(Exception):
    """The database did not answer; the caller should try again later."""


class DatabaseLost(StoreUnavailable):
    """No connection to the database could be made or kept: it is down."""


class StoreError(Exception):
    """The database answered, but not with something this build can use."""


def stop_pool(result: T, pool: ThreadPool) -> T:
    """Stop a backend's thread pool once its last work is done; pass on C{result}."""
    pool.stop()
    return result


class Transaction(Protocol):
    """What a unit of work sees: SQL written with C{?} placeholders."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement; its rows (empty for statements without)."""

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement for each row of parameters."""


class IBackend(Interface):
    """A database the store can run units of work on, off the reactor thread."""

    name: str = Attribute("'sqlite' or 'postgresql', for logs and metrics.")
    clock_offset: float = Attribute(
        "Seconds the database's clock is ahead of this host's, as last measured:"
        " what replicas compare with each other is kept in the database's time."
    )

    def open() -> None:
        """
        Connect and bring the schema up to date, blocking.  Called once at
        start-up, before the reactor runs.

        @raise StoreUnavailable: the database cannot be reached.
        @raise StoreError: the schema cannot be used by this build.
        """

    def start() -> None:
        """Start the worker threads; called when the service starts, so a
        process that fails before then has no threads keeping it alive."""

    def run(work: Callable[[Transaction], T], write: bool = True) -> Deferred[T]:
        """
        Run C{work} in one transaction in a worker thread; commit if it returns,
        roll back if it raises.  Failures of the database itself arrive as
        L{StoreUnavailable}.
        """

    def ping() -> Deferred[None]:
        """
        Succeeds when the database answers; tried even while the backend
        knows it to be down (when L{run} fails at once), so it comes back.
        Measures L{clock_offset} on the way.
        """

    def run_relaxed(work: Callable[[Transaction], T]) -> Deferred[T]:
        """
        As L{run}, but answered before the commit is on disk: a power cut (not
        a crash of this process) shortly after may undo it, never half of it
        and never without what was committed after it.  Only for work that is
        redone when it is lost (task claims and answers, which leases redo).
        """

    def sync() -> Deferred[None]:
        """Fires once every commit so far, relaxed ones too, is on disk."""

    def in_list(column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        """SQL testing C{column} against C{values}, and its parameters."""

    def agent_documents_sql(where: str) -> str:
        """
        A query rendering the agents matching C{where} as a JSON array, ordered
        by id, and counting them: one row, C{(count, array text)}.  Its one
        parameter before C{where}'s is the time after which an agent is silent.
        Building the JSON in the database keeps large listings off the reactor.
        """

    def has_capabilities(wanted: Sequence[str]) -> tuple[str, list[Any]]:
        """SQL true for agents offering all of C{wanted}, and its parameters."""

    def lock_suffix() -> str:
        """What makes a SELECT lock the rows it reads (empty where writes are
        serialised anyway)."""

    def close() -> Deferred[None]:
        """Finish queued work and disconnect."""


class IStore(Interface):
    """Everything the orchestrator keeps, whichever database holds it."""

    backend: IBackend = Attribute("The database underneath.")
    tasks: Any = Attribute("The tasks: an L{optiinfra.store.tasks.TaskStore}.")
    coordination: Any = Attribute(
        "Results, approvals and plans: an"
        " L{optiinfra.store.coordination.CoordinationStore}."
    )

    def ping() -> Deferred[None]:
        """Succeeds when the database answers."""

    def register_agent(agent: Agent, by_id: bool) -> Deferred[tuple[Agent, bool]]:
        """
        Insert C{agent}, or refresh the one already registered as the same agent
        (same id when C{by_id}, else same name, host and port), keeping its id
        and registration time.  Fires with the stored agent and whether it is new.
        """

    def heartbeat(beat: Heartbeat) -> Deferred[AgentState | None]:
        """
        Record C{beat}; fires with the agent's state as it was before, or None
        when no such agent is registered.
        """

    def get_agent(agent_id: str) -> Deferred[Agent | None]:
        """The agent, or None."""

    def list_agents(query: AgentQuery) -> Deferred[list[Agent]]:
        """Agents of C{query.type} (all types when None), ordered by id."""

    def agent_documents(
        query: AgentQuery, silent_since: float, agent_id: str | None = None
    ) -> Deferred[tuple[int, bytes]]:
        """
        The agents matching C{query} (and C{agent_id}, when given) as the API
        shows them, rendered as a JSON array, and how many there are.  An agent
        not seen since C{silent_since} shows as unreachable.
        """

    def delete_agent(agent_id: str) -> Deferred[Agent | None]:
        """Remove the agent; fires with what was removed, or None."""

    def mark_unreachable(silent_since: float) -> Deferred[list[Agent]]:
        """Mark agents not seen since C{silent_since} unreachable; fires with
        those this call changed (so two replicas never both report one)."""

    def remove_silent(silent_since: float) -> Deferred[list[Agent]]:
        """Remove agents not seen since C{silent_since}; fires with them."""

    def count_agents(silent_since: float) -> Deferred[dict[tuple[str, str], int]]:
        """Agents by (type, status), counting the silent as unreachable."""
