"""
The router's slot accounting on a clock: every slot reserved for a call is
released however the call ends, so an agent is never starved by lost slots.

A real SQLite store answers on its threads; time, for the router, is a
L{Clock} the test moves, and agents are in memory, answering when told.  The
store fails on demand (as a full disk or a lost database does), and the clock
jumps while a pass is half done, as a busy reactor makes it.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.internet.task import Clock, deferLater

from optiinfra.errors import Overloaded
from optiinfra.registry.model import Agent
from optiinfra.registry.parse import Registration
from optiinfra.registry.service import Registry, RegistryConfig, RegistryMetrics
from optiinfra.routing.dispatch import Completed, Failed, Outcome, Retryable
from optiinfra.routing.model import FINISHED, Task
from optiinfra.routing.router import Router, RouterConfig, TaskRequest
from optiinfra.store.interface import StoreUnavailable
from optiinfra.store.sql import SQLStore
from optiinfra.store.sqlite import SQLiteBackend
from optiinfra.store.tasks import TaskStore


class StrictClock(Clock):
    """A clock that, like the reactor, refuses a timer in the past."""

    def callLater(self, delay: float, *args: Any, **kw: Any) -> Any:
        assert delay >= 0, f"{delay} is not greater than or equal to 0 seconds"
        return super().callLater(delay, *args, **kw)


class MemoryAgents:
    """The dispatcher's seam, in memory: each call waits for the test's word."""

    def __init__(self) -> None:
        self.calls: dict[str, Deferred[Outcome]] = {}
        self.sent: list[str] = []
        #: Every call begun, with the seconds it was given.
        self.begun: list[tuple[str, float]] = []
        self.explode = False

    async def send(self, agent: Agent, task: Task, seconds_left: float) -> Outcome:
        self.begun.append((task.id, seconds_left))
        if self.explode:
            raise RuntimeError("the dispatcher blew up")
        answer: Deferred[Outcome] = Deferred()
        self.calls[task.id] = answer
        self.sent.append(task.id)
        try:
            return await answer
        finally:
            self.calls.pop(task.id, None)

    def answer(self, index: int, outcome: Outcome | Exception) -> None:
        if not self.calls:
            return
        task_id = sorted(self.calls)[index % len(self.calls)]
        call = self.calls[task_id]
        if isinstance(outcome, Exception):
            call.errback(outcome)
        else:
            call.callback(outcome)


class FlakyTasks(TaskStore):
    """
    The real task store, whose status changes fail while C{failing}, and
    whose every read of due tasks fails while C{reads_fail}.
    """

    failing = False
    reads_fail = False

    def change_task(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        if self.failing:
            return fail(StoreUnavailable("the disk is full"))
        return super().change_task(*args, **kwargs)

    def due_tasks(self, now: float, limit: int, *kinds: Any) -> Deferred[list[Task]]:
        if self.reads_fail:
            return fail(RuntimeError("a bug in the dispatch pass"))
        return super().due_tasks(now, limit, *kinds)


class World:
    def __init__(self, path: Path) -> None:
        self.backend = SQLiteBackend(path, reactor)
        self.backend.open()
        self.backend.start()
        store = SQLStore(self.backend, reactor)
        self.clock = StrictClock()
        self.clock.advance(1_000_000)
        self.registry = Registry(
            store,
            self.clock,
            RegistryConfig(unreachable_after=1e9, expire_after=1e9),
            RegistryMetrics(CollectorRegistry()),
        )
        self.tasks = FlakyTasks(self.backend)
        #: What the router said of a stalled dispatcher, in order.
        self.stalls: list[str | None] = []
        self.agents = MemoryAgents()
        self.router = Router(
            self.tasks,
            self.registry,
            self.clock,
            self.agents,  # type: ignore[arg-type]
            RouterConfig(per_agent_limit=2, retry_delay=0.2, attempt_timeout=5.0),
            CollectorRegistry(),
            rng=random.Random(7),
            stalled=self.stalls.append,
        )
        self.submitted: list[str] = []
        self.running: list[Deferred[Any]] = []

    def submit(self, timeout: float, retries: int = 1) -> None:
        request = TaskRequest(
            task_type="analyze_cost",
            agent_type="cost",
            parameters={},
            priority=5,
            timeout_seconds=timeout,
            max_retries=retries,
            metadata={},
        )
        submitting = ensureDeferred(self.router.submit(request))
        submitting.addCallback(lambda done: self.submitted.append(done[0].id))
        submitting.addErrback(lambda f: f.trap(StoreUnavailable, Overloaded))
        self.running.append(submitting)

    async def quiet(self) -> None:
        """Let the store, the passes and the zero-delay timers run dry."""
        still = 0
        for _ in range(2000):
            self.clock.advance(0)
            await deferLater(reactor, 0.001, lambda: None)
            busy = (
                self.router._passing
                or self.backend._pumping
                or any(not d.called for d in self.running)
            )
            still = 0 if busy else still + 1
            if still >= 5:
                return
        raise AssertionError("the router never went quiet")


@pytest_twisted.async_yield_fixture
async def make_world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    worlds: list[World] = []

    async def make() -> World:
        world = World(tmp_path_factory.mktemp("slots") / "db")
        worlds.append(world)
        for number in (1, 2):
            await world.registry.register(
                Registration(
                    name=f"cost-{number}",
                    type="cost",
                    host="127.0.0.1",
                    port=9000 + number,
                    capabilities=("analyze_cost",),
                    version="1",
                    metadata={},
                    status="healthy",
                )
            )
        return world

    yield make
    for world in worlds:
        await world.backend.close()


OUTCOMES: list[Outcome | Exception] = [
    Completed({"ok": True}),
    Failed("no metrics for account"),
    Retryable("agent answered 502"),
    RuntimeError("the connection broke oddly"),
]


def operation(rng: random.Random) -> tuple[Any, ...]:
    """One random thing that happens to a router: work, answers, faults, time."""
    kind = rng.choice(
        ["submit"] * 4
        + ["answer"] * 4
        + ["cancel", "advance", "advance", "flaky", "explode", "pass"]
        + ["housekeeping", "settle", "settle"]
    )
    if kind == "submit":
        return (kind, rng.choice([0.3, 1.0, 2.0, 30.0]))
    if kind == "answer":
        return (kind, rng.randrange(50), rng.randrange(len(OUTCOMES)))
    if kind == "cancel":
        return (kind, rng.randrange(50))
    if kind == "advance":
        return (kind, rng.choice([0.05, 0.3, 1.0, 5.5]))
    if kind in ("flaky", "explode"):
        return (kind, rng.random() < 0.5)
    return (kind, None)


async def apply(world: World, op: tuple[Any, ...]) -> None:
    kind = op[0]
    router = world.router
    if kind == "submit":
        world.submit(op[1])
    elif kind == "answer":
        world.agents.answer(op[1], OUTCOMES[op[2]])
    elif kind == "cancel" and world.submitted:
        task_id = world.submitted[op[1] % len(world.submitted)]
        cancelling = ensureDeferred(router.cancel(task_id))
        cancelling.addErrback(lambda f: None)  # already over: a 409
        world.running.append(cancelling)
    elif kind == "advance":
        world.clock.advance(op[1])  # while passes may be half done
    elif kind == "flaky":
        world.tasks.failing = op[1]
    elif kind == "explode":
        world.agents.explode = op[1]
    elif kind == "pass":
        router.wake()
    elif kind == "housekeeping":
        housekeeping = ensureDeferred(router.housekeeping())
        housekeeping.addErrback(lambda f: f.trap(StoreUnavailable))
        world.running.append(housekeeping)
    elif kind == "settle":
        await world.quiet()
        assert router.unbalanced_slots() == {}
        assert all(seconds > 0 for _, seconds in world.agents.begun)


@pytest.mark.parametrize("seed", range(24))
@pytest_twisted.ensureDeferred
async def test_slots_always_match_the_calls_in_flight(
    make_world: Any, seed: int
) -> None:
    """
    Random histories (seeded: a failure names its seed and its history):
    submissions, answers of every kind, cancels, store failures, a dispatcher
    that raises, clock jumps in the middle of passes.  Whenever things settle,
    reserved slots equal calls in flight.
    """
    rng = random.Random(seed)
    ops = [operation(rng) for _ in range(rng.randrange(10, 60))]
    world = await make_world()
    done: list[tuple[Any, ...]] = []
    for op in ops:
        done.append(op)
        try:
            await apply(world, op)
        except AssertionError as error:
            raise AssertionError(f"seed {seed} after {done}") from error
    # Whatever happened, once the faults stop and the agents answer, the
    # accounting is exact and a new task goes out at once.
    world.tasks.failing = False
    world.agents.explode = False
    await world.quiet()
    assert world.router.unbalanced_slots() == {}, (seed, ops)
    while world.agents.calls:
        world.agents.answer(0, OUTCOMES[0])
        await world.quiet()
    world.clock.advance(60)  # every earlier task past its deadline
    world.router.wake()
    await world.quiet()
    assert world.router.unbalanced_slots() == {}, (seed, ops)
    assert world.router.outstanding.agents() == [], (seed, ops)
    before = len(world.agents.sent)
    world.submit(30.0)
    await world.quiet()
    assert len(world.agents.sent) == before + 1, ("no fresh task went out", seed, ops)
    assert world.router.unbalanced_slots() == {}


@pytest_twisted.ensureDeferred
async def test_a_task_late_at_its_claim_times_out_without_a_call(
    make_world: Any,
) -> None:
    """
    The wedge from overload: the deadline passed between the read of due
    tasks and the claim.  It ends C{timeout}, is never called, and the slot
    is free again, with no negative timer anywhere.
    """
    world = await make_world()
    router = world.router
    # Fill both agents' slots, so that the next task must wait for a pass.
    for _ in range(4):
        world.submit(30.0)
    await world.quiet()
    assert len(world.agents.calls) == 4
    world.submit(0.3)
    await world.quiet()
    [late_id] = [t for t in world.submitted if t not in world.agents.sent]
    # A slot frees; the pass it starts reads the late task as due, and the
    # clock jumps past its deadline while the pass waits for the store.
    world.agents.answer(0, OUTCOMES[0])
    world.clock.advance(0)
    world.clock.advance(0.29)
    await deferLater(reactor, 0.001, lambda: None)
    world.clock.advance(0.5)
    await world.quiet()
    task, history = await router.get(late_id)
    assert task.status == "timeout"
    assert late_id not in [task_id for task_id, _ in world.agents.begun]
    assert router.unbalanced_slots() == {}
    assert all(call.getTime() >= world.clock.seconds() for call in world.clock.calls)
    assert [e.status for e in history][-1] == "timeout"


@pytest_twisted.ensureDeferred
async def test_a_pass_that_fails_midway_gives_back_what_it_took(
    make_world: Any,
) -> None:
    """
    The store fails as tasks are claimed: the pass fails, is counted once, and
    its slots come back; once the store answers, the same tasks go out.
    """
    world = await make_world()
    router = world.router
    world.tasks.failing = True
    for _ in range(3):
        world.submit(30.0)  # stored pending: only claims fail
    await world.quiet()
    router.wake()
    await world.quiet()
    assert router.unbalanced_slots() == {}
    assert router.outstanding.agents() == []
    failures = router._metrics.pass_failures._value.get()
    assert failures >= 1
    world.tasks.failing = False
    router.wake()
    await world.quiet()
    assert len(world.agents.calls) == 3
    assert router.unbalanced_slots() == {}
    for task_id in list(world.agents.calls):
        world.agents.answer(0, OUTCOMES[0])
        await world.quiet()
        task, _ = await router.get(task_id)
        assert task.status in FINISHED


@pytest_twisted.ensureDeferred
async def test_a_dispatcher_that_stops_passing_is_reported_and_recovers(
    make_world: Any,
) -> None:
    """
    Passes that keep failing while tasks wait and agents are free: after three
    periodic passes the dispatcher is reported stalled (what /readyz shows),
    and no longer once a pass gets through.
    """
    world = await make_world()
    router = world.router
    for _ in range(4):
        world.submit(30.0)  # both agents full
    await world.quiet()
    world.tasks.reads_fail = True
    world.submit(30.0)  # waits, and no pass can read it
    await world.quiet()
    world.agents.answer(0, OUTCOMES[0])  # an agent is free
    await world.quiet()
    for _ in range(5):
        world.clock.advance(1.0)
        await router.housekeeping()
        await world.quiet()
    assert world.stalls[-1] is not None
    assert "no dispatch pass has finished" in world.stalls[-1]
    assert router._metrics.pass_failures._value.get() >= 3
    world.tasks.reads_fail = False
    world.clock.advance(1.0)
    await router.housekeeping()  # the pass it starts gets through
    await world.quiet()
    await router.housekeeping()
    assert world.stalls[-1] is None
    assert len(world.agents.calls) == 4
