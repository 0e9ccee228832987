"""
Coordination end to end: a real orchestrator, and cost, performance, resource and
application agents on real sockets doing the plans' steps.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.logger import LogLevel

from optiinfra.auth import Role, generate

from .agents import (
    BAD_GATEWAY,
    COMPLETE,
    FAIL,
    HANG,
    FakeAgent,
    StartAgent,
    settle,
    until_sent,
)
from .client import call
from .conftest import LogCapture, RunningService, StartService
from .databases import postgres_schema

CUSTOMER = "acme"
FAST = {"retry_delay": 0.05, "attempt_timeout": 5.0, "coordination_interval": 0.05}
#: Every operation a plan of the default templates can send, and two more.
CAPABILITIES = [
    "take_snapshot",
    "migrate_workload",
    "restore_snapshot",
    "validate_quality",
    "scale_resources",
    "restore_scale",
    "enable_caching",
    "right_size",
    "clean_cache",
]
PLAN_FINAL = ("completed", "rolled_back", "rollback_failed", "cancelled")


async def register(service: RunningService, agent: FakeAgent, kind: str) -> str:
    assert agent.port is not None
    code, body = await call(
        service,
        "POST",
        "/agents/register",
        {
            "name": f"{kind}-{agent.name}",
            "type": kind,
            "host": "127.0.0.1",
            "port": agent.port.getHost().port,
            "capabilities": CAPABILITIES,
        },
    )
    assert code == 201, body
    return str(body["agent_id"])


async def fleet(
    service: RunningService, start_agent: StartAgent
) -> dict[str, FakeAgent]:
    """One agent of each type, registered, all completing what they are sent."""
    agents = {}
    for kind in ("cost", "performance", "resource", "application"):
        agents[kind] = await start_agent(COMPLETE)
        await register(service, agents[kind], kind)
    return agents


def rec(rec_id: str, agent_type: str = "cost", **fields: Any) -> dict[str, Any]:
    return {
        "id": rec_id,
        "agent_id": f"{agent_type}-agent",
        "agent_type": agent_type,
        "customer_id": CUSTOMER,
        "type": "optimization",
        "title": f"recommendation {rec_id}",
        "action": "right_size",
        "risk_level": "low",
        "affected_resources": [f"res-{rec_id}"],
        **fields,
    }


async def coordinate(
    service: RunningService, recommendations: list[dict[str, Any]], **options: Any
) -> dict[str, Any]:
    code, body = await call(
        service,
        "POST",
        "/coordination/coordinate",
        {"customer_id": CUSTOMER, "recommendations": recommendations, **options},
    )
    assert code == 200, body
    return body  # type: ignore[no-any-return]


async def decide(
    service: RunningService, approval_id: str, verb: str, body: dict[str, Any]
) -> tuple[int, Any]:
    """Approve or reject."""
    return await call(
        service, "POST", f"/coordination/approvals/{approval_id}/{verb}", body
    )


async def wait_plan(
    service: RunningService, plan_id: str, statuses: tuple[str, ...] = PLAN_FINAL
) -> dict[str, Any]:
    for _ in range(400):
        code, plan = await call(service, "GET", f"/coordination/plans/{plan_id}")
        assert code == 200, plan
        if plan["status"] in statuses:
            return plan  # type: ignore[no-any-return]
        await settle(0.02)
    raise AssertionError(f"plan {plan_id} stayed {plan['status']}: {plan}")


# Conflicts ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_conflicting_batch_is_resolved_by_the_documented_order(
    start_service: StartService,
) -> None:
    service = await start_service(**FAST)
    result = await coordinate(
        service,
        [
            rec(
                "cost-down",
                "cost",
                action="scale_down",
                affected_resources=["cluster-a/node-1"],
                priority=15,
                estimated_savings=5000,
            ),
            rec(
                "perf-up",
                "performance",
                action="scale_up",
                affected_resources=["cluster-a/node-1"],
                priority=5,
            ),
            rec("cost-cache", "cost", action="right_size"),
        ],
    )
    assert result["total_recommendations"] == 3
    assert result["recommendations_kept"] == 2
    assert {r["id"] for r in result["recommendations"]} == {"perf-up", "cost-cache"}
    types = sorted(c["type"] for c in result["conflicts"])
    assert types == ["action", "resource"]
    assert result["conflicts_detected"] == result["conflicts_resolved"] == 2
    for conflict in result["conflicts"]:
        assert sorted(conflict["recommendation_ids"]) == ["cost-down", "perf-up"]
        assert conflict["resolved"] is True
        assert conflict["kept"] == ["perf-up"]
        assert conflict["dropped"] == ["cost-down"]
        # performance beats cost before priority or savings are looked at
        assert conflict["rule"] == "agent_type"
        assert "perf-up" in conflict["resolution"]
        assert conflict["detected_at"]
        assert conflict["resolved_at"]
    assert [d["id"] for d in result["dropped"]] == ["cost-down"]
    # both kept are low risk: approved at once, a plan each, not yet run
    assert result["auto_approved"] == 2
    assert result["approvals_required"] == 0
    assert {p["status"] for p in result["execution_plans"]} == {"pending"}


@pytest_twisted.ensureDeferred
async def test_customer_constraints_come_first(start_service: StartService) -> None:
    service = await start_service(**FAST)
    result = await coordinate(
        service,
        [
            rec(
                "app", "application", action="enable_caching", affected_resources=["db"]
            ),
            rec("cost", "cost", action="disable_caching", affected_resources=["db"]),
        ],
        metadata={"constraints": {"prefer": ["cost"]}},
    )
    assert [r["id"] for r in result["recommendations"]] == ["cost"]
    assert {c["rule"] for c in result["conflicts"]} == {"customer_constraints"}


@pytest_twisted.ensureDeferred
async def test_a_dependency_chain_is_ordered_dependencies_first(
    start_service: StartService,
) -> None:
    service = await start_service(**FAST)
    result = await coordinate(
        service,
        [
            rec("c", dependencies=["b"], priority=15),
            rec("b", dependencies=["a"], priority=10),
            rec("a", priority=1),
        ],
    )
    assert [r["id"] for r in result["recommendations"]] == ["a", "b", "c"]
    assert result["conflicts"] == []
    after = {p["recommendation_id"]: p["after"] for p in result["execution_plans"]}
    assert after == {"a": [], "b": ["a"], "c": ["b"]}


@pytest_twisted.ensureDeferred
async def test_a_dependency_cycle_is_reported_and_dropped(
    start_service: StartService,
) -> None:
    service = await start_service(**FAST)
    result = await coordinate(
        service,
        [
            rec("x", dependencies=["z"]),
            rec("y", dependencies=["x"]),
            rec("z", dependencies=["y"]),
            rec("free"),
        ],
    )
    [cycle] = result["conflicts"]
    assert cycle["type"] == "dependency"
    assert sorted(cycle["recommendation_ids"]) == ["x", "y", "z"]
    assert "cycle" in cycle["description"]
    assert [r["id"] for r in result["recommendations"]] == ["free"]
    assert sorted(d["id"] for d in result["dropped"]) == ["x", "y", "z"]


# Approvals and execution ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_approval_goes_from_pending_to_executed(
    start_service: StartService, start_agent: StartAgent, logs: LogCapture
) -> None:
    service = await start_service(**FAST)
    agents = await fleet(service, start_agent)
    result = await coordinate(
        service,
        [rec("cache", "performance", action="enable_caching", risk_level="medium")],
    )
    assert result["approvals_required"] == 1
    assert result["execution_plans"] == []
    [pending] = result["approvals"]
    assert pending["status"] == "pending"
    assert pending["required_approvals"] == 1

    code, listed = await call(
        service, "GET", f"/coordination/approvals?customer_id={CUSTOMER}"
    )
    assert code == 200
    assert listed["count"] == 1
    assert listed["approvals"][0]["id"] == pending["id"]
    code, other = await call(
        service, "GET", "/coordination/approvals?customer_id=nobody"
    )
    assert (other["approvals"], other["count"]) == ([], 0)

    code, approved = await decide(
        service, pending["id"], "approve", {"user_id": "alice"}
    )
    assert code == 200, approved
    assert approved["status"] == "approved"
    assert approved["approved_by"] == ["alice"]
    assert approved["decided_at"]
    plan = approved["plan"]
    assert plan["status"] == "pending"  # execute_now was not asked for
    assert approved["plan_id"] == plan["id"]
    assert agents["performance"].received == []

    code, again = await decide(service, pending["id"], "approve", {"user_id": "bob"})
    assert code == 409, again

    code, started = await call(
        service, "POST", f"/coordination/plans/{plan['id']}/execute"
    )
    assert code == 202
    assert started["message"] == "Execution started"
    assert started["plan_id"] == plan["id"]
    done = await wait_plan(service, plan["id"])
    assert done["status"] == "completed"
    [step] = done["steps"]
    assert step["status"] == "completed"
    assert step["task_type"] == "enable_caching"
    assert step["result"] == {"by": agents["performance"].name}
    [received] = agents["performance"].received
    assert received.body["task_id"] == step["task_id"]
    assert received.body["parameters"]["recommendation_id"] == "cache"
    # the step was a real task through the router
    code, task = await call(service, "GET", f"/tasks/{step['task_id']}")
    assert task["status"] == "completed"

    code, twice = await call(
        service, "POST", f"/coordination/plans/{plan['id']}/execute"
    )
    assert code == 409
    assert twice["status"] == "completed"
    assert "plan completed" in logs.messages()


@pytest_twisted.ensureDeferred
async def test_a_critical_change_needs_two_different_people(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    agents = await fleet(service, start_agent)
    result = await coordinate(
        service,
        [rec("big", "resource", action="clean_cache", risk_level="critical")],
        execute_now=True,
    )
    [pending] = result["approvals"]
    assert pending["required_approvals"] == 2
    path = f"/coordination/approvals/{pending['id']}/approve"
    code, first = await call(service, "POST", path, {"user_id": "alice"})
    assert code == 200
    assert first["status"] == "pending"
    assert first["plan"] is None
    code, same = await call(service, "POST", path, {"user_id": "alice"})
    assert code == 409
    assert "alice" in same["error"]
    code, second = await call(service, "POST", path, {"user_id": "bob"})
    assert code == 200
    assert second["status"] == "approved"
    assert second["approved_by"] == ["alice", "bob"]
    # execute_now: approval is what started the work
    done = await wait_plan(service, second["plan_id"])
    assert done["status"] == "completed"
    assert agents["resource"].task_types == ["clean_cache"]


@pytest_twisted.ensureDeferred
async def test_a_rejection_is_recorded_and_final(start_service: StartService) -> None:
    service = await start_service(**FAST)
    result = await coordinate(service, [rec("r", risk_level="high")])
    [pending] = result["approvals"]
    base = f"/coordination/approvals/{pending['id']}"
    code, missing = await call(service, "POST", f"{base}/reject", {"user_id": "carol"})
    assert code == 400
    assert missing["field"] == "reason"
    code, rejected = await call(
        service, "POST", f"{base}/reject", {"user_id": "carol", "reason": "peak season"}
    )
    assert code == 200
    assert rejected["status"] == "rejected"
    assert rejected["rejected_by"] == "carol"
    assert rejected["rejection_reason"] == "peak season"
    assert rejected["plan_id"] is None
    code, _ = await call(service, "POST", f"{base}/approve", {"user_id": "dave"})
    assert code == 409
    code, _ = await call(
        service, "POST", f"{base}/reject", {"user_id": "dave", "reason": "again"}
    )
    assert code == 409
    code, listed = await call(service, "GET", "/coordination/approvals?status=rejected")
    assert [a["id"] for a in listed["approvals"]] == [pending["id"]]


@pytest_twisted.ensureDeferred
async def test_an_expired_approval_can_no_longer_be_approved(
    start_service: StartService, logs: LogCapture
) -> None:
    service = await start_service(**FAST, approval_expiry_medium=0.3)
    result = await coordinate(service, [rec("late", risk_level="medium")])
    [pending] = result["approvals"]
    await settle(0.5)
    code, listed = await call(service, "GET", "/coordination/approvals?status=expired")
    assert [a["id"] for a in listed["approvals"]] == [pending["id"]]
    assert listed["approvals"][0]["status"] == "expired"
    code, refused = await decide(
        service, pending["id"], "approve", {"user_id": "alice"}
    )
    assert code == 409
    assert refused["status"] == "expired"
    # the sweep records it once, and counts it
    assert "approval expired" in logs.messages()
    metrics = await (await service.get("/metrics")).text()
    assert 'optiinfra_coordination_approvals_total{outcome="expired"} 1.0' in metrics


# Plans ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_quality_veto_rolls_back_a_migration(
    start_service: StartService, start_agent: StartAgent, logs: LogCapture
) -> None:
    service = await start_service(**FAST)
    agents = await fleet(service, start_agent)
    agents["application"].behaviour = FAIL  # quality dropped: veto
    result = await coordinate(
        service,
        [rec("spot", "cost", action="migrate_to_spot", affected_resources=["vm-1"])],
        execute_now=True,
    )
    [plan] = result["execution_plans"]
    assert [s["task_type"] for s in plan["steps"]] == [
        "take_snapshot",
        "migrate_workload",
        "validate_quality",
    ]
    done = await wait_plan(service, plan["id"])
    assert done["status"] == "rolled_back", done
    assert [s["status"] for s in done["steps"]] == [
        "completed",
        "rolled_back",
        "failed",
    ]
    assert "validate_quality" in done["error"]
    assert agents["cost"].task_types == [
        "take_snapshot",
        "migrate_workload",
        "restore_snapshot",
    ]
    assert agents["application"].task_types == ["validate_quality"]
    restore = agents["cost"].received[-1].body["parameters"]
    assert restore["rollback_of"] == "migrate_workload"
    assert restore["step_result"] == {"by": agents["cost"].name}
    metrics = await (await service.get("/metrics")).text()
    assert 'optiinfra_coordination_plans_finished_total{status="rolled_back"} 1.0' in (
        metrics
    )
    assert "optiinfra_coordination_step_duration_seconds_count" in metrics


@pytest_twisted.ensureDeferred
async def test_a_failed_rollback_ends_loudly(
    start_service: StartService, start_agent: StartAgent, logs: LogCapture
) -> None:
    service = await start_service(**FAST)
    agents = await fleet(service, start_agent)
    agents["resource"].overrides = {"restore_scale": FAIL}
    # scale_down is validate -> scale -> validate: the first validation passes,
    # the scaling is slow enough to make the second one fail meanwhile
    agents["resource"].delay = 0.3
    result = await coordinate(
        service,
        [rec("down", "resource", action="scale_down", affected_resources=["pool"])],
        execute_now=True,
    )
    [plan] = result["execution_plans"]
    await until_sent(agents["resource"], "scale_resources")
    agents["application"].overrides = {"validate_quality": FAIL}
    done = await wait_plan(service, plan["id"])
    assert done["status"] == "rollback_failed", done
    assert [s["status"] for s in done["steps"]] == [
        "completed",
        "rollback_failed",
        "failed",
    ]
    assert "restore_scale" in done["steps"][1]["error"]
    [alarm] = [
        e for e in logs.events if e.get("event", "").startswith("plan rollback failed")
    ]
    assert alarm["log_level"] == LogLevel.critical
    assert alarm["plan_id"] == plan["id"]


@pytest_twisted.ensureDeferred
async def test_a_non_critical_failure_is_recorded_and_execution_goes_on(
    start_service: StartService, start_agent: StartAgent, tmp_path: Path
) -> None:
    templates = tmp_path / "templates.json"
    templates.write_text(
        json.dumps(
            {
                "enable_caching": [
                    {"task_type": "clean_cache", "critical": False},
                    {"task_type": "enable_caching", "timeout_seconds": 20},
                ]
            }
        )
    )
    service = await start_service(**FAST, plan_templates_file=templates)
    agents = await fleet(service, start_agent)
    agents["performance"].overrides = {"clean_cache": FAIL}
    result = await coordinate(
        service,
        [rec("c", "performance", action="enable_caching")],
        execute_now=True,
    )
    [plan] = result["execution_plans"]
    done = await wait_plan(service, plan["id"])
    assert done["status"] == "completed"
    assert [s["status"] for s in done["steps"]] == ["failed", "completed"]
    assert done["steps"][0]["critical"] is False
    assert done["steps"][0]["error"] == "could not do it"
    assert agents["performance"].task_types == ["clean_cache", "enable_caching"]


@pytest_twisted.ensureDeferred
async def test_plans_run_after_the_plans_they_depend_on(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    agents = await fleet(service, start_agent)
    result = await coordinate(
        service,
        [
            rec("second", "cost", dependencies=["first"], action="right_size"),
            rec("first", "performance", action="enable_caching", risk_level="medium"),
        ],
        execute_now=True,
    )
    [second] = result["execution_plans"]
    assert second["status"] == "waiting"
    await settle(0.2)
    code, still = await call(service, "GET", f"/coordination/plans/{second['id']}")
    assert still["status"] == "waiting"
    assert agents["cost"].received == []
    [pending] = result["approvals"]
    code, approved = await decide(
        service, pending["id"], "approve", {"user_id": "alice"}
    )
    assert code == 200
    first = await wait_plan(service, approved["plan_id"])
    assert first["status"] == "completed"
    done = await wait_plan(service, second["id"])
    assert done["status"] == "completed"
    assert done["started_at"] >= first["completed_at"]


@pytest_twisted.ensureDeferred
async def test_a_plan_whose_dependency_is_rejected_is_cancelled(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    agents = await fleet(service, start_agent)
    result = await coordinate(
        service,
        [
            rec("second", dependencies=["first"]),
            rec("first", "performance", action="enable_caching", risk_level="high"),
        ],
        execute_now=True,
    )
    [pending] = result["approvals"]
    await decide(service, pending["id"], "reject", {"user_id": "alice", "reason": "no"})
    done = await wait_plan(service, result["execution_plans"][0]["id"])
    assert done["status"] == "cancelled"
    assert "first was rejected" in done["error"]
    assert agents["cost"].received == []


@pytest_twisted.ensureDeferred
async def test_a_plan_interrupted_by_a_restart_resumes(
    start_service: StartService, start_agent: StartAgent, tmp_path: Path
) -> None:
    settings = {**FAST, "state_dir": tmp_path, "drain_timeout": 0.1}
    first = await start_service(**settings)
    agents = await fleet(first, start_agent)
    agents["cost"].overrides = {"migrate_workload": HANG}
    result = await coordinate(
        first,
        [rec("spot", "cost", action="migrate_to_spot")],
        execute_now=True,
    )
    [plan] = result["execution_plans"]
    await until_sent(agents["cost"], "migrate_workload")
    await first.pool.closeCachedConnections()
    await first.top.stopService()  # the step is handed back, the plan stays running

    agents["cost"].overrides = {}
    second = await start_service(**settings)
    done = await wait_plan(second, plan["id"])
    assert done["status"] == "completed", done
    assert [s["status"] for s in done["steps"]] == ["completed"] * 3
    # the snapshot was not taken twice; the migration was sent again after the stop
    assert agents["cost"].task_types.count("take_snapshot") == 1
    assert agents["cost"].task_types.count("migrate_workload") == 2
    assert agents["application"].task_types == ["validate_quality"]


# Bad input, access and documentation -----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_bad_input_names_the_field_and_stores_nothing(
    start_service: StartService,
) -> None:
    service = await start_service(**FAST)
    cases = [
        ({"recommendations": [rec("a")]}, "customer_id"),
        ({"customer_id": CUSTOMER, "recommendations": []}, "recommendations"),
        (
            {
                "customer_id": CUSTOMER,
                "recommendations": [rec(f"r{n}") for n in range(101)],
            },
            "recommendations",
        ),
        (
            {"customer_id": CUSTOMER, "recommendations": [rec("a", risk_level="huge")]},
            "recommendations[0].risk_level",
        ),
        (
            {"customer_id": CUSTOMER, "recommendations": [rec("a"), rec("a")]},
            "recommendations[1].id",
        ),
        (
            {
                "customer_id": CUSTOMER,
                "recommendations": [rec("a", customer_id="other")],
            },
            "recommendations[0].customer_id",
        ),
        (
            {
                "customer_id": CUSTOMER,
                "recommendations": [rec("a", window={"start": "2026-01-01T00:00:00Z"})],
            },
            "recommendations[0].window",
        ),
        (
            {
                "customer_id": CUSTOMER,
                "recommendations": [rec("a", created_at="yesterday")],
            },
            "recommendations[0].created_at",
        ),
        (
            {
                "customer_id": CUSTOMER,
                "recommendations": [rec("a", affected_resources=["bad resource"])],
            },
            "recommendations[0].affected_resources[0]",
        ),
        (
            {"customer_id": CUSTOMER, "recommendations": [rec("a")], "execute_now": 1},
            "execute_now",
        ),
    ]
    cases.append(
        (
            {
                "customer_id": CUSTOMER,
                "recommendations": [rec("a", description="nul\x00here")],
            },
            "recommendations[0].description",
        )
    )
    for bad_time in (
        "0001-01-01T00:00:00+01:00",  # before the first representable UTC time
        "9999-12-31T23:59:59-01:00",
        "2025-W42-4T10:00Z",  # ISO 8601, not RFC 3339
        "2025-10-16T10:00Z",
        "2025-10-16T10:00:00+0200",
        "2025-02-30T10:00:00Z",
    ):
        cases.append(
            (
                {
                    "customer_id": CUSTOMER,
                    "recommendations": [rec("a", expires_at=bad_time)],
                },
                "recommendations[0].expires_at",
            )
        )
    for body, field in cases:
        code, answer = await call(service, "POST", "/coordination/coordinate", body)
        assert code == 400, (body, answer)
        assert answer["field"] == field, answer
    code, listed = await call(service, "GET", "/coordination/approvals")
    assert listed["count"] == 0
    for query, field in (
        ("status=maybe", "status"),
        ("limit=501", "limit"),
        ("offset=-1", "offset"),
        ("customer_id=a%20b", "customer_id"),
    ):
        code, answer = await call(service, "GET", f"/coordination/approvals?{query}")
        assert code == 400
        assert answer["field"] == field
    for path in ("/coordination/plans/nope", "/coordination/approvals/nope"):
        code, answer = await call(service, "GET", path)
        assert code == 404, answer
    code, answer = await call(
        service, "POST", "/coordination/approvals/nope/approve", {"user_id": "a"}
    )
    assert code == 404
    code, answer = await call(service, "POST", "/coordination/plans/nope/execute")
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_with_keys_only_operators_decide_and_as_themselves(
    start_service: StartService, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    operator, operator_line = generate("olga+ops", Role.OPERATOR)
    viewer, viewer_line = generate("vic", Role.VIEWER)
    keys.write_text(f"{operator_line}\n{viewer_line}\n")
    service = await start_service(**FAST, api_keys_file=keys)

    def auth(key: str) -> dict[str, Any]:
        return {"headers": {"Authorization": f"Bearer {key}"}}

    body = {"customer_id": CUSTOMER, "recommendations": [rec("r", risk_level="medium")]}
    code, _ = await call(
        service, "POST", "/coordination/coordinate", body, **auth(viewer)
    )
    assert code == 403
    code, result = await call(
        service, "POST", "/coordination/coordinate", body, **auth(operator)
    )
    assert code == 200
    [pending] = result["approvals"]
    path = f"/coordination/approvals/{pending['id']}/approve"
    code, _ = await call(service, "POST", path, {"user_id": "vic"}, **auth(viewer))
    assert code == 403
    code, answer = await call(
        service, "POST", path, {"user_id": "someone"}, **auth(operator)
    )
    assert code == 403  # acting as another person
    assert answer["field"] == "user_id"
    response = await service.request("POST", path, **auth(operator))  # no body
    assert response.code == 200
    approved = await response.json()
    assert approved["approved_by"] == ["olga+ops"]
    assert approved["recommendation"]["status"] == "approved"
    code, _ = await call(service, "GET", "/coordination/approvals", **auth(viewer))
    assert code == 200


@pytest_twisted.ensureDeferred
async def test_the_whole_result_can_be_read_again(start_service: StartService) -> None:
    service = await start_service(**FAST)
    result = await coordinate(
        service,
        [
            rec("a", "performance", risk_level="medium"),
            rec("b", affected_resources=["res-a"]),
        ],
    )
    response = await treq.get(
        f"{service.url}/coordination/results/{result['id']}", pool=service.pool
    )
    again = await response.json()
    assert again["id"] == result["id"]
    assert again["conflicts"] == result["conflicts"]
    assert again["approvals"][0]["id"] == result["approvals"][0]["id"]
    code, _ = await call(service, "GET", "/coordination/results/unknown")
    assert code == 404


@pytest.fixture
def shared_database() -> Iterator[str]:
    with postgres_schema() as url:
        yield url


@pytest_twisted.ensureDeferred
async def test_two_replicas_drive_each_plan_step_once(
    start_service: StartService, start_agent: StartAgent, shared_database: str
) -> None:
    replicas = [
        await start_service(**FAST, database_url=shared_database) for _ in range(2)
    ]
    agents = await fleet(replicas[0], start_agent)
    agents["cost"].delay = 0.05
    batch = [
        rec(
            f"spot-{n}",
            "cost",
            action="migrate_to_spot",
            affected_resources=[f"vm-{n}"],
        )
        for n in range(6)
    ]
    result = await coordinate(replicas[0], batch)
    plans = [p["id"] for p in result["execution_plans"]]
    # each replica starts half; both keep moving all of them
    for n, plan_id in enumerate(plans):
        code, _ = await call(
            replicas[n % 2], "POST", f"/coordination/plans/{plan_id}/execute"
        )
        assert code == 202
    for plan_id in plans:
        assert (await wait_plan(replicas[1], plan_id))["status"] == "completed"
    sent = Counter(
        (r.body["parameters"]["plan_id"], r.body["task_type"])
        for agent in agents.values()
        for r in agent.received
    )
    assert len(sent) == 3 * len(plans)
    assert set(sent.values()) == {1}


@pytest_twisted.ensureDeferred
async def test_timing_conflicts_expiry_and_avoided_actions(
    start_service: StartService,
) -> None:
    service = await start_service(**FAST)
    hour = {"start": "2030-01-01T10:00:00Z", "end": "2030-01-01T11:00:00Z"}
    later = {"start": "2030-01-01T12:00:00Z", "end": "2030-01-01T13:00:00Z"}
    result = await coordinate(
        service,
        [
            rec("n1", "resource", affected_resources=["pool/node-1"], window=hour),
            rec("n2", "cost", affected_resources=["pool/node-2"], window=hour),
            rec(
                "n3",
                "cost",
                affected_resources=["pool/node-3"],
                window=later,
                description="Why:\n\tnode-3 idles at night",
            ),
            rec("old", expires_at="2020-01-01T00:00:00Z"),
            rec(
                "cache",
                "application",
                action="disable_caching",
                affected_resources=["db"],
            ),
            rec("cache2", "cost", action="enable_caching", affected_resources=["db2"]),
        ],
        metadata={"constraints": {"avoid_actions": ["disable_caching"]}},
    )
    by_type = {c["type"]: c for c in result["conflicts"]}
    timing = by_type["timing"]
    assert sorted(timing["recommendation_ids"]) == ["n1", "n2"]
    assert timing["conflicting_field"] == "window"
    assert timing["kept"] == ["n1"]  # resource beats cost
    action = by_type["action"]
    assert action["kept"] == ["cache2"]  # the customer's wish beats quality
    assert action["rule"] == "customer_constraints"
    kept = {r["id"] for r in result["recommendations"]}
    assert kept == {"n1", "n3", "cache2"}
    reasons = {d["id"]: d["reason"] for d in result["dropped"]}
    assert "expired" in reasons["old"]
    [n3] = [r for r in result["recommendations"] if r["id"] == "n3"]
    assert n3["description"] == "Why:\n\tnode-3 idles at night"
    window = n3["window"]
    assert window == {
        "start": "2030-01-01T12:00:00.000Z",
        "end": "2030-01-01T13:00:00.000Z",
    }


@pytest_twisted.ensureDeferred
async def test_approvals_page_and_read_back_in_dependency_order(
    start_service: StartService,
) -> None:
    service = await start_service(**FAST)
    result = await coordinate(
        service,
        [
            rec("c", risk_level="medium", dependencies=["b"]),
            rec("b", risk_level="high", dependencies=["a"]),
            rec("a", risk_level="critical", created_at="2030-01-01t10:00:00.5z"),
        ],
    )
    assert [a["recommendation_id"] for a in result["approvals"]] == ["a", "b", "c"]
    code, again = await call(service, "GET", f"/coordination/results/{result['id']}")
    assert [a["recommendation_id"] for a in again["approvals"]] == ["a", "b", "c"]
    assert again["recommendations"][0]["created_at"] == "2030-01-01T10:00:00.500Z"
    seen = []
    for offset in (0, 2):
        code, page = await call(
            service, "GET", f"/coordination/approvals?limit=2&offset={offset}"
        )
        assert code == 200
        assert (page["limit"], page["offset"]) == (2, offset)
        seen += [a["recommendation_id"] for a in page["approvals"]]
    assert sorted(seen) == ["a", "b", "c"]


@pytest_twisted.ensureDeferred
async def test_an_idempotency_key_replays_the_same_coordination(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    agents = await fleet(service, start_agent)
    body = {
        "customer_id": CUSTOMER,
        "recommendations": [rec("once", "performance", action="enable_caching")],
        "execute_now": True,
    }
    key = {"headers": {"Idempotency-Key": "batch-7"}}
    response = await service.request(
        "POST", "/coordination/coordinate", json=body, **key
    )
    first = await response.json()
    assert response.code == 200
    assert response.headers.getRawHeaders(b"idempotent-replayed") is None
    await wait_plan(service, first["execution_plans"][0]["id"])
    response = await service.request(
        "POST", "/coordination/coordinate", json=body, **key
    )
    again = await response.json()
    assert response.code == 200
    assert response.headers.getRawHeaders(b"idempotent-replayed") == [b"true"]
    assert again["id"] == first["id"]
    assert agents["performance"].task_types == ["enable_caching"]  # not run twice
    code, other = await call(
        service,
        "POST",
        "/coordination/coordinate",
        {**body, "execute_now": False},
        **key,
    )
    assert code == 409
    assert other["coordination_id"] == first["id"]
    code, bad = await call(
        service,
        "POST",
        "/coordination/coordinate",
        body,
        headers={"Idempotency-Key": "a b"},
    )
    assert code == 400
    assert bad["field"] == "Idempotency-Key"


@pytest_twisted.ensureDeferred
async def test_finished_coordinations_are_forgotten_after_the_retention(
    start_service: StartService, start_agent: StartAgent, logs: LogCapture
) -> None:
    service = await start_service(**FAST, coordination_retention=0.3)
    agents = await fleet(service, start_agent)
    agents["cost"].overrides = {"migrate_workload": HANG}
    done = await coordinate(service, [rec("quick")], execute_now=True)
    busy = await coordinate(
        service, [rec("slow", action="migrate_to_spot")], execute_now=True
    )
    await wait_plan(service, done["execution_plans"][0]["id"])
    await until_sent(agents["cost"], "migrate_workload")
    await settle(0.6)
    code, _ = await call(service, "GET", f"/coordination/results/{done['id']}")
    assert code == 404
    code, _ = await call(
        service, "GET", f"/coordination/plans/{done['execution_plans'][0]['id']}"
    )
    assert code == 404
    # a plan still running is never forgotten
    code, kept = await call(service, "GET", f"/coordination/results/{busy['id']}")
    assert code == 200
    assert kept["execution_plans"][0]["status"] == "running"
    assert "old coordinations purged" in logs.messages()


@pytest_twisted.ensureDeferred
async def test_plan_steps_are_retried_as_configured(
    start_service: StartService, start_agent: StartAgent
) -> None:
    for retries in (0, 2):
        service = await start_service(**FAST, plan_step_retries=retries)
        agents = await fleet(service, start_agent)
        agents["resource"].behaviour = BAD_GATEWAY  # a 502: worth another try
        result = await coordinate(
            service, [rec("r", "resource", action="clean_cache")], execute_now=True
        )
        done = await wait_plan(service, result["execution_plans"][0]["id"])
        assert done["status"] == "rolled_back"
        assert agents["resource"].task_types == ["clean_cache"] * (retries + 1)


@pytest_twisted.ensureDeferred
async def test_a_plan_does_not_wait_for_its_dependencies_without_end(
    start_service: StartService, start_agent: StartAgent
) -> None:
    expiry = {f"approval_expiry_{risk}": 0.4 for risk in ("medium", "high", "critical")}
    service = await start_service(**FAST, **expiry)
    agents = await fleet(service, start_agent)
    result = await coordinate(
        service, [rec("second", dependencies=["first"]), rec("first")]
    )
    plans = {p["recommendation_id"]: p for p in result["execution_plans"]}
    # only the dependent is executed; nobody executes the plan it waits for
    code, _ = await call(
        service, "POST", f"/coordination/plans/{plans['second']['id']}/execute"
    )
    assert code == 202
    done = await wait_plan(service, plans["second"]["id"])
    assert done["status"] == "cancelled"
    assert "did not complete within 0.4 s" in done["error"]
    assert done["requested_at"]
    assert agents["cost"].received == []
