"""
The change feed, C{GET /events}, over real sockets: what it says, to whom,
how it resumes, and how it treats slow clients and a stopping process.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
from klein import Klein
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.server import Site

from optiinfra.auth import Role, generate
from optiinfra.events import routes as event_routes
from optiinfra.events.feed import Feed, FeedConfig
from optiinfra.events.record import TOPICS
from optiinfra.store.events import EventLog, NewEvent
from optiinfra.store.sqlite import SQLiteBackend
from optiinfra.web.app import new_app
from optiinfra.web.guard import Guard

from .agents import COMPLETE, StartAgent, until_sent
from .client import call
from .conftest import RunningService, StartService
from .databases import postgres_schema
from .sse import SSE, open_feed


def key_file(path: Path) -> dict[str, dict[str, str]]:
    headers, lines = {}, []
    for name, role in [
        ("viewer-key", Role.VIEWER),
        ("operator-key", Role.OPERATOR),
        ("agent-key", Role.AGENT),
    ]:
        key, line = generate(name, role)
        lines.append(line)
        headers[role.value] = {"Authorization": f"Bearer {key}"}
    path.write_text("\n".join(lines) + "\n")
    return headers


async def register(
    service: RunningService,
    name: str,
    kind: str,
    port: int,
    capabilities: list[str],
    headers: dict[str, str] | None = None,
) -> str:
    code, body = await call(
        service,
        "POST",
        "/agents/register",
        {
            "name": name,
            "type": kind,
            "host": "127.0.0.1",
            "port": port,
            "capabilities": capabilities,
        },
        headers,
    )
    assert code == 201, body
    return str(body["agent_id"])


def recommendation(rec_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": rec_id,
        "agent_id": "cost-agent",
        "agent_type": "cost",
        "customer_id": "acme",
        "type": "optimization",
        "title": f"recommendation {rec_id}",
        "action": "right_size",
        "risk_level": "high",
        "affected_resources": [f"res-{rec_id}"],
        **fields,
    }


@pytest_twisted.ensureDeferred
async def test_every_kind_of_change_arrives_with_its_rest_view(
    start_service: StartService, start_agent: StartAgent, tmp_path: Path
) -> None:
    keys = key_file(tmp_path / "keys")
    service = await start_service(api_keys_file=tmp_path / "keys")
    viewer, operator, agent_key = keys["viewer"], keys["operator"], keys["agent"]
    response, feed = await open_feed(service.url + "/events", headers=viewer)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == [
        "text/event-stream; charset=utf-8"
    ]

    worker = await start_agent(COMPLETE)
    assert worker.port is not None
    agent_id = await register(
        service,
        "cost-1",
        "cost",
        worker.port.getHost().port,
        ["right_size", "analyze_cost"],
        agent_key,
    )
    await feed.until(lambda: bool(feed.named("agents")))
    code, shown = await call(service, "GET", f"/agents/{agent_id}", headers=viewer)
    assert code == 200
    [registered] = feed.named("agents")
    assert registered.data["kind"] == "registered"
    assert registered.data["agent"] == shown  # the REST view, field for field

    code, _ = await call(
        service,
        "POST",
        f"/agents/{agent_id}/heartbeat",
        {"status": "degraded"},
        agent_key,
    )
    assert code == 200
    await feed.until(lambda: len(feed.named("agents")) == 2)
    changed = feed.named("agents")[1].data
    assert (changed["kind"], changed["previous"], changed["status"]) == (
        "status_changed",
        "healthy",
        "degraded",
    )
    assert (changed["cause"], changed["agent"]["status"]) == ("heartbeat", "degraded")

    # A high-risk change, approved: approval and plan events, and the plan's tasks.
    code, result = await call(
        service,
        "POST",
        "/coordination/coordinate",
        {
            "customer_id": "acme",
            "recommendations": [recommendation("r1")],
            "execute_now": True,
        },
        operator,
    )
    assert code == 200, result
    [approval] = result["approvals"]
    await feed.until(lambda: bool(feed.named("approvals")))
    assert feed.named("approvals")[0].data["kind"] == "created"
    code, decided = await call(
        service,
        "POST",
        f"/coordination/approvals/{approval['id']}/approve",
        {},
        operator,
    )
    assert code == 200, decided
    plan_id = decided["plan_id"]
    await until_sent(worker, "right_size")
    await feed.until(
        lambda: any(e.data["kind"] == "finished" for e in feed.named("plans"))
    )
    code, plan = await call(
        service, "GET", f"/coordination/plans/{plan_id}", headers=viewer
    )
    assert code == 200
    kinds = [e.data["kind"] for e in feed.named("plans")]
    assert kinds[0] == "created"
    assert kinds[-1] == "finished"
    assert feed.named("plans")[-1].data["plan"] == plan
    code, approval_now = await call(
        service, "GET", f"/coordination/approvals/{approval['id']}", headers=viewer
    )
    assert feed.named("approvals")[-1].data["kind"] == "decided"
    assert feed.named("approvals")[-1].data["approval"]["status"] == "approved"
    assert feed.named("approvals")[-1].data["approval"]["id"] == approval_now["id"]

    task_events = feed.named("tasks")
    task_id = task_events[-1].data["task"]["task_id"]
    statuses = [e.data["task"]["status"] for e in task_events]
    assert statuses[-1] == "completed"
    code, task = await call(service, "GET", f"/tasks/{task_id}", headers=viewer)
    assert code == 200
    assert task_events[-1].data["task"] == {
        k: v for k, v in task.items() if k != "history"
    }

    ids = [e.id for e in feed.events]
    assert all(isinstance(i, int) for i in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert {e.name for e in feed.events} == set(TOPICS)
    feed.close()


@pytest_twisted.ensureDeferred
async def test_filters_resume_and_reset(
    start_service: StartService, tmp_path: Path
) -> None:
    service = await start_service(event_retention=3600)
    _, everything = await open_feed(service.url + "/events")
    _, cost_only = await open_feed(
        service.url + "/events?topics=agents&agent_type=cost"
    )
    _, tasks_only = await open_feed(service.url + "/events?topics=tasks")
    for n, kind in enumerate(["cost", "resource", "cost"]):
        await register(service, f"a{n}", kind, 9000 + n, ["analyze_cost"])
    await everything.until(lambda: len(everything.events) == 3)
    await cost_only.until(lambda: len(cost_only.events) == 2)
    assert [e.data["agent"]["type"] for e in cost_only.events] == ["cost", "cost"]
    assert tasks_only.events == []

    # Resuming after the first event replays the two after it, then goes live.
    first = everything.events[0].id
    _, resumed = await open_feed(
        service.url + "/events", headers={"Last-Event-ID": str(first)}
    )
    await resumed.until(lambda: len(resumed.events) == 2)
    assert [e.id for e in resumed.events] == [e.id for e in everything.events[1:]]
    await register(service, "a3", "performance", 9010, ["x"])
    await resumed.until(lambda: len(resumed.events) == 3)
    assert resumed.events[-1].data["agent"]["name"] == "a3"
    _, by_query = await open_feed(service.url + f"/events?last_event_id={first}")
    await by_query.until(lambda: len(by_query.events) == 3)

    # Events older than the window are gone: one reset, then live.
    log = EventLog(_backend(service))
    await log.purge(reactor.seconds() + 1)  # type: ignore[attr-defined]
    _, stale = await open_feed(
        service.url + "/events", headers={"Last-Event-ID": str(first)}
    )
    await stale.until(lambda: bool(stale.events))
    [reset] = stale.events
    assert reset.name == "reset"
    assert reset.id == resumed.events[-1].id  # the newest: resume from there
    _, future = await open_feed(service.url + "/events?last_event_id=999999")
    await future.until(lambda: bool(future.events))
    assert future.events[0].name == "reset"
    for feed in (everything, cost_only, tasks_only, resumed, by_query, stale, future):
        feed.close()


def _backend(service: RunningService) -> Any:
    store = service.top.getServiceNamed("store")
    return store._store.backend  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_viewers_and_above_only_and_bad_input_named(
    start_service: StartService, tmp_path: Path
) -> None:
    keys = key_file(tmp_path / "keys")
    service = await start_service(api_keys_file=tmp_path / "keys")
    response, _ = await open_feed(service.url + "/events")
    assert response.code == 401
    response, _ = await open_feed(service.url + "/events", headers=keys["agent"])
    assert response.code == 403
    for role in ("viewer", "operator"):
        response, feed = await open_feed(service.url + "/events", headers=keys[role])
        assert response.code == 200
        feed.close()
    for query, field in [
        ("?topics=agents,nope", "topics"),
        ("?topics=", "topics"),
        ("?agent_type=martian", "agent_type"),
        ("?customer_id=%20x", "customer_id"),
        ("?last_event_id=abc", "last_event_id"),
    ]:
        code, body = await call(
            service, "GET", "/events" + query, headers=keys["viewer"]
        )
        assert (code, body["field"]) == (400, field), query
    code, body = await call(
        service,
        "GET",
        "/events",
        headers={**keys["viewer"], "Last-Event-ID": "-1"},
    )
    assert (code, body["field"]) == (400, "Last-Event-ID")


# The feed alone, with short timings ------------------------------------------------


async def _feed_server(tmp_path: Path, **config: Any) -> tuple[Feed, Any, str]:
    backend = SQLiteBackend(tmp_path / "events.db", reactor)
    backend.open()
    backend.start()
    feed = Feed(EventLog(backend), reactor, FeedConfig(**config))
    await feed.start()
    app: Klein = new_app()
    event_routes.mount(app, feed, Guard(None))
    site = Site(app.resource())
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    return feed, (backend, port), f"http://127.0.0.1:{port.getHost().port}/events"


async def _append(feed: Feed, count: int, size: int = 100) -> None:
    events = [
        NewEvent(
            at=reactor.seconds(),  # type: ignore[attr-defined]
            topic="tasks",
            kind="status_changed",
            labels={"status": "sent"},
            document=orjson.dumps({"pad": "x" * size, "n": n}),
        )
        for n in range(count)
    ]
    await feed.log.append(events)
    feed.wake()


@pytest_twisted.ensureDeferred
async def test_heartbeats_keep_idle_streams_open(tmp_path: Path) -> None:
    feed, (backend, port), url = await _feed_server(tmp_path, heartbeat=0.05)
    try:
        _, stream = await open_feed(url)
        await stream.until(lambda: len(stream.comments) >= 2)
        assert set(stream.comments) == {"keep-alive"}
        stream.close()
    finally:
        feed.stop()
        await port.stopListening()
        await backend.close()


def _slow_reader(port: int) -> socket.socket:
    """A client that asks for the feed, then reads nothing."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", port))
    client.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
    return client


