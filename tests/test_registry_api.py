"""The registry over real HTTP: both dialects, one registry underneath."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from optiinfra.auth import Role, generate

from .client import call
from .conftest import RunningService, StartService

COST = {
    "name": "cost-agent",
    "type": "cost",
    "host": "10.0.0.5",
    "port": 8001,
    "capabilities": ["analyze_cost", "right_size"],
    "version": "1.2.0",
    "metadata": {"region": "eu"},
}

PERFORMANCE_V1 = {
    "agent_id": "performance-agent-001",
    "agent_type": "performance",
    "capabilities": ["optimize_kv_cache", "tune_inference"],
    "endpoint": "http://localhost:8002",
    "health_check_endpoint": "/api/v1/health",
    "version": "0.3.0",
    "metadata": {"gpu": "a100"},
    "status": "active",
}

APPLICATION_V1 = {
    "agent_id": "application-agent",
    "agent_name": "Application Agent",
    "agent_type": "application",
    "version": "1.0.0",
    "host": "localhost",
    "port": 8004,
    "capabilities": ["validate_quality", "detect_regression"],
    "status": "active",
}


@pytest_twisted.ensureDeferred
async def test_register_as_the_contract_says(service: RunningService) -> None:
    code, body = await call(service, "POST", "/agents/register", COST)
    assert code == 201
    assert set(body) == {
        "agent_id",
        "registered_at",
        "heartbeat_url",
        "heartbeat_interval_seconds",
    }
    assert body["heartbeat_url"] == f"/agents/{body['agent_id']}/heartbeat"
    assert body["heartbeat_interval_seconds"] == 30
    code, agent = await call(service, "GET", f"/agents/{body['agent_id']}")
    assert code == 200
    assert agent["id"] == body["agent_id"]
    assert agent["status"] == "healthy"
    assert agent["capabilities"] == ["analyze_cost", "right_size"]
    assert agent["metadata"] == {"region": "eu"}
    assert agent["registered_at"] == body["registered_at"]
    for field in ("name", "type", "host", "port", "version", "last_seen"):
        assert field in agent


@pytest_twisted.ensureDeferred
async def test_registering_again_keeps_id_and_time(service: RunningService) -> None:
    _, first = await call(service, "POST", "/agents/register", COST)
    code, again = await call(
        service, "POST", "/agents/register", {**COST, "version": "1.3.0"}
    )
    assert code == 201
    assert again["agent_id"] == first["agent_id"]
    assert again["registered_at"] == first["registered_at"]
    _, listing = await call(service, "GET", "/agents")
    assert listing["count"] == 1
    assert listing["agents"][0]["version"] == "1.3.0"


@pytest_twisted.ensureDeferred
async def test_heartbeat_merges_metadata_and_takes_status(
    service: RunningService,
) -> None:
    _, registered = await call(service, "POST", "/agents/register", COST)
    agent_id = registered["agent_id"]
    code, beat = await call(
        service,
        "POST",
        f"/agents/{agent_id}/heartbeat",
        {"status": "degraded", "metadata": {"load": 0.9}},
    )
    assert code == 200
    assert beat["received"] is True
    assert beat["next_interval_seconds"] == 30
    assert beat["timestamp"].endswith("Z")
    _, agent = await call(service, "GET", f"/agents/{agent_id}")
    assert agent["status"] == "degraded"
    assert agent["metadata"] == {"region": "eu", "load": 0.9}


@pytest_twisted.ensureDeferred
async def test_heartbeat_with_an_empty_body_means_healthy(
    service: RunningService,
) -> None:
    _, registered = await call(service, "POST", "/agents/register", COST)
    response = await service.request(
        "POST", f"/agents/{registered['agent_id']}/heartbeat"
    )
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_unknown_agent_heartbeat_says_register_again(
    service: RunningService,
) -> None:
    code, body = await call(
        service, "POST", "/agents/ghost/heartbeat", {"status": "healthy"}
    )
    assert code == 404
    assert "register again" in body["error"]
    assert body["action"] == "register"
    assert body["agent_id"] == "ghost"


@pytest_twisted.ensureDeferred
async def test_invalid_status_names_the_allowed_values(
    service: RunningService,
) -> None:
    _, registered = await call(service, "POST", "/agents/register", COST)
    code, body = await call(
        service,
        "POST",
        f"/agents/{registered['agent_id']}/heartbeat",
        {"status": "sleepy"},
    )
    assert code == 400
    assert body["field"] == "status"
    assert "healthy, degraded, unhealthy" in body["detail"]


@pytest_twisted.ensureDeferred
async def test_the_real_agents_dialect(service: RunningService) -> None:
    code, body = await call(service, "POST", "/api/v1/agents/register", PERFORMANCE_V1)
    assert code == 200
    assert body["agent_id"] == "performance-agent-001"
    code, body = await call(service, "POST", "/api/v1/agents/register", APPLICATION_V1)
    assert code == 200
    _, agent = await call(service, "GET", "/agents/performance-agent-001")
    assert (agent["host"], agent["port"]) == ("localhost", 8002)
    assert agent["status"] == "healthy"  # "active"
    assert agent["endpoint"] == "http://localhost:8002"
    assert agent["health_check_endpoint"] == "/api/v1/health"
    _, app_agent = await call(service, "GET", "/api/v1/agents/application-agent")
    assert app_agent["name"] == "Application Agent"
    # heartbeat by body, by path, and through the root path: one registry
    code, _ = await call(
        service,
        "POST",
        "/api/v1/agents/heartbeat",
        {
            "agent_id": "performance-agent-001",
            "timestamp": "2025-10-16T10:00:00Z",
            "status": "healthy",
            "metrics": {"gpu_util": 0.5},
        },
    )
    assert code == 200
    code, _ = await call(
        service,
        "POST",
        "/api/v1/agents/application-agent/heartbeat",
        {"status": "active"},
    )
    assert code == 200
    code, _ = await call(
        service, "POST", "/agents/performance-agent-001/heartbeat", {"status": "active"}
    )
    assert code == 200
    _, agent = await call(service, "GET", "/agents/performance-agent-001")
    assert agent["metadata"]["metrics"] == {"gpu_util": 0.5}
    code, body = await call(service, "DELETE", "/api/v1/agents/application-agent")
    assert code == 200
    code, _ = await call(service, "GET", "/agents/application-agent")
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_root_registered_agent_heartbeats_through_v1(
    service: RunningService,
) -> None:
    _, registered = await call(service, "POST", "/agents/register", COST)
    code, _ = await call(
        service,
        "POST",
        "/api/v1/agents/heartbeat",
        {"agent_id": registered["agent_id"], "status": "healthy"},
    )
    assert code == 200


@pytest_twisted.ensureDeferred
async def test_unregister(service: RunningService) -> None:
    _, registered = await call(service, "POST", "/agents/register", COST)
    agent_id = registered["agent_id"]
    code, body = await call(service, "POST", f"/agents/{agent_id}/unregister")
    assert (code, body) == (200, {"message": "Agent unregistered successfully"})
    code, body = await call(service, "GET", f"/agents/{agent_id}")
    assert code == 404
    assert body["error"] == "Agent not found"
    code, _ = await call(service, "POST", f"/agents/{agent_id}/unregister")
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_listing_filters(service: RunningService) -> None:
    await call(service, "POST", "/agents/register", COST)
    await call(
        service,
        "POST",
        "/agents/register",
        {**COST, "name": "cost-2", "capabilities": ["analyze_cost"]},
    )
    await call(service, "POST", "/api/v1/agents/register", PERFORMANCE_V1)
    _, all_agents = await call(service, "GET", "/agents")
    assert all_agents["count"] == 3
    _, by_type = await call(service, "GET", "/agents/type/cost")
    assert by_type["count"] == 2
    _, filtered = await call(service, "GET", "/agents?type=cost&capability=right_size")
    assert [a["name"] for a in filtered["agents"]] == ["cost-agent"]
    _, both = await call(
        service, "GET", "/agents?capability=analyze_cost&capability=right_size"
    )
    assert both["count"] == 1
    _, healthy = await call(service, "GET", "/agents?status=healthy")
    assert healthy["count"] == 3
    _, none = await call(service, "GET", "/agents?status=unreachable")
    assert none["count"] == 0
    for query, field in (
        ("?type=robot", "type"),
        ("?status=asleep", "status"),
    ):
        code, body = await call(service, "GET", "/agents" + query)
        assert (code, body["field"]) == (400, field)
    code, body = await call(service, "GET", "/agents/type/robot")
    assert (code, body["field"]) == (400, "type")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"port": 0}, "port"),
        ({"port": 65536}, "port"),
        ({"port": "8001"}, "port"),
        ({"port": True}, "port"),
        ({"type": "robot"}, "type"),
        ({"name": None}, "name"),
        ({"host": ""}, "host"),
        ({"capabilities": "analyze_cost"}, "capabilities"),
        ({"capabilities": ["x"] * 300}, "capabilities"),
        ({"capabilities": [1]}, "capabilities[0]"),
        ({"metadata": []}, "metadata"),
        ({"status": "sleepy"}, "status"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_registrations_name_the_field_and_store_nothing(
    service: RunningService, change: dict[str, Any], field: str
) -> None:
    code, body = await call(service, "POST", "/agents/register", {**COST, **change})
    assert code == 400
    assert body["field"] == field
    _, listing = await call(service, "GET", "/agents")
    assert listing["count"] == 0


@pytest_twisted.ensureDeferred
async def test_malformed_bodies(service: RunningService) -> None:
    for data, headers, status, field in (
        (b"{not json", {}, 400, "body"),
        (b"[1, 2]", {}, 400, "body"),
        (b"", {}, 400, "body"),
        (
            b"name=x",
            {"Content-Type": "application/x-www-form-urlencoded"},
            415,
            "content-type",
        ),
    ):
        response = await service.request(
            "POST", "/agents/register", data=data, headers=headers
        )
        body = await response.json()
        assert (response.code, body["field"]) == (status, field), data


@pytest_twisted.ensureDeferred
async def test_v1_endpoint_validation(service: RunningService) -> None:
    for endpoint in ("ftp://x:1", "http://", "http://host:99999", "not a url"):
        code, body = await call(
            service,
            "POST",
            "/api/v1/agents/register",
            {**PERFORMANCE_V1, "endpoint": endpoint},
        )
        assert (code, body["field"]) == (400, "endpoint"), endpoint
    code, _ = await call(
        service,
        "POST",
        "/api/v1/agents/register",
        {**PERFORMANCE_V1, "endpoint": "https://perf.internal"},
    )
    assert code == 200
    _, agent = await call(service, "GET", "/agents/performance-agent-001")
    assert agent["port"] == 443


@pytest_twisted.ensureDeferred
async def test_agents_survive_a_restart(
    start_service: StartService, tmp_path: Path
) -> None:
    first = await start_service(state_dir=tmp_path)
    _, registered = await call(first, "POST", "/agents/register", COST)
    await first.pool.closeCachedConnections()
    await first.top.stopService()
    second = await start_service(state_dir=tmp_path)
    code, _ = await call(
        second, "POST", f"/agents/{registered['agent_id']}/heartbeat", {}
    )
    assert code == 200
    _, agent = await call(second, "GET", f"/agents/{registered['agent_id']}")
    assert agent["registered_at"] == registered["registered_at"]


def key_file(path: Path) -> dict[str, str]:
    keys = {}
    lines = []
    for role in Role:
        key, line = generate(f"{role.value}-key", role)
        keys[role.value] = key
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")
    return keys


@pytest_twisted.ensureDeferred
async def test_api_keys_and_roles(start_service: StartService, tmp_path: Path) -> None:
    keys = key_file(tmp_path / "keys")
    service = await start_service(api_keys_file=tmp_path / "keys")
    response = await service.request("POST", "/agents/register", json=COST)
    assert response.code == 401
    assert response.headers.getRawHeaders("www-authenticate") == [
        'Bearer realm="optiinfra"'
    ]
    wrong = await service.request(
        "GET", "/agents", headers={"Authorization": "Bearer oik_wrong"}
    )
    assert wrong.code == 401
    viewer = {"X-API-Key": keys["viewer"]}
    assert (await service.request("GET", "/agents", headers=viewer)).code == 200
    forbidden = await service.request(
        "POST", "/agents/register", json=COST, headers=viewer
    )
    assert forbidden.code == 403
    agent = {"Authorization": f"Bearer {keys['agent']}"}
    code, registered = await call(
        service, "POST", "/agents/register", COST, headers=agent
    )
    assert code == 201
    operator = {"Authorization": f"bearer {keys['operator']}"}
    code, _ = await call(
        service,
        "POST",
        f"/agents/{registered['agent_id']}/unregister",
        headers=operator,
    )
    assert code == 200
    for open_path in ("/health", "/livez", "/readyz"):
        assert (await service.get(open_path)).code == 200
