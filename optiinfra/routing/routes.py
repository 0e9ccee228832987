"""Tasks over HTTP: thin handlers over the L{Router}."""

from __future__ import annotations

from typing import Any, Final, TypeVar

import orjson
from klein import Klein
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from optiinfra.auth import Permission
from optiinfra.errors import InvalidField
from optiinfra.registry.model import AGENT_TYPES
from optiinfra.routing.model import STATUSES, TASK_TYPE, Task, TaskEvent, TaskQuery
from optiinfra.routing.parse import (
    TRACEPARENT,
    check_offered,
    idempotency_key,
    known_without_agents,
    parse_task,
    request_hash,
)
from optiinfra.routing.router import Router
from optiinfra.timefmt import rfc3339_ms, rfc3339_ms_or_none
from optiinfra.validation import TOKEN
from optiinfra.web.app import route
from optiinfra.web.body import read_json
from optiinfra.web.front import FastRoutes
from optiinfra.web.guard import Guard
from optiinfra.web.query import page_of, query_arg, query_page
from optiinfra.web.render import render_json

T = TypeVar("T")


#: Bytes of results one page of C{GET /tasks?fields=result} holds at most.
MAX_LISTED_RESULTS: Final = 8 * 1024 * 1024


def task_view(task: Task, result: bool = True) -> dict[str, Any]:
    """The contract's task record, with what an operator also wants to see."""
    view = {
        "task_id": task.id,
        "status": task.status,
        "agent_id": task.agent_id,
        "result": task.result,
        "error": task.error,
        "created_at": rfc3339_ms_or_none(task.created_at),
        "started_at": rfc3339_ms_or_none(task.started_at),
        "completed_at": rfc3339_ms_or_none(task.completed_at),
        "retry_count": task.retry_count,
        "task_type": task.task_type,
        "agent_type": task.agent_type,
        "priority": task.priority,
        "timeout_seconds": task.timeout_seconds,
        "deadline": rfc3339_ms_or_none(task.deadline),
    }
    if not result:
        del view["result"]
    return view


def _with_results(request: IRequest) -> bool:
    """C{?fields=result}: listings leave results out unless asked."""
    fields = query_arg(request, "fields")
    if fields is None:
        return False
    if fields != "result":
        raise InvalidField("fields", "may only be result")
    return True


def listing(tasks: list[Task], query: TaskQuery, results: bool) -> dict[str, Any]:
    """
    A page of tasks; with results, cut short once they pass
    L{MAX_LISTED_RESULTS} (C{truncated} and C{next_offset} say where to go on).
    """
    views: list[dict[str, Any]] = []
    size = 0
    for task in tasks:
        if results:
            size += len(orjson.dumps(task.result))
            if size > MAX_LISTED_RESULTS and views:
                return {
                    **page_of("tasks", views, query.limit, query.offset),
                    "truncated": True,
                    "next_offset": query.offset + len(views),
                }
        views.append(task_view(task, results))
    return page_of("tasks", views, query.limit, query.offset)


def _history(events: list[TaskEvent]) -> list[dict[str, Any]]:
    return [
        {"status": e.status, "at": rfc3339_ms(e.at), "detail": e.detail} for e in events
    ]


def _task_id(value: str) -> str:
    if not TOKEN.fullmatch(value):
        raise InvalidField("task_id", "is not a valid task id")
    return value


def _header(request: IRequest, name: bytes) -> str | None:
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")


def _query(request: IRequest) -> TaskQuery:
    status = query_arg(request, "status")
    if status is not None and status not in STATUSES:
        raise InvalidField("status", f"must be one of {', '.join(STATUSES)}")
    agent_type = query_arg(request, "agent_type")
    if agent_type is not None and agent_type not in AGENT_TYPES:
        raise InvalidField("agent_type", f"must be one of {', '.join(AGENT_TYPES)}")
    task_type = query_arg(request, "task_type")
    if task_type is not None and not TASK_TYPE.fullmatch(task_type):
        raise InvalidField("task_type", f"must match {TASK_TYPE.pattern}")
    page = query_page(request)
    return TaskQuery(
        status=status,
        agent_id=query_arg(request, "agent_id"),
        agent_type=agent_type,
        task_type=task_type,
        limit=page.limit,
        offset=page.offset,
    )


def _shielded(work: Deferred[T]) -> Deferred[T]:
    """
    C{work}'s result, but cancelling the answer leaves C{work} running: a client
    that hangs up after its task was stored must not stop the task from being
    counted, logged and dispatched.
    """
    answer: Deferred[T] = Deferred()

    def relay(result: T | Failure) -> None:
        if not answer.called:
            if isinstance(result, Failure):
                answer.errback(result)
            else:
                answer.callback(result)

    work.addBoth(relay)
    return answer


def mount(
    app: Klein, router: Router, guard: Guard, fast: FastRoutes | None = None
) -> None:
    """
    The task routes on C{app}; C{/tasks} on the C{fast} routes too: under
    overload most submissions are refused, and a refusal must cost far less
    than the task it keeps out (Klein's routing alone cost as much).
    """

    @route(app, "/tasks", ("POST",), fast)
    async def submit(request: IRequest) -> bytes:
        guard.check(request, Permission.OPERATE)
        document = read_json(request)
        task_request = parse_task(document, router.config)
        configured = router.config.task_types
        if not known_without_agents(task_request.task_type, configured):
            offered = await router.offered(task_request.agent_type)
            check_offered(
                task_request.task_type, task_request.agent_type, offered, configured
            )
        key = idempotency_key(request)
        traceparent = _header(request, b"traceparent")
        if traceparent is not None and not TRACEPARENT.fullmatch(traceparent):
            traceparent = None  # malformed trace context is dropped, per W3C
        task, created = await _shielded(
            ensureDeferred(
                router.submit(
                    task_request,
                    idempotency_key=key,
                    request_hash=request_hash(document) if key is not None else None,
                    request_id=getattr(request, "request_id", None),
                    traceparent=traceparent,
                )
            )
        )
        if not created:
            request.setHeader(b"idempotent-replayed", b"true")
        return render_json(
            request,
            {
                "task_id": task.id,
                "status": task.status,
                "agent_id": task.agent_id or task.requested_agent,
                "created_at": rfc3339_ms(task.created_at),
                "status_url": f"/tasks/{task.id}",
            },
            201,
        )

    @route(app, "/tasks/{task_id}", ("GET",))
    async def get(request: IRequest, task_id: str) -> bytes:
        guard.check(request, Permission.READ)
        task, events = await router.get(_task_id(task_id))
        return render_json(request, {**task_view(task), "history": _history(events)})

    @route(app, "/tasks", ("GET",), fast)
    async def list_tasks(request: IRequest) -> bytes:
        guard.check(request, Permission.READ)
        query = _query(request)
        results = _with_results(request)
        tasks = await router.list_tasks(query)
        return render_json(request, listing(tasks, query, results))

    @route(app, "/tasks/{task_id}", ("DELETE",))
    async def cancel(request: IRequest, task_id: str) -> bytes:
        guard.check(request, Permission.OPERATE)
        task = await router.cancel(_task_id(task_id))
        return render_json(request, task_view(task))
