"""Task routing end to end: a real orchestrator and real agents on sockets."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from optiinfra.routing.loops import RouterService

from .agents import (
    BAD_GATEWAY,
    COMPLETE,
    DIE,
    FAIL,
    HANG,
    REFUSE,
    FakeAgent,
    StartAgent,
    settle,
)
from .client import call
from .conftest import RunningService, StartService
from .databases import postgres_database

FAST = {"retry_delay": 0.05, "attempt_timeout": 5.0}
TASK = {"task_type": "analyze_cost", "agent_type": "cost"}
FINAL = ("completed", "failed", "timeout", "cancelled")


async def register(
    service: RunningService, agent: FakeAgent, kind: str = "cost", **extra: Any
) -> str:
    assert agent.port is not None
    code, body = await call(
        service,
        "POST",
        "/agents/register",
        {
            "name": agent.name,
            "type": kind,
            "host": "127.0.0.1",
            "port": agent.port.getHost().port,
            "capabilities": ["analyze_cost", "right_size", "validate_quality"],
            **extra,
        },
    )
    assert code == 201, body
    return str(body["agent_id"])


async def submit(service: RunningService, **changes: Any) -> str:
    code, body = await call(service, "POST", "/tasks", {**TASK, **changes})
    assert code == 201, body
    return str(body["task_id"])


async def wait_for(
    service: RunningService, task_id: str, statuses: tuple[str, ...] = FINAL
) -> dict[str, Any]:
    for _ in range(300):
        code, task = await call(service, "GET", f"/tasks/{task_id}")
        assert code == 200
        if task["status"] in statuses:
            return task  # type: ignore[no-any-return]
        await settle(0.02)
    raise AssertionError(f"task {task_id} stayed {task['status']}")


@pytest_twisted.ensureDeferred
async def test_a_task_completes_with_the_agents_answer(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    agent = await start_agent(COMPLETE)
    agent_id = await register(service, agent)
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    response = await service.request(
        "POST",
        "/tasks",
        json={**TASK, "parameters": {"x": 1}, "priority": "high"},
        headers={"traceparent": traceparent, "X-Request-ID": "req-42"},
    )
    assert response.code == 201
    created = await response.json()
    assert created["status"] == "pending"
    assert created["status_url"] == f"/tasks/{created['task_id']}"
    task = await wait_for(service, created["task_id"])
    assert task["status"] == "completed"
    assert task["result"] == {"by": agent.name}
    assert task["agent_id"] == agent_id
    assert task["retry_count"] == 0
    assert task["started_at"]
    assert task["completed_at"]
    assert task["history"][0]["status"] == "pending"
    assert [h["status"] for h in task["history"]][-2:] == ["sent", "completed"]
    [received] = agent.received
    assert received.body == {
        "task_id": created["task_id"],
        "task_type": "analyze_cost",
        "parameters": {"x": 1},
        "timeout_seconds": pytest.approx(30, abs=1),
        "priority": 10,
        "metadata": {},
    }
    assert received.headers["traceparent"] == traceparent
    assert received.headers["x-request-id"] == "req-42"
    assert 0 < int(received.headers["x-deadline-ms"]) <= 30_000


@pytest_twisted.ensureDeferred
async def test_with_an_agent_free_a_task_is_sent_as_it_is_stored(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    agent = await start_agent(COMPLETE)
    agent_id = await register(service, agent)
    await wait_for(service, await submit(service))  # the agents are read by now
    code, created = await call(service, "POST", "/tasks", TASK)
    assert (code, created["status"], created["agent_id"]) == (201, "pending", None)
    task = await wait_for(service, created["task_id"])
    assert task["status"] == "completed"
    assert task["agent_id"] == agent_id
    pending, sent, completed = task["history"]
    assert [pending["status"], sent["status"], completed["status"]] == [
        "pending",
        "sent",
        "completed",
    ]
    assert sent["at"] == pending["at"] == task["created_at"] == task["started_at"]
    assert sent["detail"] == f"sent to {agent_id}"
    assert agent.tasks[-1] == created["task_id"]
    metrics = await (await service.get("/metrics")).text()
    assert "optiinfra_task_dispatch_latency_seconds_count 2.0" in metrics


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
@pytest_twisted.ensureDeferred
async def test_an_agent_at_an_ipv6_address_gets_its_tasks(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    agent = await start_agent(COMPLETE, interface="::1")
    await register(service, agent, host="::1")
    task = await wait_for(service, await submit(service))
    assert (task["status"], task["result"]) == ("completed", {"by": agent.name})


@pytest_twisted.ensureDeferred
async def test_cookies_set_by_agents_are_never_sent_back(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    agents = [await start_agent(COMPLETE) for _ in range(2)]
    for agent in agents:
        agent.cookie = b"session=from-" + agent.name.encode() + b"; Path=/"
        await register(service, agent)
    for task_id in [await submit(service) for _ in range(6)]:
        assert (await wait_for(service, task_id))["status"] == "completed"
    received = [r for agent in agents for r in agent.received]
    assert len(received) == 6
    assert [r.headers.get("cookie") for r in received] == [None] * 6


@pytest_twisted.ensureDeferred
async def test_answers_look_for_waiting_tasks_only_when_some_may_wait(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST, agent_concurrency=1)
    agent = await start_agent(COMPLETE, delay=0.05)
    await register(service, agent)
    await wait_for(service, await submit(service))
    routing = service.top.getServiceNamed("task-router")
    assert isinstance(routing, RouterService)
    tasks = routing.router.tasks
    looks: list[float] = []
    due_tasks = tasks.due_tasks

    def counted(now: float, limit: int, *kinds: Any) -> Any:
        looks.append(now)
        return due_tasks(now, limit, *kinds)

    async def no_periodic_pass() -> None:
        """Off, so that every look below was made by a submission or an answer."""

    tasks.due_tasks = counted  # type: ignore[method-assign]
    routing.router.housekeeping = no_periodic_pass  # type: ignore[method-assign]
    for _ in range(15):  # one at a time: none ever waits
        assert (await wait_for(service, await submit(service)))["status"] == "completed"
    assert looks == []  # no answer looked for waiting tasks
    # Tasks queued behind the busy agent are sent as its slot frees: by the
    # answers alone, the periodic pass being off.
    queued = [await submit(service) for _ in range(4)]
    for task_id in queued:
        assert (await wait_for(service, task_id))["status"] == "completed"
    assert agent.tasks[-4:] == queued
    assert len(looks) >= 3


@pytest_twisted.ensureDeferred
async def test_load_spreads_over_three_agents(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    agents = [await start_agent(COMPLETE, delay=0.05) for _ in range(3)]
    for agent in agents:
        await register(service, agent)
    ids = [await submit(service) for _ in range(30)]
    for task_id in ids:
        assert (await wait_for(service, task_id))["status"] == "completed"
    counts = [len(agent.received) for agent in agents]
    assert sum(counts) == 30
    assert min(counts) >= 4, counts


@pytest_twisted.ensureDeferred
async def test_a_5xx_is_retried_on_another_agent(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    broken, working = await start_agent(BAD_GATEWAY), await start_agent(COMPLETE)
    await register(service, broken)
    # The broken agent is the only one at first, so it gets the first attempt.
    task_id = await submit(service)
    await wait_for(service, task_id, ("retrying", *FINAL))
    working_id = await register(service, working)
    task = await wait_for(service, task_id)
    assert task["status"] == "completed"
    assert task["agent_id"] == working_id
    assert task["retry_count"] == 1
    assert len(broken.received) == 1


@pytest.mark.parametrize("behaviour", [FAIL, REFUSE])
@pytest_twisted.ensureDeferred
async def test_an_agents_no_is_final(
    start_service: StartService, start_agent: StartAgent, behaviour: str
) -> None:
    service = await start_service(**FAST)
    agent = await start_agent(behaviour)
    await register(service, agent)
    task = await wait_for(service, await submit(service))
    assert task["status"] == "failed"
    assert task["retry_count"] == 0
    assert len(agent.received) == 1
    assert task["error"]


@pytest_twisted.ensureDeferred
async def test_retries_stop_at_max_retries(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    agent = await start_agent(BAD_GATEWAY)
    await register(service, agent)
    task = await wait_for(service, await submit(service, max_retries=2))
    assert task["status"] == "failed"
    assert task["retry_count"] == 2
    assert "no retries left" in task["error"]
    assert len(agent.received) == 3


@pytest_twisted.ensureDeferred
async def test_an_agent_dying_mid_task_is_retried(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    dying = await start_agent(DIE)
    await register(service, dying)
    task_id = await submit(service)
    await wait_for(service, task_id, ("retrying", *FINAL))
    dying.behaviour = COMPLETE
    task = await wait_for(service, task_id)
    assert (task["status"], task["retry_count"]) == ("completed", 1)


@pytest_twisted.ensureDeferred
async def test_the_circuit_opens_then_one_trial_closes_it(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST, breaker_threshold=2, breaker_cooldown=0.5)
    agent = await start_agent(BAD_GATEWAY)
    agent_id = await register(service, agent)
    for _ in range(2):
        task = await wait_for(service, await submit(service, max_retries=0))
        assert task["status"] == "failed"
    metrics = await (await service.get("/metrics")).text()
    assert f'optiinfra_agent_circuit_state{{agent="{agent_id}"}} 2.0' in metrics
    agent.behaviour = COMPLETE
    waiting = await submit(service)
    await settle(0.2)
    assert len(agent.received) == 2  # open: nothing goes out
    assert (await wait_for(service, waiting, ("queued",)))["status"] == "queued"
    task = await wait_for(service, waiting)  # after the cool-down, the trial
    assert task["status"] == "completed"
    metrics = await (await service.get("/metrics")).text()
    assert f'optiinfra_agent_circuit_state{{agent="{agent_id}"}}' not in metrics


@pytest_twisted.ensureDeferred
async def test_the_deadline_is_enforced(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    agent = await start_agent(HANG)
    await register(service, agent)
    task = await wait_for(service, await submit(service, timeout_seconds=0.4))
    assert task["status"] == "timeout"
    await settle(0.1)
    assert agent.cancelled == 1  # the call was really cut


@pytest_twisted.ensureDeferred
async def test_a_queued_task_times_out_without_agents(
    start_service: StartService,
) -> None:
    service = await start_service(**FAST)
    task = await wait_for(service, await submit(service, timeout_seconds=0.3))
    assert task["status"] == "timeout"
    assert "before an agent took it" in task["error"]


@pytest_twisted.ensureDeferred
async def test_queued_then_dispatched_when_an_agent_appears(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    task_id = await submit(service)
    assert (await wait_for(service, task_id, ("queued",)))["status"] == "queued"
    agent = await start_agent(COMPLETE)
    await register(service, agent)
    assert (await wait_for(service, task_id))["status"] == "completed"


@pytest_twisted.ensureDeferred
async def test_cancelling_a_queued_task(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    task_id = await submit(service)
    await wait_for(service, task_id, ("queued",))
    code, task = await call(service, "DELETE", f"/tasks/{task_id}")
    assert (code, task["status"]) == (200, "cancelled")
    agent = await start_agent(COMPLETE)
    await register(service, agent)
    await settle(0.2)
    assert agent.received == []
    code, body = await call(service, "DELETE", f"/tasks/{task_id}")
    assert code == 409
    assert body["status"] == "cancelled"


@pytest_twisted.ensureDeferred
async def test_cancelling_an_in_flight_task(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    agent = await start_agent(COMPLETE, delay=0.3)
    await register(service, agent)
    task_id = await submit(service)
    await wait_for(service, task_id, ("sent", "running"))
    code, _ = await call(service, "DELETE", f"/tasks/{task_id}")
    assert code == 200
    await settle(0.5)  # past the agent's answer time
    task = await wait_for(service, task_id)
    assert task["status"] == "cancelled"
    assert agent.cancelled == 1


@pytest_twisted.ensureDeferred
async def test_finished_tasks_cannot_be_cancelled_and_unknown_are_404(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    await register(service, await start_agent(COMPLETE))
    task_id = await submit(service)
    await wait_for(service, task_id)
    code, body = await call(service, "DELETE", f"/tasks/{task_id}")
    assert (code, body["status"]) == (409, "completed")
    code, _ = await call(service, "DELETE", "/tasks/no-such-task")
    assert code == 404
    code, _ = await call(service, "GET", "/tasks/no-such-task")
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_idempotency_key(start_service: StartService) -> None:
    service = await start_service(**FAST)
    headers = {"Idempotency-Key": "order-1"}
    first = await call(service, "POST", "/tasks", TASK, headers=headers)
    again = await service.request("POST", "/tasks", json=TASK, headers=headers)
    assert again.code == 201
    assert again.headers.getRawHeaders("idempotent-replayed") == ["true"]
    assert (await again.json())["task_id"] == first[1]["task_id"]
    code, body = await call(
        service, "POST", "/tasks", {**TASK, "priority": 15}, headers=headers
    )
    assert code == 409
    assert body["task_id"] == first[1]["task_id"]


@pytest_twisted.ensureDeferred
async def test_an_explicit_agent_is_honoured_only_when_eligible(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    first, second = await start_agent(COMPLETE), await start_agent(COMPLETE)
    await register(service, first)
    chosen = await register(service, second)
    for _ in range(3):
        task = await wait_for(service, await submit(service, agent_id=chosen))
        assert task["agent_id"] == chosen
    resource = await start_agent(COMPLETE)
    wrong_type = await register(service, resource, kind="resource")
    for agent_id, reason in (
        ("ghost", "not registered"),
        (wrong_type, "is a resource agent"),
    ):
        task = await wait_for(service, await submit(service, agent_id=agent_id))
        assert task["status"] == "failed"
        assert reason in task["error"]


@pytest_twisted.ensureDeferred
async def test_priority_order_and_the_per_agent_cap(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST, agent_concurrency=1)
    agent = await start_agent(COMPLETE, delay=0.15)
    await register(service, agent)
    first = await submit(service)
    await wait_for(service, first, ("sent",))
    low = await submit(service, priority="low")
    normal = await submit(service)
    critical = await submit(service, priority="critical")
    for task_id in (first, low, normal, critical):
        await wait_for(service, task_id)
    assert agent.tasks == [first, critical, normal, low]
    assert agent.most_in_flight == 1


@pytest_twisted.ensureDeferred
async def test_bad_tasks_name_the_field(start_service: StartService) -> None:
    service = await start_service(**FAST)
    for change, field in (
        ({"task_type": "dance"}, "task_type"),
        ({"agent_type": "resource"}, "agent_type"),
        ({"timeout_seconds": 301}, "timeout_seconds"),
        ({"timeout_seconds": "soon"}, "timeout_seconds"),
        ({"priority": 99}, "priority"),
        ({"max_retries": -1}, "max_retries"),
        ({"parameters": [1]}, "parameters"),
    ):
        code, body = await call(service, "POST", "/tasks", {**TASK, **change})
        assert (code, body["field"]) == (400, field), change
    code, listing = await call(service, "GET", "/tasks")
    assert listing["count"] == 0


@pytest_twisted.ensureDeferred
async def test_listing_filters_and_pages(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    agent_id = await register(service, await start_agent(COMPLETE))
    ids = [await submit(service) for _ in range(5)]
    for task_id in ids:
        await wait_for(service, task_id)
    await submit(service, task_type="validate_quality", agent_type="application")
    _, done = await call(service, "GET", f"/tasks?status=completed&agent_id={agent_id}")
    assert sorted(t["task_id"] for t in done["tasks"]) == sorted(ids)
    _, page = await call(
        service, "GET", "/tasks?task_type=analyze_cost&limit=2&offset=1"
    )
    assert (page["count"], page["limit"], page["offset"]) == (2, 2, 1)
    _, app = await call(service, "GET", "/tasks?agent_type=application")
    assert app["count"] == 1
    code, body = await call(service, "GET", "/tasks?status=sleeping")
    assert (code, body["field"]) == (400, "status")
    for query, field in (
        ("limit=100000", "limit"),
        ("limit=%C2%B2", "limit"),
        ("offset=-1", "offset"),
        ("agent_type=robot", "agent_type"),
        ("task_type=Dance!", "task_type"),
    ):
        code, body = await call(service, "GET", f"/tasks?{query}")
        assert (code, body["field"]) == (400, field), query


@pytest_twisted.ensureDeferred
async def test_finished_tasks_are_purged_after_the_ttl(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST, result_ttl=0.2)
    await register(service, await start_agent(COMPLETE))
    task_id = await submit(service)
    await wait_for(service, task_id)
    for _ in range(100):
        code, _ = await call(service, "GET", f"/tasks/{task_id}")
        if code == 404:
            break
        await settle(0.05)
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_a_stopped_orchestrator_hands_its_work_to_the_next(
    start_service: StartService, start_agent: StartAgent, tmp_path: Any
) -> None:
    first = await start_service(**FAST, state_dir=tmp_path, drain_timeout=0.2)
    agent = await start_agent(HANG)
    await register(first, agent)
    task_id = await submit(first)
    await wait_for(first, task_id, ("sent",))
    await first.pool.closeCachedConnections()
    await first.top.stopService()  # the call is cut after the drain timeout
    agent.behaviour = COMPLETE
    second = await start_service(**FAST, state_dir=tmp_path)
    task = await wait_for(second, task_id)
    assert task["status"] == "completed"
    assert "the orchestrator stopped" in " ".join(
        str(h["detail"]) for h in task["history"]
    )


@pytest.fixture
def shared_database() -> Iterator[str]:
    with postgres_database() as (url, _):
        yield url


@pytest_twisted.ensureDeferred
async def test_two_replicas_never_send_a_task_twice(
    start_service: StartService, start_agent: StartAgent, shared_database: str
) -> None:
    first = await start_service(**FAST, database_url=shared_database)
    second = await start_service(**FAST, database_url=shared_database)
    agents = [await start_agent(COMPLETE, delay=0.02) for _ in range(2)]
    for agent in agents:
        await register(first, agent)
    ids = [await submit((first, second)[n % 2]) for n in range(40)]
    for task_id in ids:
        assert (await wait_for(first, task_id))["status"] == "completed"
    sent = Counter(task for agent in agents for task in agent.tasks)
    assert sorted(sent) == sorted(ids)
    assert set(sent.values()) == {1}
