"""Refusing work at the door: the rules, then over HTTP against a real socket."""

from __future__ import annotations

import pytest
import pytest_twisted

from optiinfra.routing.admission import Admission, Backlog

from ..agents import HANG, StartAgent, until_sent
from ..conftest import StartService
from ..test_routing import TASK, call, register

NOW = 1000.0


def counted(
    by_kind: dict[tuple[str, int], tuple[int, float]], max_waiting: int = 100
) -> Admission:
    admission = Admission(max_waiting)
    admission.counted(Backlog(by_kind), NOW)
    return admission


def test_a_task_is_taken_while_the_queue_moves() -> None:
    admission = counted({("cost", 5): (10, NOW - 0.5)})
    assert admission.refuse("cost", 5, 30.0, NOW) is None
    assert admission.waiting == 10


def test_too_many_waiting_is_refused_whatever_the_task() -> None:
    admission = counted({("cost", 5): (99, NOW)})
    assert admission.refuse("performance", 15, 300.0, NOW) is None
    admission.queued("cost")  # this process queued one since the count
    refusal = admission.refuse("performance", 15, 300.0, NOW)
    assert refusal is not None
    assert refusal.reason == "backlog"
    assert "100 tasks are waiting" in refusal.message
    admission.dequeued("cost", 2)
    assert admission.refuse("performance", 15, 300.0, NOW) is None


def test_a_task_that_would_wait_more_than_half_its_timeout_is_refused() -> None:
    admission = counted(
        {("cost", 5): (300, NOW - 1.0), ("cost", 9): (100, NOW)}, max_waiting=10_000
    )
    for tick in range(200):  # 100 starts a second over the last two seconds
        admission.starts.started("cost", NOW - 1.99 + tick / 100)
    assert admission.starts.per_second("cost", NOW) == pytest.approx(100, rel=0.15)
    refusal = admission.refuse("cost", 5, 7.0, NOW)  # 400 ahead: ~4 s of its 7
    assert refusal is not None
    assert refusal.reason == "queue_delay"
    assert refusal.field == "timeout_seconds"
    assert "400 tasks for cost agents wait before this one" in refusal.message
    assert admission.refuse("cost", 5, 10.0, NOW) is None
    assert admission.refuse("cost", 9, 7.0, NOW) is None  # only 100 before it
    # Those started by this process since the count are no longer ahead.
    admission.dequeued("cost", 200)
    assert admission.refuse("cost", 5, 7.0, NOW) is None
    # Starts long gone say nothing of the rate now: the oldest-wait rule then.
    assert admission.starts.per_second("cost", NOW + 5) == 0


def test_without_starts_a_task_older_than_the_timeout_ahead_refuses() -> None:
    admission = counted({("cost", 5): (3, NOW - 12.0), ("cost", 9): (1, NOW - 1.0)})
    refusal = admission.refuse("cost", 5, 10.0, NOW)
    assert refusal is not None
    assert refusal.reason == "queue_delay"
    assert refusal.field == "timeout_seconds"
    assert "waited 12.0 s" in refusal.message
    # A longer timeout, a more urgent task, or another agent type is taken:
    # only tasks served before it count.
    assert admission.refuse("cost", 5, 20.0, NOW) is None
    assert admission.refuse("cost", 9, 10.0, NOW) is None
    assert admission.refuse("resource", 5, 10.0, NOW) is None
    # A count too old to say anything about the queue now is not used.
    assert admission.refuse("cost", 5, 10.0, NOW + 11.0) is None


def test_the_oldest_wait_is_what_the_count_saw() -> None:
    assert counted({}).oldest_wait(NOW) == 0.0
    admission = counted({("cost", 5): (3, NOW - 4.0), ("cost", 1): (3, NOW + 2.0)})
    assert admission.oldest_wait(NOW) == pytest.approx(4.0)


@pytest_twisted.ensureDeferred
async def test_past_the_waiting_limit_submissions_get_429(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(
        agent_concurrency=1, max_waiting_tasks=2, drain_timeout=0.5
    )
    agent = await start_agent(HANG)
    await register(service, agent)
    accepted = []
    for number in range(3):  # one goes out and hangs, two wait
        code, body = await call(service, "POST", "/tasks", TASK)
        assert code == 201, body
        accepted.append(body["task_id"])
        if number == 0:
            await until_sent(agent, "analyze_cost")
    response = await service.request("POST", "/tasks", json=TASK)
    assert response.code == 429
    assert response.headers.getRawHeaders(b"retry-after") == [b"1"]
    body = await response.json()
    assert "2 tasks are waiting" in body["error"]
    assert body["request_id"]
    code, page = await call(service, "GET", "/tasks")
    assert sorted(t["task_id"] for t in page["tasks"]) == sorted(accepted)
    metrics = await (await service.get("/metrics")).text()
    assert 'optiinfra_tasks_refused_total{reason="backlog"} 1.0' in metrics
    # A cancelled waiting task makes room at once.
    code, _ = await call(service, "DELETE", f"/tasks/{accepted[-1]}")
    assert code == 200
    code, body = await call(service, "POST", "/tasks", TASK)
    assert code == 201, body


def test_a_burst_after_a_quiet_spell_is_measured_at_its_own_pace() -> None:
    admission = Admission(max_waiting=10_000)
    for tick in range(50):  # 50 starts in the last 0.2 s, none before
        admission.starts.started("cost", NOW - 0.2 + tick * 0.004)
    assert admission.starts.per_second("cost", NOW) >= 100
    admission.counted(Backlog({("cost", 5): (60, NOW)}), NOW)
    # 60 ahead at >= 100 a second: well under half of 3 s; not refused.
    assert admission.refuse("cost", 5, 3.0, NOW) is None
