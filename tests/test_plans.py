"""The pure rules of plans and approvals, without a reactor."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest

from optiinfra.coordination.approvals import (
    APPROVED,
    EXPIRED,
    PENDING,
    REJECTED,
    ApprovalPolicy,
    approve,
    new_approval,
    reject,
)
from optiinfra.coordination.model import Recommendation
from optiinfra.coordination.plans import (
    COMPLETED,
    DEFAULT_TEMPLATES,
    ROLLBACK_FAILED,
    ROLLED_BACK,
    ROLLING_BACK,
    RUNNING,
    Await,
    Done,
    Plan,
    Send,
    TemplateError,
    build_plan,
    load_templates,
    next_move,
    sent,
    settled,
    step_parameters,
)
from optiinfra.errors import Conflict

SPOT = Recommendation(
    id="spot", agent_type="cost", action="migrate_to_spot", customer_id="acme"
)


def run(plan: Plan, outcomes: list[bool]) -> Plan:
    """Drive C{plan} as the executor would, each task ending as C{outcomes} say."""
    plan = attrs.evolve(plan, status=RUNNING)
    answers = iter(outcomes)
    for tick in range(50):
        move = next_move(plan)
        if isinstance(move, Done):
            return attrs.evolve(plan, status=move.status)
        if isinstance(move, Send):
            plan = sent(plan, move.step, f"task-{tick}", move.rollback, float(tick))
        else:
            assert isinstance(move, Await)
            ok = next(answers)
            plan = settled(
                plan,
                move.step,
                move.rollback,
                ok,
                {"tick": tick} if ok else None,
                None if ok else "no",
                float(tick),
            )
    raise AssertionError("plan never ended")


def test_templates_are_data_and_other_actions_are_one_step() -> None:
    plan = build_plan("p", "c", SPOT, (), 0.0)
    assert [(s.task_type, s.agent_type, s.reversible) for s in plan.steps] == [
        ("take_snapshot", "cost", False),
        ("migrate_workload", "cost", True),
        ("validate_quality", "application", False),
    ]
    other = build_plan("p", "c", attrs.evolve(SPOT, action="enable_caching"), (), 0.0)
    [step] = other.steps
    assert (step.task_type, step.agent_type, step.critical) == (
        "enable_caching",
        "cost",
        True,
    )
    down = build_plan(
        "p",
        "c",
        attrs.evolve(SPOT, action="scale_down", agent_type="resource"),
        (),
        0.0,
    )
    assert [s.task_type for s in down.steps] == [
        "validate_quality",
        "scale_resources",
        "validate_quality",
    ]


def test_a_plan_that_succeeds_runs_every_step_in_order() -> None:
    plan = run(build_plan("p", "c", SPOT, (), 0.0), [True, True, True])
    assert plan.status == COMPLETED
    assert [s.status for s in plan.steps] == ["completed"] * 3


def test_a_failed_critical_step_rolls_back_completed_reversible_steps() -> None:
    plan = run(build_plan("p", "c", SPOT, (), 0.0), [True, True, False, True])
    assert plan.status == ROLLED_BACK
    assert [s.status for s in plan.steps] == ["completed", "rolled_back", "failed"]
    # the rollback was told what it undoes, and what the step had found
    rolled = plan.steps[1]
    assert rolled.rollback_task_id is not None
    parameters = step_parameters(plan, rolled, rollback=True)
    assert parameters["rollback_of"] == "migrate_workload"
    assert parameters["step_result"] == rolled.result


def test_an_early_critical_failure_skips_the_rest() -> None:
    plan = run(build_plan("p", "c", SPOT, (), 0.0), [False])
    assert plan.status == ROLLED_BACK
    assert [s.status for s in plan.steps] == ["failed", "skipped", "skipped"]
    assert "take_snapshot" in (plan.error or "")


def test_a_failed_rollback_stops_the_plan() -> None:
    plan = run(build_plan("p", "c", SPOT, (), 0.0), [True, True, False, False])
    assert plan.status == ROLLBACK_FAILED
    assert plan.steps[1].status == "rollback_failed"
    assert "restore_snapshot" in (plan.steps[1].error or "")


def test_rolling_back_is_resumable_from_the_store() -> None:
    plan = attrs.evolve(build_plan("p", "c", SPOT, (), 0.0), status=RUNNING)
    for ok, tick in ((True, 1), (True, 2)):
        move = next_move(plan)
        assert isinstance(move, Send)
        plan = sent(plan, move.step, f"t{tick}", False, 0.0)
        plan = settled(plan, move.step, False, ok, None, None, 0.0)
    move = next_move(plan)
    assert isinstance(move, Send)
    plan = sent(plan, move.step, "t3", False, 0.0)
    plan = settled(plan, plan.steps[2], False, False, None, "veto", 0.0)
    assert plan.status == ROLLING_BACK
    move = next_move(plan)
    assert isinstance(move, Send)
    assert move.rollback
    assert move.step.index == 1
    plan = sent(plan, move.step, "rb", True, 0.0)
    assert next_move(plan) == Await(plan.steps[1], "rb", rollback=True)


def test_template_files_add_and_replace_actions(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(
        json.dumps(
            {
                "scale_up": [
                    {"task_type": "scale_resources", "rollback": "restore_scale"},
                    {
                        "task_type": "validate_quality",
                        "agent_type": "application",
                        "critical": False,
                        "timeout_seconds": 5,
                    },
                ]
            }
        )
    )
    templates = load_templates(path)
    assert templates["migrate_to_spot"] == DEFAULT_TEMPLATES["migrate_to_spot"]
    first, second = templates["scale_up"]
    assert first.rollback == "restore_scale"
    assert (second.agent_type, second.critical, second.timeout_seconds) == (
        "application",
        False,
        5,
    )


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        ("{", "cannot read"),
        ("[]", "body"),
        ('{"x": []}', "x"),
        ('{"x": [{"agent_type": "cost"}]}', "x[0].task_type"),
        ('{"x": [{"task_type": "a", "critical": "yes"}]}', "x[0].critical"),
        ('{"x": [{"task_type": "a", "agent_type": "chef"}]}', "x[0].agent_type"),
    ],
)
def test_a_bad_template_file_is_refused(
    tmp_path: Path, content: str, complaint: str
) -> None:
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(TemplateError, match=complaint.replace("[", r"\[")):
        load_templates(path)


def test_low_risk_needs_nobody_and_critical_needs_two() -> None:
    policy = ApprovalPolicy()
    assert not policy.needs_approval(attrs.evolve(SPOT, risk_level="low"))
    for risk, hours in (("medium", 48), ("high", 24), ("critical", 4)):
        rec = attrs.evolve(SPOT, risk_level=risk)
        approval = new_approval("a", "c", rec, policy, False, (), 100.0)
        assert approval.expires_at == 100.0 + hours * 3600
        assert approval.required == (2 if risk == "critical" else 1)


def test_approval_decisions() -> None:
    rec = attrs.evolve(SPOT, risk_level="critical")
    approval = new_approval("a", "c", rec, ApprovalPolicy(), False, (), 0.0)
    once = approve(approval, "alice", 1.0)
    assert once.status == PENDING
    with pytest.raises(Conflict, match="alice has already approved"):
        approve(once, "alice", 2.0)
    twice = approve(once, "bob", 3.0)
    assert (twice.status, twice.decided_at, twice.approved_by) == (
        APPROVED,
        3.0,
        ("alice", "bob"),
    )
    with pytest.raises(Conflict, match="already approved"):
        reject(twice, "carol", "late", 4.0)
    no = reject(once, "carol", "too risky", 2.0)
    assert no.status == REJECTED
    assert no.decisions[-1].reason == "too risky"
    late = approval.expires_at
    assert approval.status_at(late) == EXPIRED
    with pytest.raises(Conflict, match="already expired"):
        approve(approval, "alice", late)
