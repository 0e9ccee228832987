"""
The console in a real browser: live agents, a critical change approved by two
operators, a plan rolled back on screen, and a viewer who can change nothing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from playwright.sync_api import Page, expect
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import LoopingCall

from optiinfra.auth import Role, generate

from ..agents import COMPLETE, FAIL, HANG, FakeAgent, StartAgent
from ..conftest import RunningService, StartService
from .conftest import BrowserThread

pytestmark = pytest.mark.slow

#: Milliseconds a step may wait for the page to show something.
WAIT = 30_000
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def key_file(path: Path, *people: tuple[str, Role]) -> dict[str, str]:
    keys, lines = {}, []
    for name, role in people:
        key, line = generate(name, role)
        keys[name] = key
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")
    return keys


async def post(
    service: RunningService, path: str, body: Any, key: str
) -> tuple[int, Any]:
    response = await service.request(
        "POST", path, json=body, headers={"Authorization": f"Bearer {key}"}
    )
    return response.code, await response.json()


class LiveAgent:
    """A fake agent on a real socket that registers and heartbeats like one."""

    def __init__(self, service: RunningService, agent: FakeAgent, key: str) -> None:
        self.service = service
        self.agent = agent
        self.key = key
        self.id = ""
        self._beats = LoopingCall(lambda: ensureDeferred(self._beat()))
        self._beats.clock = reactor

    async def register(
        self, name: str, kind: str, capabilities: list[str], every: float
    ) -> None:
        assert self.agent.port is not None
        code, body = await post(
            self.service,
            "/agents/register",
            {
                "name": name,
                "type": kind,
                "host": "127.0.0.1",
                "port": self.agent.port.getHost().port,
                "capabilities": capabilities,
            },
            self.key,
        )
        assert code == 201, body
        self.id = body["agent_id"]
        self._beats.start(every, now=False)

    async def _beat(self) -> None:
        response = await treq.post(
            f"{self.service.url}/agents/{self.id}/heartbeat",
            json={"status": "healthy"},
            headers={"Authorization": f"Bearer {self.key}"},
            pool=self.service.pool,
        )
        await response.content()

    async def stop(self) -> None:
        """The agent process dies: no more heartbeats, no more socket."""
        if self._beats.running:
            self._beats.stop()
        if self.agent.port is not None:
            await self.agent.port.stopListening()
            self.agent.port = None


# Browser steps (run on the browser's thread) -------------------------------------


def sign_in(
    browser: BrowserThread, url: str, key: str, viewport: dict[str, int] = DESKTOP
) -> Page:
    """A new context (its own sessionStorage), signed in with C{key}."""
    context = browser.browser.new_context(viewport=viewport)
    page = context.new_page()
    page.set_default_timeout(WAIT)
    page.foreign = []  # type: ignore[attr-defined]
    page.errors = []  # type: ignore[attr-defined]
    page.on(
        "request",
        lambda request: (
            None if request.url.startswith(url) else page.foreign.append(request.url)
        ),  # type: ignore[attr-defined]
    )
    page.on(
        "console",
        lambda message: (
            page.errors.append(message.text)  # type: ignore[attr-defined]
            if message.type == "error"
            else None
        ),
    )
    page.on("pageerror", lambda error: page.errors.append(str(error)))  # type: ignore[attr-defined]
    page.goto(f"{url}/console")
    field = page.get_by_label("API key")  # the field is labelled
    expect(field).to_be_focused(timeout=WAIT)
    field.fill(key)
    page.keyboard.press("Enter")
    expect(page.locator("#feed-state")).to_have_text("live", timeout=WAIT)
    page.evaluate("window.__notReloaded = true")
    return page


def show(page: Page, tab: str) -> None:
    page.get_by_role("tab", name=tab).click()
    expect(page.locator(f"#view-{tab.lower()}")).to_be_visible(timeout=WAIT)


def shoot(page: Page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)


def agent_status(page: Page, name: str) -> Any:
    return page.locator(f'tr[data-agent="{name}"] td.status')


def still_same_page(page: Page) -> None:
    assert page.evaluate("window.__notReloaded") is True
    assert page.foreign == []  # type: ignore[attr-defined]
    assert page.errors == []  # type: ignore[attr-defined]


# 1. Agents -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_agents_go_healthy_then_one_turns_unreachable_without_a_reload(
    start_service: StartService,
    start_agent: StartAgent,
    browser: BrowserThread,
    shots: Path,
    tmp_path: Path,
) -> None:
    keys = key_file(tmp_path / "keys", ("ops", Role.OPERATOR), ("agents", Role.AGENT))
    service = await start_service(
        api_keys_file=tmp_path / "keys",
        heartbeat_interval=0.5,
        unreachable_after=2.0,
        sweep_interval=0.25,
    )
    page = await browser.run(sign_in, browser, service.url, keys["ops"])
    agents = []
    for name in ("cost-a", "cost-b"):
        agent = LiveAgent(service, await start_agent(COMPLETE), keys["agents"])
        await agent.register(name, "cost", ["analyze_cost"], every=0.25)
        agents.append(agent)

    def both_healthy() -> None:
        for name in ("cost-a", "cost-b"):
            expect(agent_status(page, name)).to_have_text("healthy", timeout=WAIT)
        shoot(page, shots / "agents-healthy.png")

    await browser.run(both_healthy)
    await agents[1].stop()

    def b_unreachable() -> None:
        expect(agent_status(page, "cost-b")).to_have_text("unreachable", timeout=WAIT)
        expect(agent_status(page, "cost-a")).to_have_text("healthy")
        still_same_page(page)
        shoot(page, shots / "agents-one-unreachable.png")
        page.set_viewport_size(PHONE)
        shoot(page, shots / "agents-phone.png")

    await browser.run(b_unreachable)
    await agents[0].stop()
    assert sorted(p.name for p in shots.iterdir()) == [  # noqa: ASYNC240
        "agents-healthy.png",
        "agents-one-unreachable.png",
        "agents-phone.png",
    ]


# 2. A critical change, two operators, a plan and a rollback -------------------------


def migrate(rec_id: str, customer: str, risk: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": rec_id,
        "agent_id": "cost-agent-1",
        "agent_type": "cost",
        "customer_id": customer,
        "type": "optimization",
        "title": f"Move {rec_id} to spot",
        "description": "Spot capacity is 70 % cheaper for this batch workload.",
        "action": "migrate_to_spot",
        "risk_level": risk,
        "estimated_savings": 1200.0,
        "confidence": 0.9,
        "priority": 10,
        "affected_resources": [f"{rec_id}-nodes"],
        **fields,
    }


async def fleet(
    service: RunningService, start_agent: StartAgent, key: str
) -> tuple[LiveAgent, LiveAgent]:
    cost = LiveAgent(service, await start_agent(COMPLETE), key)
    await cost.register(
        "cost-1",
        "cost",
        ["take_snapshot", "migrate_workload", "restore_snapshot"],
        every=5,
    )
    quality = LiveAgent(service, await start_agent(COMPLETE), key)
    await quality.register("quality-1", "application", ["validate_quality"], every=5)
    return cost, quality


def plan_card(page: Page, action: str, customer: str) -> Any:
    return (
        page.locator("article[data-plan]")
        .filter(has_text=action)
        .filter(has_text=customer)
    )


@pytest_twisted.ensureDeferred
async def test_two_operators_approve_a_critical_change_and_watch_it_run(
    start_service: StartService,
    start_agent: StartAgent,
    browser: BrowserThread,
    shots: Path,
    tmp_path: Path,
) -> None:
    keys = key_file(
        tmp_path / "keys",
        ("alice", Role.OPERATOR),
        ("bob", Role.OPERATOR),
        ("agents", Role.AGENT),
    )
    service = await start_service(api_keys_file=tmp_path / "keys")
    _, quality = await fleet(service, start_agent, keys["agents"])
    alice = await browser.run(sign_in, browser, service.url, keys["alice"])
    bob = await browser.run(sign_in, browser, service.url, keys["bob"])

    # A critical change, and a cheaper one for the same nodes that loses to it.
    code, result = await post(
        service,
        "/coordination/coordinate",
        {
            "customer_id": "acme",
            "execute_now": True,
            "recommendations": [
                migrate("batch", "acme", "critical"),
                {
                    **migrate("batch-alt", "acme", "medium"),
                    "action": "right_size",
                    "priority": 1,
                    "estimated_savings": 100.0,
                    "affected_resources": ["batch-nodes"],
                },
            ],
        },
        keys["alice"],
    )
    assert code == 200, result
    assert result["conflicts_detected"] == 1

    def alice_approves() -> None:
        show(alice, "Approvals")
        card = alice.locator("article[data-approval]").filter(has_text="Move batch")
        expect(card.locator(".approvers")).to_contain_text("0 of 2", timeout=WAIT)
        expect(card).to_contain_text("critical risk")
        expect(card.locator(".conflicts")).to_contain_text("dropped batch-alt")
        expect(card.locator(".time-left")).to_contain_text("left")
        shoot(alice, shots / "approvals-pending.png")
        card.get_by_role("button", name="Approve").click()
        expect(card.locator(".approvers")).to_contain_text("1 of 2", timeout=WAIT)
        expect(card).to_contain_text("needs another person")
        expect(card).to_contain_text("You approved this.")
        expect(card.get_by_role("button", name="Approve")).to_have_count(0)

    await browser.run(alice_approves)

    def bob_sees_alice_and_approves() -> None:
        show(bob, "Approvals")
        card = bob.locator("article[data-approval]").filter(has_text="Move batch")
        expect(card.locator(".approvers")).to_contain_text(
            "Approved by alice (1 of 2)", timeout=WAIT
        )
        shoot(bob, shots / "approvals-one-of-two.png")
        card.get_by_role("button", name="Approve").focus()
        bob.keyboard.press("Enter")  # keyboard reachable
        expect(card.locator(".badge").first).to_have_text("approved", timeout=WAIT)
        show(bob, "Plans")
        plan = plan_card(bob, "migrate_to_spot", "acme")
        expect(plan.locator("li[data-status=completed]")).to_have_count(3, timeout=WAIT)
        expect(plan.locator(".badge").first).to_have_text("completed", timeout=WAIT)
        shoot(bob, shots / "plans-completed.png")
        still_same_page(bob)

    await browser.run(bob_sees_alice_and_approves)

    # The next change fails its validation: the plan rolls back, on screen.
    quality.agent.overrides["validate_quality"] = FAIL
    code, result = await post(
        service,
        "/coordination/coordinate",
        {
            "customer_id": "globex",
            "auto_approve": True,
            "execute_now": True,
            "recommendations": [migrate("etl", "globex", "high")],
        },
        keys["alice"],
    )
    assert code == 200, result

    def alice_sees_the_rollback() -> None:
        show(alice, "Plans")
        plan = plan_card(alice, "migrate_to_spot", "globex")
        expect(plan.locator(".badge").first).to_have_text("rolled back", timeout=WAIT)
        migrate_step = plan.locator("li[data-step=migrate_workload]")
        expect(migrate_step).to_have_attribute("data-status", "rolled_back")
        expect(migrate_step.locator(".rollback")).to_have_text(
            "rollback: restore_snapshot"
        )
        expect(plan.locator("li[data-step=validate_quality]")).to_have_attribute(
            "data-status", "failed"
        )
        shoot(alice, shots / "plans-rolled-back.png")
        show(alice, "Tasks")
        expect(alice.locator("#tasks tbody tr").first).to_be_visible()
        alice.locator("#tasks tbody tr").first.get_by_role(
            "button", name="Details"
        ).click()
        expect(alice.locator("#task-detail")).to_contain_text("History")
        expect(alice.locator("#task-detail")).not_to_contain_text("null")
        shoot(alice, shots / "tasks.png")
        alice.set_viewport_size(PHONE)
        show(alice, "Plans")
        shoot(alice, shots / "plans-phone.png")
        still_same_page(alice)

    await browser.run(alice_sees_the_rollback)


# 3. A viewer ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_viewer_sees_no_buttons_and_a_forged_approve_is_refused(
    start_service: StartService,
    start_agent: StartAgent,
    browser: BrowserThread,
    shots: Path,
    tmp_path: Path,
) -> None:
    keys = key_file(
        tmp_path / "keys",
        ("ops", Role.OPERATOR),
        ("watcher", Role.VIEWER),
        ("agents", Role.AGENT),
    )
    service = await start_service(api_keys_file=tmp_path / "keys")
    await fleet(service, start_agent, keys["agents"])
    code, result = await post(
        service,
        "/coordination/coordinate",
        {"customer_id": "acme", "recommendations": [migrate("db", "acme", "high")]},
        keys["ops"],
    )
    assert code == 200, result
    [approval] = result["approvals"]
    page = await browser.run(sign_in, browser, service.url, keys["watcher"])

    def nothing_to_press() -> int:
        expect(page.locator("#who")).to_contain_text("watcher (viewer: read only)")
        # The tabs by keyboard: arrow keys move between them.
        page.get_by_role("tab", name="Agents").focus()
        page.keyboard.press("ArrowRight")
        expect(page.get_by_role("tab", name="Tasks")).to_be_focused()
        expect(page.locator("#view-tasks")).to_be_visible()
        expect(page.locator("#view-agents")).to_be_hidden()
        page.keyboard.press("ArrowLeft")
        expect(page.locator("#view-agents")).to_be_visible()
        show(page, "Approvals")
        card = page.locator("article[data-approval]").filter(has_text="Move db")
        expect(card).to_contain_text("0 of 1", timeout=WAIT)
        changes = re.compile("Approve|Reject|Cancel|Execute")
        for tab in ("Agents", "Tasks", "Approvals", "Plans"):
            show(page, tab)
            expect(page.get_by_role("button", name=changes)).to_have_count(0)
        show(page, "Approvals")
        expect(page.get_by_role("button", name="Approve")).to_have_count(0)
        expect(page.get_by_role("button", name="Reject")).to_have_count(0)
        shoot(page, shots / "approvals-viewer.png")
        status: int = page.evaluate(
            """async (id) => {
                const key = sessionStorage.getItem("optiinfra.apiKey");
                const response = await fetch(
                    `/coordination/approvals/${id}/approve`,
                    {method: "POST", headers: {
                        "Authorization": `Bearer ${key}`,
                        "Content-Type": "application/json"},
                     body: "{}"});
                return response.status;
            }""",
            approval["id"],
        )
        # The key lives in sessionStorage only: no cookie, no localStorage.
        assert page.evaluate("localStorage.length") == 0
        assert page.context.cookies() == []
        return status

    assert await browser.run(nothing_to_press) == 403
    response = await service.get(
        f"/coordination/approvals/{approval['id']}",
        headers={"Authorization": f"Bearer {keys['watcher']}"},
    )
    assert (await response.json())["status"] == "pending"


# 4. An operator's other buttons ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_operator_cancels_a_task_and_executes_a_plan(
    start_service: StartService,
    start_agent: StartAgent,
    browser: BrowserThread,
    shots: Path,
    tmp_path: Path,
) -> None:
    keys = key_file(tmp_path / "keys", ("ops", Role.OPERATOR), ("agents", Role.AGENT))
    service = await start_service(api_keys_file=tmp_path / "keys")
    await fleet(service, start_agent, keys["agents"])
    stuck = LiveAgent(service, await start_agent(HANG), keys["agents"])
    await stuck.register("slow-1", "resource", ["balance_load"], every=5)
    code, task = await post(
        service,
        "/tasks",
        {"task_type": "balance_load", "agent_type": "resource", "timeout_seconds": 120},
        keys["ops"],
    )
    assert code == 201, task
    code, result = await post(
        service,
        "/coordination/coordinate",
        {
            "customer_id": "initech",
            "auto_approve": True,
            "recommendations": [migrate("cache", "initech", "high")],
        },
        keys["ops"],
    )
    assert code == 200, result
    [plan] = result["execution_plans"]
    assert plan["status"] == "pending"
    code, result = await post(
        service,
        "/coordination/coordinate",
        {
            "customer_id": "initech",
            "recommendations": [migrate("queue", "initech", "medium")],
        },
        keys["ops"],
    )
    assert code == 200, result
    page = await browser.run(sign_in, browser, service.url, keys["ops"])

    def cancel_and_execute() -> None:
        show(page, "Tasks")
        row = page.locator("#tasks tbody tr").filter(has_text=task["task_id"][-8:])
        expect(row).to_contain_text("sent", timeout=WAIT)
        row.get_by_role("button", name="Cancel").click()
        expect(row).to_contain_text("cancelled", timeout=WAIT)
        expect(row.get_by_role("button", name="Cancel")).to_have_count(0)
        show(page, "Plans")
        card = plan_card(page, "migrate_to_spot", "initech")
        expect(card.locator(".badge").first).to_have_text("pending", timeout=WAIT)
        card.get_by_role("button", name="Execute").click()
        expect(card.locator(".badge").first).to_have_text("completed", timeout=WAIT)
        expect(card.get_by_role("button", name="Execute")).to_have_count(0)
        shoot(page, shots / "plans-executed.png")
        show(page, "Approvals")
        card = page.locator("article[data-approval]").filter(has_text="Move queue")
        card.get_by_role("button", name="Reject").click()  # no reason yet: refused
        reason = card.get_by_label("Reason for rejecting")
        expect(reason).to_be_focused()
        expect(reason).to_have_attribute("aria-invalid", "true")
        reason.fill("not during the freeze")
        card.get_by_role("button", name="Reject").click()
        expect(card.locator(".badge").first).to_have_text("rejected", timeout=WAIT)
        expect(card).to_contain_text("Rejected by ops: not during the freeze")
        expect(card.get_by_role("button")).to_have_count(0)
        still_same_page(page)

    await browser.run(cancel_and_execute)
    assert stuck.agent.cancelled == 1  # the call itself was cut short
