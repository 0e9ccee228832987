"""
What an agent's answer means, tried with real agents on sockets: its own verdict
is final and not held against it, a busy agent is waited for as it asks, and an
answer the store cannot keep exactly fails the task at once, saying why.
"""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest
import pytest_twisted

from .agents import (
    BAD_GATEWAY,
    BIG_RESULT,
    BUSY,
    COMPLETE,
    CRASH,
    DEEP,
    HUGE_INT,
    LONG_ERROR,
    UNAVAILABLE,
    StartAgent,
    settle,
)
from .conftest import LogCapture, StartService
from .databases import cut_off, postgres_database
from .store.test_outage import wait_for_readyz
from .test_routing import FAST, call, register, submit, wait_for


@pytest_twisted.ensureDeferred
async def test_the_shared_handlers_500_is_the_agents_verdict(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    agent = await start_agent(CRASH)
    agent.error = "no metrics for account"
    agent.overrides = {"right_size": COMPLETE}
    agent_id = await register(service, agent)
    task = await wait_for(service, await submit(service, max_retries=3))
    assert (task["status"], task["retry_count"]) == ("failed", 0)
    assert task["error"] == "no metrics for account"
    assert task["history"][-1]["detail"] == (
        "no metrics for account (the agent's verdict after 3 ms)"
    )
    assert len(agent.received) == 1  # not retried
    # Twenty more deterministic failures do not take the agent out of rotation.
    for task_id in [await submit(service, max_retries=3) for _ in range(20)]:
        assert (await wait_for(service, task_id))["status"] == "failed"
    assert len(agent.received) == 21
    metrics = await (await service.get("/metrics")).text()
    assert f'optiinfra_agent_circuit_state{{agent="{agent_id}"}}' not in metrics
    good = await wait_for(service, await submit(service, task_type="right_size"))
    assert (good["status"], good["agent_id"]) == ("completed", agent_id)
    assert [h["status"] for h in good["history"]] == ["pending", "sent", "completed"]


@pytest_twisted.ensureDeferred
async def test_an_agents_long_error_is_cut_and_says_so(
    start_service: StartService, start_agent: StartAgent, logs: LogCapture
) -> None:
    service = await start_service(**FAST)
    await register(service, await start_agent(LONG_ERROR))
    task = await wait_for(service, await submit(service))
    assert task["status"] == "failed"
    assert task["error"].startswith("x" * 4096)
    assert task["error"].endswith("... [truncated: 4000000 bytes in all]")
    assert len(task["error"]) < 4200
    assert len(task["history"][-1]["detail"]) < 4200
    [finished] = [e for e in logs.events if e.get("event") == "task finished"]
    assert finished["error"] == task["error"]
    assert max(len(str(e)) for e in logs.events) < 8192


@pytest_twisted.ensureDeferred
async def test_listings_leave_results_out_unless_asked_and_cap_them(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    await register(service, await start_agent(BIG_RESULT))
    ids = [await submit(service) for _ in range(3)]
    for task_id in ids:
        assert (await wait_for(service, task_id))["status"] == "completed"
    response = await service.get("/tasks")
    plain = await response.content()
    assert len(plain) < 10_000
    listing = orjson.loads(plain)
    assert listing["count"] == 3
    assert all("result" not in task for task in listing["tasks"])
    _, first = await call(service, "GET", "/tasks?fields=result&limit=3")
    assert (first["count"], first["truncated"], first["next_offset"]) == (2, True, 2)
    assert all(len(t["result"]["blob"]) == 3_500_000 for t in first["tasks"])
    _, rest = await call(service, "GET", "/tasks?fields=result&limit=3&offset=2")
    assert rest["count"] == 1
    assert "truncated" not in rest
    listed = [t["task_id"] for t in first["tasks"] + rest["tasks"]]
    assert sorted(listed) == sorted(ids)
    code, body = await call(service, "GET", "/tasks?fields=everything")
    assert (code, body["field"]) == (400, "fields")


@pytest_twisted.ensureDeferred
async def test_a_proxys_error_page_is_retried_and_counted(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST, breaker_threshold=2, breaker_cooldown=60)
    agent = await start_agent(BAD_GATEWAY)
    agent_id = await register(service, agent)
    task = await wait_for(service, await submit(service, max_retries=1))
    assert (task["status"], task["retry_count"]) == ("failed", 1)
    assert task["error"] == "agent answered 502; no retries left"
    assert len(agent.received) == 2
    metrics = await (await service.get("/metrics")).text()
    assert f'optiinfra_agent_circuit_state{{agent="{agent_id}"}} 2.0' in metrics


@pytest.mark.parametrize("busy", [BUSY, UNAVAILABLE])
@pytest_twisted.ensureDeferred
async def test_a_busy_agent_is_waited_for_as_it_asks(
    start_service: StartService, start_agent: StartAgent, busy: str
) -> None:
    # One failure would open the circuit, and no retry is allowed: a busy
    # answer is neither.
    service = await start_service(**FAST, breaker_threshold=1, breaker_cooldown=60)
    agent = await start_agent(COMPLETE)
    agent.script = [busy, busy]
    agent.retry_after = "0"
    agent_id = await register(service, agent)
    task = await wait_for(service, await submit(service, max_retries=0))
    assert (task["status"], task["retry_count"]) == ("completed", 0)
    assert len(agent.received) == 3
    details = [h["detail"] for h in task["history"] if h["status"] == "retrying"]
    code = "429" if busy == BUSY else "503"
    assert details == [f"agent busy ({code}); asked to try again in 0.1 s"] * 2
    metrics = await (await service.get("/metrics")).text()
    assert f'optiinfra_agent_circuit_state{{agent="{agent_id}"}}' not in metrics


@pytest_twisted.ensureDeferred
async def test_a_retry_after_past_the_deadline_fails_the_task_at_once(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    agent = await start_agent(UNAVAILABLE)
    agent.retry_after = "3600"
    await register(service, agent)
    task = await wait_for(service, await submit(service, timeout_seconds=20))
    assert task["status"] == "failed"
    assert task["error"] == "agent busy (503); no time left for a retry"
    assert len(agent.received) == 1


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        (
            DEEP,
            "the agent's result cannot be stored: "
            "it is nested more than 254 levels deep",
        ),
        (
            HUGE_INT,
            "the agent's answer cannot be stored exactly: "
            "the integer 1180591620717411303424 is beyond 64 bits",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_an_answer_the_store_cannot_keep_fails_the_task_at_once(
    start_service: StartService,
    start_agent: StartAgent,
    behaviour: str,
    reason: str,
) -> None:
    service = await start_service(**FAST)
    agent = await start_agent(behaviour)
    await register(service, agent)
    task = await wait_for(service, await submit(service, max_retries=0))
    assert (task["status"], task["error"]) == ("failed", reason)
    assert [h["status"] for h in task["history"]] == ["pending", "sent", "failed"]
    assert len(agent.received) == 1


@pytest_twisted.ensureDeferred
async def test_parameters_the_store_cannot_keep_are_refused(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    deep: object = 1
    for _ in range(300):
        deep = [deep]
    code, body = await call(
        service,
        "POST",
        "/tasks",
        {"task_type": "analyze_cost", "agent_type": "cost", "parameters": {"x": deep}},
    )
    assert (code, body["field"]) == (400, "parameters")
    assert body["detail"] == "must not nest more than 64 levels deep"
    headers = {"Content-Type": "application/json"}
    raw = (
        b'{"task_type":"analyze_cost","agent_type":"cost",'
        b'"parameters":{"n":-99999999999999999999}}'
    )
    response = await service.request("POST", "/tasks", data=raw, headers=headers)
    body = await response.json()
    assert (response.code, body["field"]) == (400, "parameters.n")
    assert body["detail"] == (
        "cannot be kept exactly: the integer -99999999999999999999 is beyond 64 bits"
    )
    # The extremes of 64 bits reach the agent exactly.
    agent = await start_agent(COMPLETE)
    await register(service, agent)
    raw = (
        b'{"task_type":"analyze_cost","agent_type":"cost",'
        b'"parameters":{"big":18446744073709551615,"small":-9223372036854775808}}'
    )
    response = await service.request("POST", "/tasks", data=raw, headers=headers)
    assert response.code == 201
    task = await wait_for(service, (await response.json())["task_id"])
    assert task["status"] == "completed"
    assert agent.received[-1].body["parameters"] == {
        "big": 2**64 - 1,
        "small": -(2**63),
    }


@pytest.fixture
def own_database() -> Iterator[tuple[str, str]]:
    with postgres_database() as created:
        yield created


@pytest_twisted.ensureDeferred
async def test_an_answer_arriving_while_the_store_is_lost_is_recorded_when_it_returns(
    start_service: StartService,
    start_agent: StartAgent,
    own_database: tuple[str, str],
) -> None:
    url, name = own_database
    service = await start_service(**FAST, database_url=url)
    agent = await start_agent(COMPLETE, delay=0.3)
    await register(service, agent)
    task_id = await submit(service, max_retries=0)
    await wait_for(service, task_id, ("sent",))
    cut_off(name, allowed=False)
    try:
        while agent.in_flight or not agent.received:  # answered while cut off
            await settle(0.02)
        await settle(0.6)  # at least one more try to record it, refused
    finally:
        cut_off(name, allowed=True)
    await wait_for_readyz(service, 200)
    for _ in range(300):  # the pool may still hand out a connection cut off
        code, task = await call(service, "GET", f"/tasks/{task_id}")
        if code == 200 and task["status"] not in ("sent", "running"):
            break
        await settle(0.02)
    assert (task["status"], task["result"]) == ("completed", {"by": agent.name})
    assert [h["status"] for h in task["history"]] == ["pending", "sent", "completed"]
    assert len(agent.received) == 1


@pytest_twisted.ensureDeferred
async def test_a_removed_agents_metric_series_are_removed(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST, breaker_threshold=1, breaker_cooldown=60)
    good, broken = await start_agent(COMPLETE), await start_agent(BAD_GATEWAY)
    good_id = await register(service, good, capabilities=["analyze_cost"])
    broken_id = await register(service, broken, capabilities=["right_size"])
    assert (await wait_for(service, await submit(service)))["status"] == "completed"
    task = await wait_for(
        service, await submit(service, task_type="right_size", max_retries=0)
    )
    assert task["status"] == "failed"
    metrics = await (await service.get("/metrics")).text()
    assert f'agent="{good_id}",status="completed"' in metrics
    assert f'optiinfra_agent_circuit_state{{agent="{broken_id}"}} 2.0' in metrics
    for agent_id in (good_id, broken_id):
        code, _ = await call(service, "DELETE", f"/api/v1/agents/{agent_id}")
        assert code == 200
    metrics = await (await service.get("/metrics")).text()
    assert good_id not in metrics
    assert broken_id not in metrics
