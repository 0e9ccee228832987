"""
Concurrent writers and replays, on both backends: one Idempotency-Key is one
task (or coordination), one agent is one registration, whatever arrives at
once; never a 500.  On PostgreSQL the requests are split between two replicas.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults

from optiinfra.routing.parse import request_hash
from optiinfra.store.interface import IStore, Transaction
from optiinfra.store.schema import migrate

from ..agents import HANG, StartAgent, settle
from ..conftest import RunningService, StartService
from ..databases import postgres_schema

TASK = {"task_type": "analyze_cost", "agent_type": "cost"}
AGENT = {
    "name": "cost-agent",
    "type": "cost",
    "host": "127.0.0.1",
    "port": 9,
    "capabilities": ["analyze_cost"],
}
COORDINATION = {
    "customer_id": "acme",
    "recommendations": [
        {
            "id": "r1",
            "agent_id": "cost-agent",
            "agent_type": "cost",
            "customer_id": "acme",
            "type": "optimization",
            "action": "right_size",
            "priority": 5,
            "risk_level": "low",
            "estimated_savings": 10.0,
            "confidence": 0.9,
            "parameters": {},
        }
    ],
}
AT_ONCE = 20


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """
    Asked for before C{start_service}, so that it is dropped after the
    replicas stop: dropped under running replicas, the schema's DROP
    deadlocked with their transactions.
    """
    if request.param == "sqlite":
        yield None
    else:
        with postgres_schema() as url:
            yield url


async def replicas(start_service: StartService, url: str | None) -> list[Any]:
    """Two replicas on one PostgreSQL; the one process of the embedded store."""
    first = await start_service(database_url=url)
    return [first] if url is None else [first, await start_service(database_url=url)]


async def at_once(
    services: list[RunningService], path: str, body: Any, key: str | None
) -> list[tuple[int, dict[str, Any], bool]]:
    """C{AT_ONCE} identical requests, spread over C{services}."""
    headers = {} if key is None else {"Idempotency-Key": key}

    async def one(service: RunningService) -> tuple[int, dict[str, Any], bool]:
        response = await service.request("POST", path, json=body, headers=headers)
        replayed = response.headers.getRawHeaders("idempotent-replayed") == ["true"]
        return response.code, await response.json(), replayed

    return list(
        await gatherResults(
            [
                Deferred.fromCoroutine(one(services[n % len(services)]))
                for n in range(AT_ONCE)
            ]
        )
    )


@pytest_twisted.ensureDeferred
async def test_one_key_posted_at_once_is_one_task(
    database_url: str | None, start_service: StartService
) -> None:
    services = await replicas(start_service, database_url)
    answers = await at_once(services, "/tasks", TASK, "order-1")
    assert {code for code, _, _ in answers} == {201}, answers
    assert len({body["task_id"] for _, body, _ in answers}) == 1
    assert sum(not replayed for _, _, replayed in answers) == 1


@pytest_twisted.ensureDeferred
async def test_one_agent_registered_at_once_is_one_agent(
    database_url: str | None, start_service: StartService
) -> None:
    services = await replicas(start_service, database_url)
    answers = await at_once(services, "/agents/register", AGENT, None)
    assert {code for code, _, _ in answers} <= {200, 201}, answers
    assert len({body["agent_id"] for _, body, _ in answers}) == 1
    listing = await (await services[0].get("/agents")).json()
    assert len(listing["agents"]) == 1


@pytest_twisted.ensureDeferred
async def test_one_key_coordinated_at_once_is_one_coordination(
    database_url: str | None, start_service: StartService
) -> None:
    services = await replicas(start_service, database_url)
    answers = await at_once(services, "/coordination/coordinate", COORDINATION, "b-1")
    assert {code for code, _, _ in answers} == {200}, answers
    assert len({body["id"] for _, body, _ in answers}) == 1
    assert sum(not replayed for _, _, replayed in answers) == 1


@pytest_twisted.ensureDeferred
async def test_replaying_a_task_in_flight_takes_no_slot(
    start_service: StartService, start_agent: StartAgent
) -> None:
    agent = await start_agent(HANG)
    assert agent.port is not None
    service = await start_service(agent_concurrency=2)
    registered = await service.request(
        "POST",
        "/agents/register",
        json={**AGENT, "port": agent.port.getHost().port},
    )
    assert registered.code == 201
    headers = {"Idempotency-Key": "in-flight"}
    while agent.in_flight < 1:
        await service.request("POST", "/tasks", json=TASK, headers=headers)
        await settle(0.02)
    for _ in range(5):  # each replay may find the agent free and reserve it
        response = await service.request("POST", "/tasks", json=TASK, headers=headers)
        assert response.headers.getRawHeaders("idempotent-replayed") == ["true"]
    response = await service.request("POST", "/tasks", json=TASK)
    assert response.code == 201
    for _ in range(300):
        if agent.in_flight == 2:
            break
        await settle(0.01)
    assert agent.in_flight == 2  # the second slot was still free for it
    assert len(agent.tasks) == 2


@pytest_twisted.ensureDeferred
async def test_bodies_differing_after_two_kilobytes_are_different_requests(
    start_service: StartService,
) -> None:
    service = await start_service()
    metadata = {"notes": "x" * 3000}
    first = {**TASK, "metadata": metadata, "priority": "low"}
    other = {
        "task_type": "right_size",
        "agent_type": "cost",
        "metadata": metadata,
        "priority": "critical",
    }
    headers = {"Idempotency-Key": "long-1"}
    response = await service.request("POST", "/tasks", json=first, headers=headers)
    assert response.code == 201
    created = await response.json()
    response = await service.request("POST", "/tasks", json=other, headers=headers)
    assert response.code == 409, await response.text()
    assert (await response.json())["task_id"] == created["task_id"]
    response = await service.request("POST", "/tasks", json=first, headers=headers)
    assert response.code == 201
    assert (await response.json())["task_id"] == created["task_id"]


def _old_hash(document: object) -> str:
    """How request hashes were stored before schema version 8."""
    return orjson.dumps(document, option=orjson.OPT_SORT_KEYS).hex()[:4096]


@pytest_twisted.ensureDeferred
async def test_keys_stored_before_hashes_were_sha256_keep_working(
    store: IStore,
) -> None:
    short = {**TASK, "priority": 3}
    long = {**TASK, "metadata": {"notes": "y" * 3000}}
    rows = [("short", _old_hash(short)), ("long", _old_hash(long)), ("plan", "p:1")]

    def downgrade(tx: Transaction) -> None:
        for key, old in rows:
            tx.execute(
                "INSERT INTO coordinations (id, customer_id, created_at, document,"
                " idempotency_key, request_hash) VALUES (?, 'c', 1.0, '{}', ?, ?)",
                (key, key, old),
            )
        tx.execute("DELETE FROM schema_migrations WHERE version = 8")

    await store.backend.run(downgrade)
    assert await store.backend.run(migrate) == [8]
    stored = dict(
        await store.backend.run(
            lambda tx: tx.execute(
                "SELECT idempotency_key, request_hash FROM coordinations"
            )
        )
    )
    assert stored["short"] == request_hash(short)  # a replay still matches
    # cut at 2 KB before: never equal to a whole body's hash, so a 409
    assert stored["long"].startswith("cut:")
    assert stored["long"] != request_hash(long)
    assert stored["plan"] == "p:1"  # a plan step's own key is left alone
