"""
Task types are what agents offer: the performance agent's real capabilities
are routable, typos are still caught, and TASK_TYPES adds names of one's own.
"""

from __future__ import annotations

import pytest_twisted

from .agents import COMPLETE, StartAgent
from .conftest import StartService
from .test_routing import FAST, call, wait_for

#: What the real performance agent registers.
PERFORMANCE = [
    "performance_monitoring",
    "bottleneck_detection",
    "kv_cache_optimization",
    "quantization_optimization",
    "batch_size_tuning",
]


@pytest_twisted.ensureDeferred
async def test_the_performance_agents_own_capabilities_are_task_types(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    kv = {"task_type": "kv_cache_optimization", "agent_type": "performance"}
    code, body = await call(service, "POST", "/tasks", kv)
    assert (code, body["field"]) == (400, "task_type")
    assert body["detail"] == (
        "no performance agent offers kv_cache_optimization; "
        "offered now: optimize_kv_cache, tune_inference"
    )
    agent = await start_agent(COMPLETE)
    assert agent.port is not None
    code, _ = await call(
        service,
        "POST",
        "/api/v1/agents/register",
        {
            "agent_id": "performance-agent-001",
            "agent_type": "performance",
            "capabilities": PERFORMANCE,
            "endpoint": f"http://localhost:{agent.port.getHost().port}",
            "health_check_endpoint": "/api/v1/health",
            "status": "active",
        },
    )
    assert code == 200
    code, created = await call(service, "POST", "/tasks", kv)
    assert code == 201, created
    task = await wait_for(service, created["task_id"])
    assert (task["status"], task["agent_id"]) == ("completed", "performance-agent-001")
    assert agent.task_types == ["kv_cache_optimization"]
    # A typo is still caught, and the error lists what is offered.
    code, body = await call(
        service,
        "POST",
        "/tasks",
        {"task_type": "kv_cache_optimisation", "agent_type": "performance"},
    )
    assert (code, body["field"]) == (400, "task_type")
    assert body["detail"] == (
        "no performance agent offers kv_cache_optimisation; offered now: "
        "batch_size_tuning, bottleneck_detection, kv_cache_optimization, "
        "optimize_kv_cache, performance_monitoring, quantization_optimization, "
        "tune_inference"
    )
    # What a performance agent offers is not a cost agent's task type.
    code, body = await call(
        service,
        "POST",
        "/tasks",
        {"task_type": "kv_cache_optimization", "agent_type": "cost"},
    )
    assert (code, body["field"]) == (400, "task_type")
    _, listing = await call(service, "GET", "/tasks?task_type=kv_cache_optimization")
    assert listing["count"] == 1


@pytest_twisted.ensureDeferred
async def test_task_types_set_by_the_operator_are_accepted_before_any_agent(
    start_service: StartService,
) -> None:
    service = await start_service(**FAST, task_types=frozenset({"warm_cache"}))
    code, created = await call(
        service,
        "POST",
        "/tasks",
        {"task_type": "warm_cache", "agent_type": "resource", "timeout_seconds": 5},
    )
    assert code == 201
    task = await wait_for(service, created["task_id"], ("queued",))
    assert task["status"] == "queued"  # waits for an agent that offers it
