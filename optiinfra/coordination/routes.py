"""Coordination over HTTP: thin handlers over the L{Coordinator}."""

from __future__ import annotations

from klein import Klein
from twisted.web.iweb import IRequest

from optiinfra.auth import Permission
from optiinfra.coordination.approvals import APPROVAL_STATUSES
from optiinfra.coordination.parse import parse_coordination, parse_decision
from optiinfra.coordination.plans import ACTIVE, PENDING, PLAN_STATUSES
from optiinfra.coordination.service import Coordinator
from optiinfra.coordination.views import approval_view, plan_view
from optiinfra.errors import InvalidField
from optiinfra.routing.parse import idempotency_key, request_hash
from optiinfra.validation import TOKEN
from optiinfra.web.app import route
from optiinfra.web.body import read_json
from optiinfra.web.guard import Guard
from optiinfra.web.query import page_of, query_arg, query_page
from optiinfra.web.render import render_json

#: What C{GET /coordination/plans} lists when no status is asked for.
UNFINISHED = (PENDING, *ACTIVE)


def _id(name: str, value: str) -> str:
    if not TOKEN.fullmatch(value):
        raise InvalidField(name, f"is not a valid {name.replace('_', ' ')}")
    return value


def _decider(
    request: IRequest, guard: Guard, reason_required: bool
) -> tuple[str, str | None]:
    """
    Who decides, and why.  With API keys the decider is the key's owner, so
    one person cannot count twice towards a critical approval by typing
    another name (and the body may then be left out).
    """
    principal = guard.check(request, Permission.OPERATE)
    document = read_json(request, optional=principal is not None)
    user = None if principal is None else principal.name
    return parse_decision(document, reason_required, user)


def mount(app: Klein, coordinator: Coordinator, guard: Guard) -> None:
    @route(app, "/coordination/coordinate", ("POST",))
    async def coordinate(request: IRequest) -> bytes:
        guard.check(request, Permission.OPERATE)
        document = read_json(request)
        parsed = parse_coordination(document)
        key = idempotency_key(request)
        result, created = await coordinator.coordinate(
            parsed, key, None if key is None else request_hash(document)
        )
        if not created:
            request.setHeader(b"idempotent-replayed", b"true")
        return render_json(request, result)

    @route(app, "/coordination/approvals", ("GET",))
    async def approvals(request: IRequest) -> bytes:
        guard.check(request, Permission.READ)
        customer_id = query_arg(request, "customer_id")
        if customer_id is not None:
            _id("customer_id", customer_id)
        status = query_arg(request, "status")
        if status is not None and status not in APPROVAL_STATUSES:
            raise InvalidField(
                "status", f"must be one of {', '.join(APPROVAL_STATUSES)}"
            )
        page = query_page(request)
        found, now = await coordinator.list_approvals(
            customer_id, status, page.limit, page.offset
        )
        return render_json(
            request,
            page_of(
                "approvals",
                [approval_view(a, now) for a in found],
                page.limit,
                page.offset,
            ),
        )

    @route(app, "/coordination/approvals/{approval_id}", ("GET",))
    async def approval(request: IRequest, approval_id: str) -> bytes:
        guard.check(request, Permission.READ)
        found, now = await coordinator.get_approval(_id("approval_id", approval_id))
        return render_json(request, approval_view(found, now))

    @route(app, "/coordination/approvals/{approval_id}/approve", ("POST",))
    async def approve(request: IRequest, approval_id: str) -> bytes:
        user_id, _ = _decider(request, guard, reason_required=False)
        approval, plan = await coordinator.approve(
            _id("approval_id", approval_id), user_id
        )
        view = approval_view(approval, coordinator.now())
        return render_json(
            request, {**view, "plan": None if plan is None else plan_view(plan)}
        )

    @route(app, "/coordination/approvals/{approval_id}/reject", ("POST",))
    async def reject(request: IRequest, approval_id: str) -> bytes:
        user_id, reason = _decider(request, guard, reason_required=True)
        assert reason is not None  # noqa: S101 - required
        approval = await coordinator.reject(
            _id("approval_id", approval_id), user_id, reason
        )
        return render_json(request, approval_view(approval, coordinator.now()))

    @route(app, "/coordination/plans", ("GET",))
    async def plans(request: IRequest) -> bytes:
        guard.check(request, Permission.READ)
        status = query_arg(request, "status")
        if status is not None and status not in PLAN_STATUSES:
            raise InvalidField("status", f"must be one of {', '.join(PLAN_STATUSES)}")
        page = query_page(request)
        found = await coordinator.list_plans(
            UNFINISHED if status is None else (status,)
        )
        return render_json(
            request,
            page_of(
                "plans",
                [plan_view(p) for p in found[page.offset : page.offset + page.limit]],
                page.limit,
                page.offset,
            ),
        )

    @route(app, "/coordination/plans/{plan_id}", ("GET",))
    async def plan(request: IRequest, plan_id: str) -> bytes:
        guard.check(request, Permission.READ)
        return render_json(
            request, plan_view(await coordinator.get_plan(_id("plan_id", plan_id)))
        )

    @route(app, "/coordination/plans/{plan_id}/execute", ("POST",))
    async def execute(request: IRequest, plan_id: str) -> bytes:
        guard.check(request, Permission.OPERATE)
        started = await coordinator.execute(_id("plan_id", plan_id))
        return render_json(
            request,
            {
                "message": "Execution started",
                "plan_id": started.id,
                "status": started.status,
            },
            202,
        )

    @route(app, "/coordination/results/{coordination_id}", ("GET",))
    async def result(request: IRequest, coordination_id: str) -> bytes:
        guard.check(request, Permission.READ)
        return render_json(
            request,
            await coordinator.get_result(_id("coordination_id", coordination_id)),
        )
