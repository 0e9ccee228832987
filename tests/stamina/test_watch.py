"""A dispatcher that stops passing shows in /readyz and /metrics of a live service."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet.defer import fail

from optiinfra.routing.loops import RouterService

from ..agents import HANG, StartAgent, settle, until_sent
from ..conftest import StartService
from ..test_routing import TASK, call, register


@pytest_twisted.ensureDeferred
async def test_readyz_names_a_stalled_dispatcher_until_it_passes_again(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(agent_concurrency=1, drain_timeout=0.5)
    busy, free = await start_agent(HANG), await start_agent(HANG)
    await register(service, busy)
    code, _ = await call(service, "POST", "/tasks", TASK)
    assert code == 201
    await until_sent(busy, "analyze_cost")
    routing = service.top.getServiceNamed("task-router")
    assert isinstance(routing, RouterService)
    tasks = routing.router.tasks
    due_tasks = tasks.due_tasks

    def broken(*args: Any) -> Any:
        return fail(RuntimeError("a bug in the dispatch pass"))

    tasks.due_tasks = broken  # type: ignore[method-assign]
    code, _ = await call(service, "POST", "/tasks", TASK)  # waits: the agent is busy
    assert code == 201
    await register(service, free)  # a free agent, and a pass that cannot run
    for _ in range(100):
        code, body = await call(service, "GET", "/readyz")
        if code == 503:
            break
        await settle(0.1)
    assert code == 503, body
    assert "no dispatch pass has finished" in body["reasons"]["dispatch"]
    metrics = await (await service.get("/metrics")).text()
    failures = next(
        line
        for line in metrics.splitlines()
        if line.startswith("optiinfra_dispatch_pass_failures_total ")
    )
    assert float(failures.split()[1]) >= 3
    tasks.due_tasks = due_tasks  # type: ignore[method-assign]
    await until_sent(free, "analyze_cost")
    for _ in range(50):
        code, body = await call(service, "GET", "/readyz")
        if code == 200:
            break
        await settle(0.1)
    assert code == 200, body
