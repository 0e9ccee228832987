"""
Execution plans: the steps an approved recommendation becomes, built from
templates that are data, and the pure rules for moving a plan along.

The executor (L{optiinfra.coordination.executor}) does the I/O; everything
here is a function of a plan and what its current step's task ended as, so the
whole life of a plan can be tested without a reactor.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs
import orjson

from optiinfra.coordination.model import Recommendation
from optiinfra.errors import InvalidField
from optiinfra.registry.model import AGENT_TYPES
from optiinfra.validation import TOKEN, Fields

#: Plan statuses.
PENDING: Final = "pending"  # approved, waiting for POST .../execute
WAITING: Final = "waiting"  # execution asked for; dependencies not done yet
RUNNING: Final = "running"
ROLLING_BACK: Final = "rolling_back"
COMPLETED: Final = "completed"
ROLLED_BACK: Final = "rolled_back"
ROLLBACK_FAILED: Final = "rollback_failed"
CANCELLED: Final = "cancelled"
PLAN_STATUSES: Final = (
    PENDING,
    WAITING,
    RUNNING,
    ROLLING_BACK,
    COMPLETED,
    ROLLED_BACK,
    ROLLBACK_FAILED,
    CANCELLED,
)
#: Plans the executor drives.
ACTIVE: Final = (WAITING, RUNNING, ROLLING_BACK)
FINAL: Final = (COMPLETED, ROLLED_BACK, ROLLBACK_FAILED, CANCELLED)

#: Step statuses.
STEP_PENDING: Final = "pending"
STEP_RUNNING: Final = "running"
STEP_COMPLETED: Final = "completed"
STEP_FAILED: Final = "failed"
STEP_SKIPPED: Final = "skipped"
STEP_ROLLING_BACK: Final = "rolling_back"
STEP_ROLLED_BACK: Final = "rolled_back"
STEP_ROLLBACK_FAILED: Final = "rollback_failed"


@attrs.frozen
class StepTemplate:
    """
    One step of a plan template.  C{agent_type} None means the type of the
    agent that made the recommendation; C{rollback} names the task that undoes
    the step (None: nothing to undo).
    """

    task_type: str
    agent_type: str | None = None
    critical: bool = True
    rollback: str | None = None
    timeout_seconds: float = 60.0


#: The platform's plans; any other action is one step sent to the
#: recommending agent's type.  Configurable: see L{load_templates}.
DEFAULT_TEMPLATES: Final[Mapping[str, tuple[StepTemplate, ...]]] = {
    "migrate_to_spot": (
        StepTemplate("take_snapshot"),
        StepTemplate("migrate_workload", rollback="restore_snapshot"),
        StepTemplate("validate_quality", agent_type="application"),
    ),
    "scale_down": (
        StepTemplate("validate_quality", agent_type="application"),
        StepTemplate("scale_resources", rollback="restore_scale"),
        StepTemplate("validate_quality", agent_type="application"),
    ),
}


class TemplateError(ValueError):
    """A plan template file this build cannot use."""


def load_templates(path: Path) -> dict[str, tuple[StepTemplate, ...]]:
    """
    The built-in templates, with those in C{path} (JSON, by action, each a list
    of steps with C{task_type} and optional C{agent_type}, C{critical},
    C{rollback}, C{timeout_seconds}) over them.
    """
    try:
        document = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as error:
        raise TemplateError(f"cannot read {path}: {error}") from None
    templates = dict(DEFAULT_TEMPLATES)
    try:
        for action, steps in Fields(document).raw_items():
            if not isinstance(steps, list) or not steps:
                raise InvalidField(action, "must be a non-empty list of steps")
            templates[action] = tuple(
                _template(Fields(step, f"{action}[{index}]."))
                for index, step in enumerate(steps)
            )
    except InvalidField as error:
        raise TemplateError(f"{path}: {error}") from None
    return templates


def _template(fields: Fields) -> StepTemplate:
    task_type = fields.text("task_type", pattern=TOKEN)
    assert task_type is not None  # noqa: S101 - required
    critical = fields.raw("critical")
    if critical is not None and not isinstance(critical, bool):
        raise InvalidField(fields.name("critical"), "must be true or false")
    return StepTemplate(
        task_type=task_type,
        agent_type=fields.choice("agent_type", AGENT_TYPES, required=False),
        critical=True if critical is None else critical,
        rollback=fields.text("rollback", required=False, pattern=TOKEN),
        timeout_seconds=fields.number(
            "timeout_seconds", minimum=0.001, maximum=300, default=60.0
        ),
    )


@attrs.frozen
class Step:
    """A step of one plan, with what became of it."""

    index: int
    task_type: str
    agent_type: str
    critical: bool
    rollback_task_type: str | None
    timeout_seconds: float
    status: str = STEP_PENDING
    task_id: str | None = None
    started_at: float | None = None
    completed_at: float | None = None
    result: Any = None
    error: str | None = None
    rollback_task_id: str | None = None

    @property
    def reversible(self) -> bool:
        return self.rollback_task_type is not None


@attrs.frozen
class Plan:
    """The steps that carry out one approved recommendation."""

    id: str
    coordination_id: str
    customer_id: str
    recommendation: Recommendation
    steps: tuple[Step, ...]
    created_at: float
    status: str = PENDING
    #: Recommendations (of the same coordination) whose plans must complete first.
    after: tuple[str, ...] = ()
    #: When execution was asked for (the plan went C{waiting}).
    requested_at: float | None = None
    started_at: float | None = None
    completed_at: float | None = None
    error: str | None = None
    version: int = 0

    @property
    def finished(self) -> bool:
        return self.status in FINAL


def build_plan(
    plan_id: str,
    coordination_id: str,
    recommendation: Recommendation,
    after: tuple[str, ...],
    now: float,
    templates: Mapping[str, tuple[StepTemplate, ...]] = DEFAULT_TEMPLATES,
) -> Plan:
    """The plan for C{recommendation}, from its action's template."""
    template = templates.get(recommendation.action) or (
        StepTemplate(recommendation.action),
    )
    steps = tuple(
        Step(
            index=index,
            task_type=step.task_type,
            agent_type=step.agent_type or recommendation.agent_type,
            critical=step.critical,
            rollback_task_type=step.rollback,
            timeout_seconds=step.timeout_seconds,
        )
        for index, step in enumerate(template)
    )
    return Plan(
        id=plan_id,
        coordination_id=coordination_id,
        customer_id=recommendation.customer_id,
        recommendation=recommendation,
        steps=steps,
        created_at=now,
        after=after,
    )


