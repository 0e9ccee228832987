"""
Overload against a real twistd: submissions far outrun what one agent can do.

Before, a task whose deadline passed between its claim and its call made the
dispatch pass fail with a negative timer, the slots it had reserved were never
released, and the agent never got another task until a restart.  Now the
orchestrator refuses what it cannot do in time (429 with Retry-After), and
afterwards an idle orchestrator sends a new task at once.  Calls cut short by
their deadline while still connecting no longer count against the agent's
breaker either: they had opened its circuit, taking a healthy agent out of
rotation for the cool-down.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import deferLater
from twisted.web.client import HTTPConnectionPool

from ..agents import COMPLETE, StartAgent, settle
from .twistd import Twistd

pytestmark = pytest.mark.slow

TASK = {"task_type": "analyze_cost", "agent_type": "cost"}


async def _json(response: Any) -> Any:
    return orjson.loads(await treq.content(response))


@pytest_twisted.ensureDeferred
async def test_after_an_overload_burst_a_task_goes_out_at_once(
    processes: list[Twistd], start_agent: StartAgent
) -> None:
    agent = await start_agent(COMPLETE, delay=0.02)
    process = Twistd(
        "--port",
        "tcp:0:interface=127.0.0.1",
        env={"AGENT_CONCURRENCY": "4", "MAX_WAITING_TASKS": "300"},
    )
    processes.append(process)
    base = f"http://127.0.0.1:{process.port()}"
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 32
    try:
        assert agent.port is not None
        registered = await treq.post(
            f"{base}/agents/register",
            json={
                "name": "slow-cost",
                "type": "cost",
                "host": "127.0.0.1",
                "port": agent.port.getHost().port,
                "capabilities": ["analyze_cost"],
            },
            pool=pool,
        )
        assert registered.code == 201, await _json(registered)

        # 16 clients, each posting again as soon as it has an answer, for
        # 8 s: about 200 tasks/s reach the agent, many times that are offered.
        codes: Counter[int] = Counter()
        refusals: list[tuple[bytes | None, Any]] = []
        stop_at = reactor.seconds() + 8.0

        async def client() -> None:
            while reactor.seconds() < stop_at:
                response = await treq.post(
                    f"{base}/tasks",
                    json={**TASK, "timeout_seconds": 0.5},
                    pool=pool,
                )
                body = await _json(response)
                codes[response.code] += 1
                if response.code == 429 and len(refusals) < 5:
                    refusals.append(
                        (
                            response.headers.getRawHeaders(b"retry-after", [None])[0],
                            body,
                        )
                    )

        await gatherResults([ensureDeferred(client()) for _ in range(16)])
        assert set(codes) <= {201, 429}, codes
        assert codes[201] > 100, codes
        assert codes[429] > 0, codes
        for retry_after, body in refusals:
            assert retry_after == b"1"
            assert "error" in body

        # Let every accepted task reach its end (their deadlines are 0.5 s).
        for _ in range(200):
            metrics = await treq.content(await treq.get(f"{base}/metrics", pool=pool))
            waiting = [
                line
                for line in metrics.decode().splitlines()
                if line.startswith("optiinfra_tasks_waiting ")
            ]
            if waiting and float(waiting[0].split()[1]) == 0:
                break
            await settle(0.1)
        await deferLater(reactor, 1.5, lambda: None)  # past every deadline

        # Idle now: one task goes straight to the agent and completes.
        sent_before = len(agent.received)
        created = await treq.post(
            f"{base}/tasks", json={**TASK, "timeout_seconds": 5}, pool=pool
        )
        assert created.code == 201, await _json(created)
        task_id = (await _json(created))["task_id"]
        for _ in range(100):
            task = await _json(await treq.get(f"{base}/tasks/{task_id}", pool=pool))
            if task["status"] not in ("pending", "queued", "sent", "running"):
                break
            await settle(0.05)
        assert task["status"] == "completed", (
            task,
            [line for line in process.lines if line.get("level") == "error"][:3],
        )
        assert len(agent.received) == sent_before + 1
        # No pass failed on the way: nothing was left reserved.
        failures = [
            line
            for line in process.lines
            if line.get("message") == "dispatch pass failed"
        ]
        assert failures == [], failures[:3]
    finally:
        await pool.closeCachedConnections()
