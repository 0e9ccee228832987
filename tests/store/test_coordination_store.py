"""Coordination records on both backends: round trips and compare-and-set."""

from __future__ import annotations

from typing import Any

import attrs
import pytest_twisted

from optiinfra.coordination.approvals import (
    Approval,
    ApprovalPolicy,
    approve,
    new_approval,
)
from optiinfra.coordination.model import Recommendation, Window
from optiinfra.coordination.plans import RUNNING, WAITING, build_plan, sent
from optiinfra.store.interface import IStore

REC = Recommendation(
    id="r1",
    agent_type="cost",
    action="migrate_to_spot",
    risk_level="critical",
    customer_id="acme",
    affected_resources=("cluster/vm-1",),
    parameters={"zone": "eu", "nested": {"x": [1, 2]}},
    dependencies=("r0",),
    estimated_impact={"latency_ms": 3},
    window=Window(100.0, 200.0),
    created_at=50.0,
)
POLICY = ApprovalPolicy()


def approval(approval_id: str = "a1", now: float = 1000.0, **changes: Any) -> Approval:
    made = new_approval(approval_id, "c1", REC, POLICY, True, ("r0",), now)
    return attrs.evolve(made, **changes)


@pytest_twisted.ensureDeferred
async def test_a_result_its_approvals_and_plans_round_trip(store: IStore) -> None:
    plan = build_plan("p1", "c1", REC, ("r0",), 1000.0)
    pending = approval()
    await store.coordination.save_result(
        "c1", "acme", 1000.0, {"id": "c1", "n": [1]}, [pending], [plan]
    )
    assert await store.coordination.get_result("c1") == {"id": "c1", "n": [1]}
    assert await store.coordination.get_result("c2") is None
    assert await store.coordination.get_approval("a1") == pending
    assert await store.coordination.get_plan("p1") == plan
    assert await store.coordination.plans_of("c1") == [plan]
    assert await store.coordination.get_plan("nope") is None


@pytest_twisted.ensureDeferred
async def test_approvals_list_by_customer_and_status_with_expiry_on_read(
    store: IStore,
) -> None:
    soon = approval("soon", now=1000.0)  # critical: expires 4 h later
    late = approval("late", now=2000.0)
    other = attrs.evolve(approval("other"), customer_id="globex")
    await store.coordination.save_result("c1", "acme", 1.0, {}, [soon, late, other], [])
    after_soon = soon.expires_at + 1

    async def ids(**query: object) -> list[str]:
        found = await store.coordination.list_approvals(after_soon, **query)
        return [a.id for a in found]

    assert await ids(customer_id="acme") == ["late", "soon"]
    assert await ids(customer_id="acme", status="pending") == ["late"]
    assert await ids(status="expired") == ["other", "soon"]
    assert await ids(coordination_id="c1", status="approved") == []


@pytest_twisted.ensureDeferred
async def test_a_decision_is_a_compare_and_set(store: IStore) -> None:
    first = approval()
    await store.coordination.save_result("c1", "acme", 1.0, {}, [first], [])
    alice = approve(first, "alice", 1001.0)
    bob = approve(first, "bob", 1001.0)
    stored = await store.coordination.change_approval(alice)
    assert stored is not None
    assert stored.version == 1
    # bob read the same version: his change is refused, nothing is lost
    assert await store.coordination.change_approval(bob) is None
    assert await store.coordination.get_approval("a1") == stored
    carol = approve(stored, "carol", 1002.0)
    plan = build_plan("p1", "c1", REC, (), 1002.0)
    granted = await store.coordination.change_approval(
        attrs.evolve(carol, plan_id="p1"), plan
    )
    assert granted is not None
    assert granted.status == "approved"
    assert granted.approved_by == ("alice", "carol")
    assert await store.coordination.get_plan("p1") == plan


@pytest_twisted.ensureDeferred
async def test_expiry_is_recorded_once_by_two_replicas(open_store: object) -> None:
    one, two = open_store(), open_store()  # type: ignore[operator]
    due = approval()
    await one.coordination.save_result("c1", "acme", 1.0, {}, [due], [])
    later = due.expires_at + 1
    first = await one.coordination.expire_approvals(later)
    second = await two.coordination.expire_approvals(later)
    assert [a.id for a in first] == ["a1"]
    assert first[0].status == "expired"
    assert second == []
    assert (await two.coordination.get_approval("a1")).status == "expired"


@pytest_twisted.ensureDeferred
async def test_plans_change_by_compare_and_set(store: IStore) -> None:
    plan = build_plan("p1", "c1", REC, (), 1000.0)
    await store.coordination.save_result("c1", "acme", 1.0, {}, [], [plan])
    waiting = await store.coordination.change_plan(attrs.evolve(plan, status=WAITING))
    assert waiting is not None
    assert (
        await store.coordination.change_plan(attrs.evolve(plan, status=RUNNING)) is None
    )
    running = attrs.evolve(waiting, status=RUNNING)
    moved = await store.coordination.change_plan(
        sent(running, running.steps[0], "task-1", False, 1001.0)
    )
    assert moved is not None
    assert moved.steps[0].task_id == "task-1"
    assert [p.id for p in await store.coordination.plans_in((RUNNING,))] == ["p1"]
    assert await store.coordination.plans_in((WAITING,)) == []
    assert await store.coordination.get_plan("p1") == moved