def _read_all(client: socket.socket) -> bytes:
    client.settimeout(30)
    chunks = []
    while chunk := client.recv(65536):
        chunks.append(chunk)
    client.close()
    return b"".join(chunks)


@pytest_twisted.ensureDeferred
async def test_a_slow_client_is_cut_off_and_the_others_go_on(tmp_path: Path) -> None:
    feed, (backend, port), url = await _feed_server(
        tmp_path, buffer_bytes=64 * 1024, poll_interval=0.05
    )
    try:
        _, fast = await open_feed(url)
        slow = _slow_reader(port.getHost().port)
        while feed.streams < 2:
            await deferLater(reactor, 0.01)
        sent = 0
        while feed.streams == 2:  # until the slow one is cut off
            await _append(feed, 50, size=2000)
            sent += 50
            expected = sent
            await fast.until(lambda: len(fast.events) == expected)  # noqa: B023
            assert sent < 20_000, "the slow client was never cut off"
        # The fast client got everything, in order, and is still connected.
        assert [e.data["n"] for e in fast.events] == list(range(50)) * (sent // 50)
        assert fast.finished_cleanly is None
        await _append(feed, 1)
        await fast.until(lambda: len(fast.events) == sent + 1)
        # The slow one, reading at last, finds the overflow event, then the end.
        received = await deferToThread(_read_all, slow)
        assert b"event: overflow\n" in received
        assert received.endswith(b"\r\n0\r\n\r\n")  # the response was ended
        fast.close()
    finally:
        feed.stop()
        await port.stopListening()
        await backend.close()


@pytest_twisted.ensureDeferred
async def test_stopping_ends_every_stream_cleanly(tmp_path: Path) -> None:
    feed, (backend, port), url = await _feed_server(tmp_path)
    try:
        streams: list[SSE] = []
        for _ in range(3):
            _, stream = await open_feed(url)
            streams.append(stream)
        while feed.streams < 3:
            await deferLater(reactor, 0.01)
        feed.stop()
        for stream in streams:
            await stream.ended
            assert stream.finished_cleanly
        code, body = await call_raw(url)
        assert code == 503
        assert body["error"] == "the change feed is not running"
    finally:
        await port.stopListening()
        await backend.close()


async def call_raw(url: str) -> tuple[int, Any]:
    import treq

    response = await treq.get(url)
    return response.code, await response.json()


# Replicas ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_client_of_one_replica_sees_the_other_replicas_changes(
    start_service: StartService,
) -> None:
    with postgres_schema() as url:
        a = await start_service(database_url=url)
        b = await start_service(database_url=url)
        _, on_b = await open_feed(b.url + "/events?topics=agents")
        # Both replicas record at once: every id arrives at B once, in order.
        await gatherResults(
            [
                ensureDeferred(
                    register((a, b)[n % 2], f"agent-{n}", "cost", 9000 + n, ["x"])
                )
                for n in range(20)
            ]
        )
        await on_b.until(lambda: len(on_b.events) == 20)
        ids = [e.id for e in on_b.events]
        assert ids == list(range(ids[0], ids[0] + 20))
        assert {e.data["agent"]["name"] for e in on_b.events} == {
            f"agent-{n}" for n in range(20)
        }
        on_b.close()
        for replica in (a, b):
            await replica.pool.closeCachedConnections()
            await replica.top.stopService()