# What the executor should do next ---------------------------------------------


@attrs.frozen
class Send:
    """Submit C{step}'s task (or its rollback task when C{rollback})."""

    step: Step
    rollback: bool


@attrs.frozen
class Await:
    """Wait for the task of C{step} (or its rollback) to end."""

    step: Step
    task_id: str
    rollback: bool


@attrs.frozen
class Done:
    """Nothing more to do: the plan has ended with C{status}."""

    status: str


Next = Send | Await | Done


def next_move(plan: Plan) -> Next:
    """The one thing a running or rolling-back plan waits on now."""
    if plan.status == RUNNING:
        for step in plan.steps:
            if step.status == STEP_PENDING:
                return Send(step, rollback=False)
            if step.status == STEP_RUNNING:
                assert step.task_id is not None  # noqa: S101 - set when sent
                return Await(step, step.task_id, rollback=False)
        return Done(COMPLETED)
    if plan.status == ROLLING_BACK:
        for step in reversed(plan.steps):
            if step.status == STEP_ROLLBACK_FAILED:
                return Done(ROLLBACK_FAILED)
            if step.status == STEP_ROLLING_BACK:
                if step.rollback_task_id is None:
                    return Send(step, rollback=True)
                return Await(step, step.rollback_task_id, rollback=True)
            if step.status == STEP_COMPLETED and step.reversible:
                return Send(step, rollback=True)
        return Done(ROLLED_BACK)
    return Done(plan.status)


def _replace_step(plan: Plan, step: Step) -> Plan:
    steps = list(plan.steps)
    steps[step.index] = step
    return attrs.evolve(plan, steps=tuple(steps))


def sent(plan: Plan, step: Step, task_id: str, rollback: bool, now: float) -> Plan:
    """C{plan} once C{step}'s task (or rollback task) is submitted."""
    if rollback:
        return _replace_step(
            plan,
            attrs.evolve(step, status=STEP_ROLLING_BACK, rollback_task_id=task_id),
        )
    return _replace_step(
        plan,
        attrs.evolve(step, status=STEP_RUNNING, task_id=task_id, started_at=now),
    )


def settled(
    plan: Plan,
    step: Step,
    rollback: bool,
    succeeded: bool,
    result: Any,
    error: str | None,
    now: float,
) -> Plan:
    """
    C{plan} once the task it awaited has ended.  A failed critical step starts
    the rollback (an application agent's failed quality validation is such a
    failure); a failed non-critical step is recorded and the plan goes on; a
    failed rollback stops the plan as C{rollback_failed}, for a person to see.
    """
    if rollback:
        if succeeded:
            return _replace_step(plan, attrs.evolve(step, status=STEP_ROLLED_BACK))
        failed = _replace_step(
            plan,
            attrs.evolve(
                step,
                status=STEP_ROLLBACK_FAILED,
                error=f"rollback ({step.rollback_task_type}) failed: {error}",
            ),
        )
        return attrs.evolve(
            failed,
            status=ROLLBACK_FAILED,
            completed_at=now,
            error=f"rolling back step {step.index} ({step.task_type}) failed: {error}",
        )
    if succeeded:
        return _replace_step(
            plan,
            attrs.evolve(step, status=STEP_COMPLETED, result=result, completed_at=now),
        )
    plan = _replace_step(
        plan,
        attrs.evolve(step, status=STEP_FAILED, error=error, completed_at=now),
    )
    if not step.critical:
        return plan
    skipped = tuple(
        attrs.evolve(s, status=STEP_SKIPPED) if s.status == STEP_PENDING else s
        for s in plan.steps
    )
    return attrs.evolve(
        plan,
        steps=skipped,
        status=ROLLING_BACK,
        error=f"critical step {step.index} ({step.task_type}) failed: {error}",
    )


def finished(plan: Plan, status: str, now: float) -> Plan:
    return attrs.evolve(plan, status=status, completed_at=plan.completed_at or now)


def step_parameters(plan: Plan, step: Step, rollback: bool) -> dict[str, Any]:
    """What the agent is told: the recommendation, and what earlier steps found."""
    rec = plan.recommendation
    parameters: dict[str, Any] = {
        "plan_id": plan.id,
        "step": step.index,
        "recommendation_id": rec.id,
        "customer_id": plan.customer_id,
        "action": rec.action,
        "affected_resources": list(rec.affected_resources),
        "parameters": dict(rec.parameters),
        "previous_results": {
            str(s.index): s.result
            for s in plan.steps
            if s.status in (STEP_COMPLETED, STEP_ROLLING_BACK) and s.index != step.index
        },
    }
    if rollback:
        parameters["rollback_of"] = step.task_type
        parameters["step_result"] = step.result
    return parameters
