"""
Leases and answers across database faults and drains, with real agents on
sockets and real PostgreSQL (a cluster of the test's own where it is broken).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from optiinfra.settings import SettingsError, build_settings

from ..agents import COMPLETE, HANG, FakeAgent, StartAgent, settle
from ..conftest import LogCapture, RunningService, StartService
from ..databases import postgres_schema
from ..pgcluster import PrivateCluster, private_cluster  # noqa: F401 - a fixture

TASK = {"task_type": "analyze_cost", "agent_type": "cost"}
#: The shortest lease STORE_TIMEOUT=1 allows: the tests take seconds, not minutes.
QUICK = {"store_timeout": 1.0, "task_lease": 4.0}


async def register(service: RunningService, agent: FakeAgent) -> None:
    assert agent.port is not None
    response = await service.request(
        "POST",
        "/agents/register",
        json={
            "name": agent.name,
            "type": "cost",
            "host": "127.0.0.1",
            "port": agent.port.getHost().port,
            "capabilities": ["analyze_cost"],
        },
    )
    assert response.code == 201, await response.text()


async def until(predicate: Any, what: str, tries: int = 3000) -> None:
    for _ in range(tries):
        if predicate():
            return
        await settle(0.01)
    raise AssertionError(f"never {what}")


async def task_status(service: RunningService, task_id: str) -> str | None:
    response = await service.get(f"/tasks/{task_id}")
    body = await response.json()
    return body.get("status") if response.code == 200 else None


@pytest.fixture
def shared_schema() -> Iterator[str]:
    with postgres_schema() as url:
        yield url


def test_a_lease_too_short_to_be_renewed_is_refused() -> None:
    with pytest.raises(SettingsError) as refused:
        build_settings({"STORE_TIMEOUT": "5", "TASK_LEASE": "11"})
    assert refused.value.name == "TASK_LEASE"
    assert build_settings({"STORE_TIMEOUT": "5", "TASK_LEASE": "12"}).task_lease == 12
    with pytest.raises(SettingsError):  # the default lease is too short for it
        build_settings({"STORE_TIMEOUT": "10"})


@pytest_twisted.ensureDeferred
async def test_an_answer_the_store_cannot_take_is_recorded_when_it_is_back(
    start_service: StartService,
    start_agent: StartAgent,
    private_cluster: PrivateCluster,  # noqa: F811 - the fixture
) -> None:
    agent = await start_agent(COMPLETE, delay=1.0)
    service = await start_service(
        database_url=private_cluster.url, store_timeout=1.0, task_lease=30.0
    )
    await register(service, agent)
    response = await service.request("POST", "/tasks", json=TASK)
    task_id = (await response.json())["task_id"]
    await until(lambda: agent.in_flight == 1, "sent")
    await deferToThread(private_cluster.stop)
    await until(lambda: agent.in_flight == 0, "answered")  # while the store is out
    await settle(1.0)  # a few tries to record it fail meanwhile
    await deferToThread(private_cluster.start)
    for _ in range(1000):
        if await task_status(service, task_id) == "completed":
            break
        await settle(0.02)
    assert await task_status(service, task_id) == "completed"
    assert agent.tasks == [task_id]  # recorded, not sent again


@pytest_twisted.ensureDeferred
async def test_a_draining_replica_keeps_its_leases_until_its_calls_end(
    start_service: StartService, start_agent: StartAgent, shared_schema: str
) -> None:
    # The calls outlast the lease; the drain lets them finish.
    agent = await start_agent(COMPLETE, delay=5.0)
    draining = await start_service(
        database_url=shared_schema, drain_timeout=8.0, **QUICK
    )
    other = await start_service(database_url=shared_schema, **QUICK)
    await register(draining, agent)
    response = await draining.request("POST", "/tasks", json=TASK)
    task_id = (await response.json())["task_id"]
    await until(lambda: agent.in_flight == 1, "sent")
    await Deferred.fromCoroutine(_stop(draining))
    assert await task_status(other, task_id) == "completed"
    assert agent.tasks == [task_id]  # never taken over by the other replica
    assert agent.most_in_flight == 1


async def _stop(service: RunningService) -> None:
    await service.pool.closeCachedConnections()
    await service.top.stopService()


@pytest_twisted.ensureDeferred
async def test_a_client_hanging_up_while_the_database_is_frozen_is_its_hang_up(
    start_service: StartService,
    logs: LogCapture,
    private_cluster: PrivateCluster,  # noqa: F811 - the fixture
) -> None:
    service = await start_service(database_url=private_cluster.url, store_timeout=2.0)
    port = int(service.url.rsplit(":", 1)[1])
    private_cluster.freeze()
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(b"GET /agents HTTP/1.1\r\nHost: x\r\n\r\n")
    await settle(0.3)  # the request waits on the database
    client.close()
    # its call to the database is cut off at the deadline, after the hang-up
    await until(lambda: "database down" in logs.messages(), "cut off")
    await settle(0.1)
    private_cluster.thaw()
    hung_up = [e for e in logs.events if e.get("message") == "GET /agents 499"]
    assert len(hung_up) == 1  # the access log's word for a client gone
    noise = ("Traceback", "CancelledError", "AlreadyCalled", "Unhandled")
    assert not [e for e in logs.events if any(n in str(e) for n in noise)]


@pytest_twisted.ensureDeferred
async def test_calls_end_before_a_lease_that_cannot_be_renewed_lapses(
    start_service: StartService,
    start_agent: StartAgent,
    logs: LogCapture,
    private_cluster: PrivateCluster,  # noqa: F811 - the fixture
) -> None:
    agent = await start_agent(HANG)
    service = await start_service(database_url=private_cluster.url, **QUICK)
    await register(service, agent)
    response = await service.request("POST", "/tasks", json=TASK)
    task_id = (await response.json())["task_id"]
    await until(lambda: agent.in_flight == 1, "sent")
    await deferToThread(private_cluster.stop)
    # No renewal can reach the database: the call is ended by this replica,
    # before its lease lapses and the task may be taken back and sent again.
    await until(lambda: agent.in_flight == 0, "ended")
    assert "leases could not be renewed: ending the calls in flight" in logs.messages()
    await deferToThread(private_cluster.start)
    await until(lambda: len(agent.tasks) == 2, "sent again once it lapsed")
    assert agent.tasks == [task_id, task_id]
    assert agent.most_in_flight == 1  # never out twice at once