@pytest.mark.parametrize("retention", ["0", "-1", "soon"])
def test_event_retention_must_be_positive_seconds(retention: str) -> None:
    from optiinfra.settings import SettingsError, build_settings

    with pytest.raises(SettingsError) as raised:
        build_settings({"EVENT_RETENTION": retention}, {})
    assert raised.value.name == "EVENT_RETENTION"


@pytest_twisted.ensureDeferred
async def test_circuits_opening_and_closing_are_agent_events(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(breaker_threshold=1, breaker_cooldown=0.2)
    worker = await start_agent(COMPLETE)
    assert worker.port is not None
    number = worker.port.getHost().port
    agent_id = await register(service, "flaky", "cost", number, ["analyze_cost"])
    _, feed = await open_feed(
        service.url + "/events?topics=agents&agent_id=" + agent_id
    )
    await worker.port.stopListening()  # the agent goes away: calls are refused

    async def submit() -> None:
        code, body = await call(
            service,
            "POST",
            "/tasks",
            {
                "task_type": "analyze_cost",
                "agent_type": "cost",
                "max_retries": 0,
                "timeout_seconds": 5,
            },
        )
        assert code == 201, body

    def circuits() -> list[Any]:
        return [e for e in feed.events if e.data["kind"].startswith("circuit")]

    await submit()
    await feed.until(lambda: bool(circuits()))
    [opened] = circuits()
    assert (opened.data["kind"], opened.data["circuit"]) == ("circuit_opened", "open")
    assert opened.data["agent"]["name"] == "flaky"
    # Back on the same port: after the cool-down the trial call succeeds.
    worker.port = await TCP4ServerEndpoint(
        reactor, number, interface="127.0.0.1"
    ).listen(Site(worker))
    while len(circuits()) < 2:
        await deferLater(reactor, 0.25)
        await submit()
    closed = circuits()[1]
    assert (closed.data["kind"], closed.data["circuit"]) == ("circuit_closed", "closed")
    feed.close()


@pytest_twisted.ensureDeferred
async def test_events_older_than_the_retention_are_purged(
    start_service: StartService,
) -> None:
    service = await start_service(event_retention=0.001)
    _, live = await open_feed(service.url + "/events")
    await register(service, "a", "cost", 9000, ["x"])
    await register(service, "b", "cost", 9001, ["x"])
    await live.until(lambda: len(live.events) == 2)
    await deferLater(reactor, 0.01)
    await service.top.getServiceNamed("event-purge").run_once()
    _, resumed = await open_feed(
        service.url + "/events", headers={"Last-Event-ID": str(live.events[0].id)}
    )
    await resumed.until(lambda: bool(resumed.events))
    assert [e.name for e in resumed.events] == ["reset"]
    live.close()
    resumed.close()


@pytest_twisted.ensureDeferred
async def test_a_resumed_stream_replays_then_goes_live_in_order(
    tmp_path: Path,
) -> None:
    """Events arriving while a client catches up are held, then sent once each."""
    feed, (backend, port), url = await _feed_server(tmp_path, page=3)
    try:
        await _append(feed, 20)
        streams = []
        for _ in range(3):
            _, stream = await open_feed(url + "?last_event_id=0")
            streams.append(stream)
            await _append(feed, 5)  # while the ones opened are replaying
        for stream in streams:
            await stream.until(lambda s=stream: len(s.events) == 35)  # type: ignore[misc]
            assert [e.id for e in stream.events] == list(range(1, 36))
            stream.close()
    finally:
        feed.stop()
        await port.stopListening()
        await backend.close()


@pytest_twisted.ensureDeferred
async def test_an_approval_that_expires_is_an_event(
    start_service: StartService,
) -> None:
    service = await start_service(approval_expiry_high=0.2, coordination_interval=0.1)
    _, feed = await open_feed(service.url + "/events?topics=approvals&customer_id=acme")
    code, result = await call(
        service,
        "POST",
        "/coordination/coordinate",
        {"customer_id": "acme", "recommendations": [recommendation("r9")]},
    )
    assert code == 200, result
    await feed.until(lambda: any(e.data["kind"] == "expired" for e in feed.events))
    kinds = [e.data["kind"] for e in feed.events]
    assert kinds == ["created", "expired"]
    assert feed.events[-1].data["approval"]["status"] == "expired"
    feed.close()
