"""
An agent belongs to the key that registered it: another agent key gets 403 on
every write route of both dialects, the operator may unregister anything, pins
and the per-key quota hold, and the access log names the key that asked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from optiinfra.auth import AgentPin, Role, generate

from .conftest import LogCapture, RunningService, StartService
from .test_routing import call

OWN_ONLY = (
    "an agent key may register, heartbeat and unregister only the agents it "
    "registered itself"
)


class Keys:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys: dict[str, str] = {}
        lines = []
        for name, role, pin in (
            ("agent-a", Role.AGENT, None),
            ("agent-b", Role.AGENT, None),
            ("ops", Role.OPERATOR, None),
            ("pinned", Role.AGENT, AgentPin(agent_ids=frozenset({"pinned-1"}))),
            ("costs-only", Role.AGENT, AgentPin(agent_type="cost")),
        ):
            key, line = generate(name, role, pin)
            self.keys[name] = key
            lines.append(line)
        path.write_text("\n".join(lines) + "\n")

    def headers(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[name]}"}


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


async def as_key(
    service: RunningService,
    keys: Keys,
    name: str,
    method: str,
    path: str,
    body: Any = None,
) -> tuple[int, Any]:
    return await call(service, method, path, body, headers=keys.headers(name))


ROOT_AGENT = {
    "name": "cost-east",
    "type": "cost",
    "host": "10.0.0.5",
    "port": 8001,
    "capabilities": ["analyze_cost"],
}
V1_AGENT = {
    "agent_id": "perf-1",
    "agent_type": "performance",
    "endpoint": "http://10.0.0.6:8002",
    "capabilities": ["kv_cache_optimization"],
    "metadata": {"zone": "b"},
}


@pytest_twisted.ensureDeferred
async def test_another_agent_key_cannot_touch_an_agent_on_any_write_route(
    start_service: StartService, keys: Keys, logs: LogCapture
) -> None:
    service = await start_service(api_keys_file=keys.path)
    code, created = await as_key(
        service, keys, "agent-a", "POST", "/agents/register", ROOT_AGENT
    )
    assert code == 201
    root_id = created["agent_id"]
    code, _ = await as_key(
        service, keys, "agent-a", "POST", "/api/v1/agents/register", V1_AGENT
    )
    assert code == 200
    before = {
        agent_id: (await as_key(service, keys, "ops", "GET", f"/agents/{agent_id}"))[1]
        for agent_id in (root_id, "perf-1")
    }
    assert before["perf-1"]["metadata"] == {"zone": "b", "optiinfra.key": "agent-a"}
    unhealthy = {"status": "unhealthy"}
    attacks: list[tuple[str, str, Any, str]] = []
    for agent_id in (root_id, "perf-1"):
        attacks += [
            ("POST", f"/agents/{agent_id}/heartbeat", unhealthy, "agent_id"),
            ("POST", f"/api/v1/agents/{agent_id}/heartbeat", unhealthy, "agent_id"),
            (
                "POST",
                "/api/v1/agents/heartbeat",
                {"agent_id": agent_id, **unhealthy},
                "agent_id",
            ),
            ("POST", f"/agents/{agent_id}/unregister", None, "agent_id"),
            ("DELETE", f"/api/v1/agents/{agent_id}", None, "agent_id"),
        ]
    elsewhere = {"host": "10.9.9.9", "port": 9999}
    attacks += [
        # The same name, host and port: the root dialect's identity.
        ("POST", "/agents/register", ROOT_AGENT, "name"),
        # Its id, at another address.
        (
            "POST",
            "/api/v1/agents/register",
            {**V1_AGENT, "endpoint": "http://10.9.9.9:1"},
            "agent_id",
        ),
        # A new id at its name, host and port (which would replace it).
        (
            "POST",
            "/api/v1/agents/register",
            {
                "agent_id": "impostor",
                "agent_name": "cost-east",
                "agent_type": "cost",
                "host": "10.0.0.5",
                "port": 8001,
            },
            "name",
        ),
        ("POST", "/agents/register", {**ROOT_AGENT, **elsewhere}, ""),
    ]
    for method, path, body, field in attacks:
        code, answer = await as_key(service, keys, "agent-b", method, path, body)
        if not field:  # another agent at another address is B's own: fine
            assert code == 201, (path, answer)
            continue
        assert code == 403, (method, path, answer)
        assert answer["field"] == field, (path, answer)
        assert OWN_ONLY in answer["detail"]
    for agent_id, record in before.items():
        code, now = await as_key(service, keys, "ops", "GET", f"/agents/{agent_id}")
        assert code == 200
        assert now == record  # unchanged, last_seen included
    # The access log says who tried.
    refused = [
        e
        for e in logs.named("optiinfra.access")
        if e.get("status") == 403 and e.get("method") == "DELETE"
    ]
    assert [e["key"] for e in refused] == ["agent-b", "agent-b"]
    assert all(keys.keys["agent-b"] not in str(e) for e in logs.events)
    # The owner still can, and the operator may remove any agent.
    code, _ = await as_key(
        service, keys, "agent-a", "POST", f"/agents/{root_id}/heartbeat", unhealthy
    )
    assert code == 200
    code, _ = await as_key(service, keys, "ops", "DELETE", "/api/v1/agents/perf-1")
    assert code == 200
    code, _ = await as_key(
        service, keys, "ops", "POST", f"/agents/{root_id}/unregister"
    )
    assert code == 200
    unregistered = [
        e
        for e in logs.named("optiinfra.registry")
        if e["event"] == "agent unregistered"
    ]
    assert [e["by"] for e in unregistered] == ["ops", "ops"]


@pytest_twisted.ensureDeferred
async def test_an_agent_cannot_claim_an_owner_in_its_metadata(
    start_service: StartService, keys: Keys
) -> None:
    service = await start_service(api_keys_file=keys.path)
    forged = {**V1_AGENT, "metadata": {"optiinfra.key": "agent-a"}}
    code, _ = await as_key(
        service, keys, "agent-b", "POST", "/api/v1/agents/register", forged
    )
    assert code == 200
    code, _ = await as_key(
        service,
        keys,
        "agent-b",
        "POST",
        "/api/v1/agents/heartbeat",
        {"agent_id": "perf-1", "metrics": {}, "metadata": {"optiinfra.key": "agent-a"}},
    )
    assert code == 200
    _, record = await as_key(service, keys, "ops", "GET", "/agents/perf-1")
    assert record["metadata"]["optiinfra.key"] == "agent-b"
    code, _ = await as_key(service, keys, "agent-a", "DELETE", "/api/v1/agents/perf-1")
    assert code == 403


@pytest_twisted.ensureDeferred
async def test_pinned_keys_act_only_within_their_pin(
    start_service: StartService, keys: Keys
) -> None:
    service = await start_service(api_keys_file=keys.path)
    code, answer = await as_key(
        service, keys, "pinned", "POST", "/api/v1/agents/register", V1_AGENT
    )
    assert (code, answer["field"]) == (403, "agent_id")
    assert (
        answer["detail"] == "this key is pinned to the agent ids pinned-1, not perf-1"
    )
    code, _ = await as_key(
        service,
        keys,
        "pinned",
        "POST",
        "/api/v1/agents/register",
        {**V1_AGENT, "agent_id": "pinned-1"},
    )
    assert code == 200
    code, answer = await as_key(
        service, keys, "costs-only", "POST", "/api/v1/agents/register", V1_AGENT
    )
    assert (code, answer["field"]) == (403, "agent_type")
    assert answer["detail"] == "this key is pinned to cost agents, not performance"
    code, _ = await as_key(
        service, keys, "costs-only", "POST", "/agents/register", ROOT_AGENT
    )
    assert code == 201


@pytest_twisted.ensureDeferred
async def test_an_agent_key_registers_at_most_its_quota(
    start_service: StartService, keys: Keys
) -> None:
    service = await start_service(api_keys_file=keys.path, agent_key_max_agents=2)
    for n in range(2):
        code, _ = await as_key(
            service,
            keys,
            "agent-a",
            "POST",
            "/api/v1/agents/register",
            {
                **V1_AGENT,
                "agent_id": f"perf-{n}",
                "endpoint": f"http://10.0.0.6:{8000 + n}",
            },
        )
        assert code == 200
    third = {**V1_AGENT, "agent_id": "perf-2", "endpoint": "http://10.0.0.6:8002"}
    code, answer = await as_key(
        service, keys, "agent-a", "POST", "/api/v1/agents/register", third
    )
    assert code == 429
    assert answer["detail"] == (
        "this key has registered 2 agents, the most allowed "
        "(AGENT_KEY_MAX_AGENTS=2); unregister one first"
    )
    # Registering one of its own again is no new agent; another key has its own quota.
    again = {**V1_AGENT, "agent_id": "perf-1", "endpoint": "http://10.0.0.6:8001"}
    code, _ = await as_key(
        service, keys, "agent-a", "POST", "/api/v1/agents/register", again
    )
    assert code == 200
    code, _ = await as_key(
        service, keys, "agent-b", "POST", "/api/v1/agents/register", third
    )
    assert code == 200


@pytest_twisted.ensureDeferred
async def test_without_a_key_file_anyone_may_still_do_anything(
    start_service: StartService,
) -> None:
    service = await start_service()
    code, created = await call(service, "POST", "/agents/register", ROOT_AGENT)
    assert code == 201
    agent_id = created["agent_id"]
    code, _ = await call(
        service, "POST", f"/agents/{agent_id}/heartbeat", {"status": "degraded"}
    )
    assert code == 200
    code, _ = await call(service, "POST", "/agents/register", ROOT_AGENT)
    assert code == 201
    code, _ = await call(service, "DELETE", f"/api/v1/agents/{agent_id}")
    assert code == 200


@pytest_twisted.ensureDeferred
async def test_agents_are_listed_in_pages_or_all_up_to_a_cap(
    start_service: StartService, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = await start_service()
    ids = []
    for n in range(5):
        code, created = await call(
            service, "POST", "/agents/register", {**ROOT_AGENT, "port": 9000 + n}
        )
        assert code == 201
        ids.append(created["agent_id"])
    ids.sort()
    _, everything = await call(service, "GET", "/agents")
    assert set(everything) == {"agents", "count"}  # the contract's shape
    assert [a["id"] for a in everything["agents"]] == ids
    _, page = await call(service, "GET", "/agents?limit=2&offset=1")
    assert (page["count"], page["limit"], page["offset"]) == (2, 2, 1)
    assert [a["id"] for a in page["agents"]] == ids[1:3]
    _, typed = await call(service, "GET", "/agents/type/cost?limit=1&offset=4")
    assert [a["id"] for a in typed["agents"]] == ids[4:]
    monkeypatch.setattr("optiinfra.registry.routes.MAX_AGENTS_LISTED", 3)
    _, capped = await call(service, "GET", "/api/v1/agents")
    assert [a["id"] for a in capped["agents"]] == ids[:3]
    assert (capped["count"], capped["truncated"], capped["next_offset"]) == (3, True, 3)
    _, rest = await call(service, "GET", "/api/v1/agents?offset=3")
    assert [a["id"] for a in rest["agents"]] == ids[3:]
    assert "truncated" not in rest
    for query in ("limit=501", "limit=x", "offset=-1"):
        code, body = await call(service, "GET", f"/agents?{query}")
        assert (code, body["field"]) == (400, query.split("=")[0]), query
