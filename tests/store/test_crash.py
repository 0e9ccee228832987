"""
PostgreSQL crashed under load: every task answered 201 is there after the restart.

The cluster is the test's own, its WAL writer slowed to 10 s so that a commit
not flushed by the one who made it stays in memory for the crash to lose: a
barrier that does not really flush is caught.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults

from ..agents import HANG, StartAgent
from ..conftest import RunningService, StartService
from ..pgcluster import PrivateCluster, private_cluster  # noqa: F401 - a fixture

TASK = {"task_type": "analyze_cost", "agent_type": "cost"}
#: Crashes, clients posting at once, and tasks accepted before each crash.
ROUNDS = 3
CLIENTS = 4
CRASH_AFTER = 200


async def register(service: RunningService, port: int) -> None:
    response = await service.request(
        "POST",
        "/agents/register",
        json={
            "name": "cost-agent",
            "type": "cost",
            "host": "127.0.0.1",
            "port": port,
            "capabilities": ["analyze_cost"],
        },
    )
    assert response.code == 201, await response.text()


@pytest_twisted.ensureDeferred
async def test_no_accepted_task_is_lost_to_a_crash(
    start_service: StartService,
    start_agent: StartAgent,
    private_cluster: PrivateCluster,  # noqa: F811 - the fixture
) -> None:
    cluster = private_cluster
    cluster.stop()
    cluster.settings.update(wal_writer_delay="10s")
    cluster.start()
    # Calls left open: no answer's commit flushes the log for the tasks.
    agent = await start_agent(HANG)
    assert agent.port is not None
    accepted: list[str] = []
    for _ in range(ROUNDS):
        accepted += await crash_under_load(
            await start_service(
                database_url=cluster.url, agent_concurrency=10_000, drain_timeout=0.1
            ),
            cluster,
            agent.port.getHost().port,
        )
        cluster.start()
    stored = {row[0] for row in cluster.query("SELECT id FROM tasks")}
    missing = [task_id for task_id in accepted if task_id not in stored]
    assert len(accepted) >= ROUNDS * CRASH_AFTER
    assert missing == [], f"{len(missing)} of {len(accepted)} accepted tasks lost"


async def crash_under_load(
    service: RunningService, cluster: PrivateCluster, agent_port: int
) -> list[str]:
    """
    Tasks from a few clients at once until the cluster is crashed (by the
    client whose answer is the C{CRASH_AFTER}th, at once: the commits just
    answered are the newest in the log); the ids answered 201.
    """
    await register(service, agent_port)
    accepted: list[str] = []

    async def client() -> None:
        while cluster.running:
            try:
                response = await service.request("POST", "/tasks", json=TASK)
                body: dict[str, Any] = await response.json()
            except Exception:  # noqa: S112 - a connection cut by the crash
                continue
            if response.code == 201:
                accepted.append(body["task_id"])
                if len(accepted) == CRASH_AFTER:
                    cluster.crash()

    await gatherResults([Deferred.fromCoroutine(client()) for _ in range(CLIENTS)])
    await service.pool.closeCachedConnections()
    await service.top.stopService()
    return accepted
