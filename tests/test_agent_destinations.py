"""
Where tasks may be sent: link-local and metadata addresses and the
orchestrator itself are refused at registration; AGENT_ALLOWED_NETWORKS is
checked at registration and again at connect time, on the resolved address;
an endpoint's path is honoured, and what cannot be honoured is refused.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from optiinfra.destinations import Destinations

from .agents import COMPLETE, StartAgent
from .conftest import RunningService, StartService
from .databases import postgres_database
from .test_routing import FAST, call, submit, wait_for

ROOT = {"name": "x", "type": "cost", "capabilities": ["analyze_cost"]}


def own_port(service: RunningService) -> int:
    return int(service.url.rsplit(":", 1)[1])


async def register_at(service: RunningService, host: str, port: int) -> tuple[int, Any]:
    return await call(
        service, "POST", "/agents/register", {**ROOT, "host": host, "port": port}
    )


async def register_v1(
    service: RunningService, endpoint: str, agent_id: str = "perf-1"
) -> tuple[int, Any]:
    return await call(
        service,
        "POST",
        "/api/v1/agents/register",
        {
            "agent_id": agent_id,
            "agent_type": "cost",
            "endpoint": endpoint,
            "capabilities": ["analyze_cost"],
        },
    )


@pytest_twisted.ensureDeferred
async def test_metadata_link_local_and_the_orchestrator_itself_are_refused(
    start_service: StartService,
) -> None:
    service = await start_service(**FAST)
    for host in ("169.254.169.254", "169.254.1.1", "fe80::1", "fd00:ec2::254"):
        code, body = await register_at(service, host, 80)
        assert (code, body["field"]) == (400, "host"), host
        assert "link-local or cloud metadata" in body["detail"]
    code, body = await register_v1(service, "http://169.254.169.254/latest")
    assert (code, body["field"]) == (400, "endpoint")
    code, body = await register_at(service, "127.0.0.1", own_port(service))
    assert (code, body["field"]) == (400, "host")
    assert body["detail"] == (
        f"127.0.0.1:{own_port(service)} is this orchestrator's own address"
    )
    code, body = await register_v1(service, f"http://localhost:{own_port(service)}")
    assert (code, body["field"]) == (400, "endpoint")
    assert "localhost resolves to an address refused" in body["detail"]
    # Agents on this host at other ports are normal in development.
    code, _ = await register_at(service, "127.0.0.1", 8001)
    assert code == 201
    code, listing = await call(service, "GET", "/agents")
    assert listing["count"] == 1


@pytest_twisted.ensureDeferred
async def test_allowed_networks_are_all_that_is_allowed(
    start_service: StartService,
) -> None:
    service = await start_service(
        **FAST,
        agent_allowed_networks=(
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("169.254.10.0/24"),
        ),
    )
    code, _ = await register_at(service, "10.1.2.3", 8001)
    assert code == 201
    code, _ = await register_at(service, "169.254.10.7", 8001)  # listed: allowed
    assert code == 201
    code, body = await register_at(service, "127.0.0.1", 8001)
    assert (code, body["field"]) == (400, "host")
    assert body["detail"] == "127.0.0.1 is not in AGENT_ALLOWED_NETWORKS"
    code, body = await register_v1(service, "http://localhost:8002")
    assert (code, body["field"]) == (400, "endpoint")
    assert body["detail"] == (
        "localhost resolves to an address refused: "
        "127.0.0.1 is not in AGENT_ALLOWED_NETWORKS"
    )


@pytest.fixture
def shared_database() -> Iterator[str]:
    with postgres_database() as (url, _):
        yield url


@pytest_twisted.ensureDeferred
async def test_the_address_a_name_resolves_to_is_checked_at_every_call(
    start_service: StartService, start_agent: StartAgent, shared_database: str
) -> None:
    # One replica lets the agent in; another, allowed only 10.0.0.0/8, finds
    # it in the shared store: its calls resolve the name and refuse 127.0.0.1.
    open_one = await start_service(**FAST, database_url=shared_database)
    strict = await start_service(
        **FAST,
        database_url=shared_database,
        agent_allowed_networks=(ipaddress.ip_network("10.0.0.0/8"),),
    )
    agent = await start_agent(COMPLETE)
    assert agent.port is not None
    code, _ = await register_v1(
        open_one, f"http://localhost:{agent.port.getHost().port}"
    )
    assert code == 200
    # Replicas share the queue: only the strict one may be left to take it.
    await open_one.pool.closeCachedConnections()
    await open_one.top.stopService()
    task = await wait_for(strict, await submit(strict, max_retries=2))
    assert task["status"] == "failed"
    assert task["error"] == (
        "the agent's address may not be called: "
        "localhost: 127.0.0.1 is not in AGENT_ALLOWED_NETWORKS"
    )
    assert agent.received == []


@pytest_twisted.ensureDeferred
async def test_an_endpoints_path_is_where_tasks_go(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    agent = await start_agent(COMPLETE)
    assert agent.port is not None
    port = agent.port.getHost().port
    code, _ = await register_v1(service, f"http://127.0.0.1:{port}/agents/cost/")
    assert code == 200
    task = await wait_for(service, await submit(service))
    assert task["status"] == "completed"
    assert [r.path for r in agent.received] == ["/agents/cost/task"]
    for endpoint in (
        f"http://127.0.0.1:{port}/agent?token=1",
        f"http://127.0.0.1:{port}/agent#x",
        f"http://user:secret@127.0.0.1:{port}/agent",
        f"http://127.0.0.1:{port}/a%2F..",
        f"ftp://127.0.0.1:{port}/agent",
    ):
        code, body = await register_v1(service, endpoint, agent_id="other")
        assert (code, body["field"]) == (400, "endpoint"), endpoint


def test_the_rule_itself() -> None:
    rule = Destinations()
    assert rule.refusal("10.0.0.1", 80) is None
    assert rule.refusal("::ffff:169.254.169.254", 80) is not None  # mapped v4
    assert rule.refusal("agent.example", 80) is None  # names: when resolved
    rule.listening("0.0.0.0", 8080)  # everywhere: loopback included
    assert rule.refusal("127.0.0.2", 8080) is not None
    assert rule.refusal("127.0.0.2", 8081) is None
    rule.listening("10.0.0.9", 8080)
    assert rule.refusal("10.0.0.9", 8080) is not None
    assert rule.refusal("10.0.0.8", 8080) is None
