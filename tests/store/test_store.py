"""One suite, both backends: the store behaves the same on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater

from optiinfra.registry.model import UNREACHABLE, Agent, AgentQuery, Heartbeat
from optiinfra.routing.model import Task
from optiinfra.store.interface import IBackend, IStore, StoreError, StoreUnavailable
from optiinfra.store.postgres import PostgresBackend
from optiinfra.store.schema import LATEST
from optiinfra.store.sql import SQLStore
from optiinfra.store.sqlite import CHECKPOINT_EVERY, SYNC_WITHIN, SQLiteBackend
from optiinfra.store.tasks import Claim

from ..databases import postgres_schema, sqlite_path


def agent(number: int = 1, **changes: Any) -> Agent:
    fields: dict[str, Any] = {
        "id": f"agent-{number}",
        "name": f"name-{number}",
        "type": "cost",
        "host": "10.0.0.1",
        "port": 8000 + number,
        "capabilities": ("analyze_cost",),
        "status": "healthy",
        "version": "1.0",
        "registered_at": 1000.0,
        "last_seen": 1000.0,
        "metadata": {"zone": "a"},
    }
    fields.update(changes)
    return Agent(**fields)


@pytest.fixture(params=["sqlite", "postgresql"])
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """Opens backends on one database (each call: another connection to it)."""
    if request.param == "sqlite":
        yield lambda: SQLiteBackend(sqlite_path(tmp_path), reactor)
    else:
        with postgres_schema() as url:
            yield lambda: PostgresBackend(url, reactor)


@pytest_twisted.async_yield_fixture
async def open_store(make_backend: Any) -> AsyncIterator[Any]:
    opened: list[IBackend] = []

    def open_() -> IStore:
        backend = make_backend()
        backend.open()
        backend.start()
        opened.append(backend)
        return SQLStore(backend, reactor)

    yield open_
    for backend in opened:
        await backend.close()


@pytest.fixture
def store(open_store: Any) -> IStore:
    return open_store()  # type: ignore[no-any-return]


@pytest_twisted.ensureDeferred
async def test_register_then_read_back(store: IStore) -> None:
    stored, created = await store.register_agent(agent(1), by_id=True)
    assert created
    assert stored == agent(1)
    assert await store.get_agent("agent-1") == agent(1)
    assert await store.get_agent("nope") is None


@pytest_twisted.ensureDeferred
async def test_same_identity_keeps_id_and_registration_time(store: IStore) -> None:
    await store.register_agent(agent(1), by_id=False)
    again, created = await store.register_agent(
        agent(1, id="other", registered_at=2000.0, last_seen=2000.0, version="2.0"),
        by_id=False,
    )
    assert not created
    assert again.id == "agent-1"
    assert again.registered_at == 1000.0
    assert again.version == "2.0"
    assert again.last_seen == 2000.0
    assert len(await store.list_agents(AgentQuery())) == 1


@pytest_twisted.ensureDeferred
async def test_same_caller_id_keeps_registration_time(store: IStore) -> None:
    await store.register_agent(agent(1), by_id=True)
    again, created = await store.register_agent(
        agent(1, registered_at=5000.0, capabilities=("right_size",)), by_id=True
    )
    assert not created
    assert again.registered_at == 1000.0
    assert again.capabilities == ("right_size",)


@pytest_twisted.ensureDeferred
async def test_new_caller_id_for_the_same_agent_replaces_the_old(
    store: IStore,
) -> None:
    await store.register_agent(agent(1), by_id=True)
    await store.register_agent(agent(1, id="agent-1-restarted"), by_id=True)
    assert [a.id for a in await store.list_agents(AgentQuery())] == [
        "agent-1-restarted"
    ]


@pytest_twisted.ensureDeferred
async def test_heartbeat_updates_status_time_and_merges_metadata(
    store: IStore,
) -> None:
    await store.register_agent(agent(1, metadata={"zone": "a", "gpu": {"n": 1}}), True)
    before = await store.heartbeat(
        Heartbeat("agent-1", "degraded", {"gpu": {"m": 2}, "load": None}, 1100.0)
    )
    assert before is not None
    assert before.status == "healthy"
    after = await store.get_agent("agent-1")
    assert after is not None
    assert after.status == "degraded"
    assert after.last_seen == 1100.0
    # shallow merge: top-level keys replaced, others kept, null stored as null
    assert after.metadata == {"zone": "a", "gpu": {"m": 2}, "load": None}


@pytest_twisted.ensureDeferred
async def test_heartbeat_for_unknown_agent(store: IStore) -> None:
    assert await store.heartbeat(Heartbeat("ghost", "healthy", {}, 1.0)) is None


@pytest_twisted.ensureDeferred
async def test_concurrent_heartbeats_are_all_answered(store: IStore) -> None:
    for number in range(20):
        await store.register_agent(agent(number), by_id=True)
    beats = [
        store.heartbeat(Heartbeat(f"agent-{n % 25}", "healthy", {"n": n}, 2000.0 + n))
        for n in range(600)  # more than one batch, with unknown ids and repeats
    ]
    answers = await gatherResults(beats)
    assert sum(1 for answer in answers if answer is None) == 5 * 24
    agents = {a.id: a for a in await store.list_agents(AgentQuery())}
    assert agents["agent-3"].metadata["n"] == 578  # the last beat wins
    assert agents["agent-3"].last_seen == 2578.0


@pytest_twisted.ensureDeferred
async def test_a_heartbeat_never_moves_last_seen_back(store: IStore) -> None:
    await store.register_agent(agent(1, last_seen=5000.0), True)
    await store.heartbeat(Heartbeat("agent-1", "healthy", {}, 4000.0))
    stored = await store.get_agent("agent-1")
    assert stored is not None
    assert stored.last_seen == 5000.0


@pytest_twisted.ensureDeferred
async def test_list_by_type_ordered_by_id(store: IStore) -> None:
    await store.register_agent(agent(2, type="resource"), True)
    await store.register_agent(agent(1), True)
    await store.register_agent(agent(3), True)
    assert [a.id for a in await store.list_agents(AgentQuery())] == [
        "agent-1",
        "agent-2",
        "agent-3",
    ]
    cost = await store.list_agents(AgentQuery(type="cost"))
    assert [a.id for a in cost] == ["agent-1", "agent-3"]


@pytest_twisted.ensureDeferred
async def test_delete(store: IStore) -> None:
    await store.register_agent(agent(1), True)
    removed = await store.delete_agent("agent-1")
    assert removed is not None
    assert removed.id == "agent-1"
    assert await store.delete_agent("agent-1") is None


@pytest_twisted.ensureDeferred
async def test_sweep_marks_once_and_removes(store: IStore) -> None:
    await store.register_agent(agent(1, last_seen=100.0, status="degraded"), True)
    await store.register_agent(agent(2, last_seen=900.0), True)
    marked = await store.mark_unreachable(silent_since=500.0)
    assert [(a.id, a.status) for a in marked] == [("agent-1", "degraded")]
    assert await store.mark_unreachable(silent_since=500.0) == []
    counts = await store.count_agents(silent_since=500.0)
    assert counts == {("cost", UNREACHABLE): 1, ("cost", "healthy"): 1}
    removed = await store.remove_silent(silent_since=200.0)
    assert [a.id for a in removed] == ["agent-1"]
    assert [a.id for a in await store.list_agents(AgentQuery())] == ["agent-2"]


@pytest_twisted.ensureDeferred
async def test_two_connections_sweeping_at_once_report_each_agent_once(
    open_store: Any,
) -> None:
    first, second = open_store(), open_store()
    for number in range(50):
        await first.register_agent(agent(number, last_seen=10.0), True)
    results = await gatherResults(
        [first.mark_unreachable(100.0), second.mark_unreachable(100.0)]
    )
    ids = [a.id for batch in results for a in batch]
    assert sorted(ids) == sorted(f"agent-{n}" for n in range(50))


@pytest_twisted.ensureDeferred
async def test_data_survives_reopening(open_store: Any) -> None:
    first = open_store()
    await first.register_agent(agent(1), True)
    await first.backend.close()
    second = open_store()
    assert await second.get_agent("agent-1") == agent(1)


@pytest_twisted.ensureDeferred
async def test_ping(store: IStore) -> None:
    await store.ping()


@pytest_twisted.ensureDeferred
async def test_a_newer_schema_is_refused(store: IStore, make_backend: Any) -> None:
    await store.backend.run(
        lambda tx: tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at)"
            " VALUES (?, ?, ?)",
            (LATEST + 1, "from the future", 0.0),
        )
    )
    with pytest.raises(StoreError, match="newer than this build"):
        make_backend().open()


@pytest_twisted.ensureDeferred
async def test_agent_documents_render_and_filter(store: IStore) -> None:
    await store.register_agent(
        agent(1, capabilities=("a", "b"), last_seen=1000.123, registered_at=999.5),
        True,
    )
    await store.register_agent(agent(2, type="resource", capabilities=("b",)), True)
    await store.register_agent(
        agent(3, last_seen=10.0, endpoint="http://x:1", metadata={"k": [1, None]}),
        True,
    )
    count, raw = await store.agent_documents(AgentQuery(), silent_since=500.0)
    documents = orjson.loads(raw)
    assert count == 3
    assert [d["id"] for d in documents] == ["agent-1", "agent-2", "agent-3"]
    assert documents[0] == {
        "id": "agent-1",
        "name": "name-1",
        "type": "cost",
        "host": "10.0.0.1",
        "port": 8001,
        "capabilities": ["a", "b"],
        "status": "healthy",
        "version": "1.0",
        "registered_at": "1970-01-01T00:16:39.500Z",
        "last_seen": "1970-01-01T00:16:40.123Z",
        "metadata": {"zone": "a"},
        "endpoint": None,
        "health_check_endpoint": None,
    }
    assert documents[2]["status"] == UNREACHABLE
    assert documents[2]["endpoint"] == "http://x:1"
    assert documents[2]["metadata"] == {"k": [1, None]}

    async def ids(query: AgentQuery, agent_id: str | None = None) -> list[str]:
        _, raw = await store.agent_documents(query, 500.0, agent_id)
        return [d["id"] for d in orjson.loads(raw)]

    assert await ids(AgentQuery(type="resource")) == ["agent-2"]
    assert await ids(AgentQuery(capabilities=("b",))) == ["agent-1", "agent-2"]
    assert await ids(AgentQuery(capabilities=("a", "b"))) == ["agent-1"]
    assert await ids(AgentQuery(capabilities=("c",))) == []
    assert await ids(AgentQuery(status=UNREACHABLE)) == ["agent-3"]
    assert await ids(AgentQuery(status="healthy", type="cost")) == ["agent-1"]
    assert await ids(AgentQuery(), "agent-2") == ["agent-2"]
    assert await store.agent_documents(AgentQuery(), 0.0, "nope") == (0, b"[]")


@pytest_twisted.ensureDeferred
async def test_a_failing_unit_of_work_spoils_no_other(store: IStore) -> None:
    def insert(number: int) -> Any:
        def work(tx: Any) -> int:
            tx.execute(
                "INSERT INTO schema_migrations (version, name, applied_at)"
                " VALUES (?, ?, ?)",
                (100 + number, f"unit {number}", 0.0),
            )
            if number == 2:
                raise ValueError("this unit fails after writing")
            return number

        return work

    # Issued together, so the embedded backend commits them as one batch.
    runs = [store.backend.run(insert(n)) for n in range(4)]
    outcomes = []
    for run in runs:
        try:
            outcomes.append(await run)
        except ValueError:
            outcomes.append("failed")
    assert outcomes == [0, 1, "failed", 3]
    rows = await store.backend.run(
        lambda tx: tx.execute(
            "SELECT version FROM schema_migrations WHERE version >= 100 ORDER BY 1"
        )
    )
    assert [row[0] for row in rows] == [100, 101, 103]


def a_task(number: int, **changes: Any) -> Task:
    fields: dict[str, Any] = {
        "id": f"task-{number}",
        "task_type": "analyze_cost",
        "agent_type": "cost",
        "parameters": {},
        "priority": 5,
        "timeout_seconds": 30.0,
        "max_retries": 3,
        "metadata": {},
        "status": "pending",
        "created_at": 100.0,
        "deadline": 130.0,
    }
    fields.update(changes)
    return Task(**fields)


@pytest_twisted.ensureDeferred
async def test_tasks_abandoned_by_a_stopped_replica_are_recovered(
    store: IStore,
) -> None:
    tasks = store.tasks
    await tasks.create_task(a_task(1, status="sent", owner="dead", lease_until=110.0))
    await tasks.create_task(
        a_task(2, status="running", owner="dead", lease_until=110.0, deadline=115.0)
    )
    await tasks.create_task(a_task(3, status="sent", owner="alive", lease_until=150.0))
    recovered = await tasks.recover_abandoned(120.0)
    assert sorted(t.id for t in recovered) == ["task-1", "task-2"]
    found = await tasks.get_task("task-1")
    assert found is not None
    first, history = found
    assert (first.status, first.owner) == ("retrying", None)
    assert "dispatching again" in str(history[-1].detail)
    found = await tasks.get_task("task-2")
    assert found is not None
    assert found[0].status == "failed"
    assert found[0].completed_at == 120.0
    assert await tasks.recover_abandoned(120.0) == []  # once


@pytest_twisted.ensureDeferred
async def test_waiting_tasks_past_their_deadline_time_out(store: IStore) -> None:
    tasks = store.tasks
    await tasks.create_task(a_task(1, status="queued", deadline=110.0))
    await tasks.create_task(a_task(2, status="queued", deadline=200.0))
    expired = await tasks.expire_waiting(120.0)
    assert [t.id for t in expired] == ["task-1"]
    assert [t.id for t in await tasks.due_tasks(120.0, 10)] == ["task-2"]


@pytest_twisted.ensureDeferred
async def test_a_task_changes_only_from_what_the_caller_expects(store: IStore) -> None:
    tasks = store.tasks
    await tasks.create_task(a_task(1))
    claimed = await tasks.change_task(
        "task-1", ("pending",), "sent", 101.0, changes={"owner": "me"}
    )
    assert claimed is not None
    assert claimed.owner == "me"
    # a second claim, or an answer recorded by another owner, does nothing
    assert await tasks.change_task("task-1", ("pending",), "sent", 102.0) is None
    assert (
        await tasks.change_task("task-1", ("sent",), "completed", 103.0, owner="you")
        is None
    )
    with pytest.raises(ValueError, match="cannot change"):
        tasks.change_task("task-1", ("sent",), "completed", 1.0, changes={"id": "x"})


CLAIM = Claim("agent-1", "me", 115.0, "sent to agent-1")


@pytest_twisted.ensureDeferred
async def test_a_new_task_is_stored_sent_to_the_agent_claimed_for_it(
    store: IStore,
) -> None:
    tasks = store.tasks
    stored, created = await tasks.create_task(a_task(1), CLAIM)
    assert created
    assert (stored.status, stored.agent_id, stored.owner) == ("sent", "agent-1", "me")
    assert (stored.lease_until, stored.started_at) == (115.0, 100.0)
    found = await tasks.get_task("task-1")
    assert found is not None
    assert found[0] == stored
    assert [(e.status, e.at, e.detail) for e in found[1]] == [
        ("pending", 100.0, None),
        ("sent", 100.0, "sent to agent-1"),
    ]
    # the claim is a compare-and-set like any other: the answer needs the owner
    assert (
        await tasks.change_task("task-1", ("sent",), "completed", 101.0, owner="you")
        is None
    )
    assert (
        await tasks.change_task(
            "task-1", ("sent",), "completed", 101.0, owner="me", durable=False
        )
    ) is not None
    # an idempotent replay claims nothing
    keyed = a_task(2, idempotency_key="k")
    first, _ = await tasks.create_task(keyed, CLAIM)
    again, created = await tasks.create_task(attrs.evolve(keyed, id="task-3"), CLAIM)
    assert (again, created) == (first, False)


@pytest_twisted.ensureDeferred
async def test_a_new_task_waits_behind_a_due_one_as_urgent(store: IStore) -> None:
    tasks = store.tasks
    await tasks.create_task(a_task(1, status="queued", priority=10))
    # not as urgent, another type, not due yet, past its deadline: not ahead
    await tasks.create_task(a_task(2, status="queued", priority=1))
    await tasks.create_task(a_task(3, status="queued", agent_type="resource"))
    await tasks.create_task(a_task(4, status="retrying", not_before=200.0))
    await tasks.create_task(a_task(5, status="queued", deadline=100.0))
    for number, priority in ((6, 5), (7, 10)):
        stored, _ = await tasks.create_task(a_task(number, priority=priority), CLAIM)
        assert (stored.status, stored.owner) == ("queued", None)
    stored, _ = await tasks.create_task(a_task(8, priority=15), CLAIM)
    assert stored.status == "sent"
    stored, _ = await tasks.create_task(a_task(9, agent_type="performance"), CLAIM)
    assert stored.status == "sent"


@pytest_twisted.ensureDeferred
async def test_relaxed_commits_are_kept(store: IStore) -> None:
    tasks = store.tasks
    await tasks.create_task(a_task(1))
    changed = await tasks.change_task(
        "task-1", ("pending",), "queued", 101.0, durable=False
    )
    assert changed is not None
    assert await tasks.renew_leases("me", ["task-1"], 200.0) == set()
    found = await tasks.get_task("task-1")
    assert found is not None
    assert found[0].status == "queued"


@pytest_twisted.ensureDeferred
async def test_sqlite_syncs_relaxed_commits_soon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        synced.append(descriptor)
        real_fsync(descriptor)

    monkeypatch.setattr("optiinfra.store.sqlite.os.fsync", fsync)
    backend = SQLiteBackend(sqlite_path(tmp_path), reactor)
    backend.open()
    backend.start()
    store = SQLStore(backend, reactor)
    try:
        await store.tasks.create_task(a_task(1))
        assert synced == []  # a durable commit: SQLite synced it
        await store.tasks.change_task(
            "task-1", ("pending",), "queued", 101.0, durable=False
        )
        assert synced == []
        await deferLater(reactor, SYNC_WITHIN * 1.5)
        assert len(synced) == 1  # synced soon
        # reads and relaxed units that change nothing need no sync
        await store.tasks.get_task("task-1")
        await store.tasks.renew_leases("me", ["task-1"], 200.0)
        await deferLater(reactor, SYNC_WITHIN * 1.5)
        assert len(synced) == 1
        # asked for at once, syncs share an fsync when one is under way
        await gatherResults([store.tasks.sync() for _ in range(3)])
        assert 2 <= len(synced) <= 3
        count = len(synced)
        created, _ = await store.tasks.create_task(a_task(2), durable=False)
        assert created.status == "pending"
        await store.tasks.sync()
        assert len(synced) == count + 1
    finally:
        await backend.close()
    assert len(synced) == count + 2  # closing syncs what is left
    with pytest.raises(StoreUnavailable):
        await backend.sync()


@pytest_twisted.ensureDeferred
async def test_sqlite_checkpoints_off_the_database_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = SQLiteBackend(sqlite_path(tmp_path), reactor)
    threads: list[str] = []
    copy = backend._copy_log

    def copy_log() -> None:
        threads.append(threading.current_thread().name)
        copy()

    monkeypatch.setattr(backend, "_copy_log", copy_log)
    backend.open()
    backend.start()
    store = SQLStore(backend, reactor)
    try:
        [(pages,)] = await backend.run(
            lambda tx: tx.execute("PRAGMA wal_autocheckpoint"), write=False
        )
        assert pages == 0  # never at a commit on the database thread
        await deferLater(reactor, CHECKPOINT_EVERY * 1.5)
        assert threads == []  # nothing written, nothing to copy
        for number in range(20):
            await store.tasks.create_task(a_task(number))
        await deferLater(reactor, CHECKPOINT_EVERY * 1.5)
        assert threads == ["sqlite-sync"]
    finally:
        await backend.close()
    reopened = sqlite3.connect(sqlite_path(tmp_path))
    try:
        [(count,)] = reopened.execute("SELECT COUNT(*) FROM tasks").fetchall()
    finally:
        reopened.close()
    assert count == 20


@pytest_twisted.ensureDeferred
async def test_rows_from_before_the_text_timestamps_still_render(
    store: IStore,
) -> None:
    await store.register_agent(agent(1, registered_at=999.5, last_seen=1000.25), True)
    await store.backend.run(
        lambda tx: tx.execute(
            "UPDATE agents SET registered_at_text = NULL, last_seen_text = NULL"
        )
    )
    _, raw = await store.agent_documents(AgentQuery(), silent_since=0.0)
    [document] = orjson.loads(raw)
    assert document["registered_at"] == "1970-01-01T00:16:39.500Z"
    assert document["last_seen"] == "1970-01-01T00:16:40.250Z"
