"""Liveness rules, driven by a fake clock over a real store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.task import Clock

from optiinfra.errors import NotFound
from optiinfra.registry.loops import Sweeper
from optiinfra.registry.model import AgentQuery
from optiinfra.registry.parse import Beat, Registration
from optiinfra.registry.service import Registry, RegistryConfig, RegistryMetrics
from optiinfra.store.sql import SQLStore
from optiinfra.store.sqlite import SQLiteBackend

from .conftest import LogCapture


def registration(name: str = "cost-1", **changes: object) -> Registration:
    fields: dict[str, object] = {
        "name": name,
        "type": "cost",
        "host": "10.0.0.1",
        "port": 8001,
        "capabilities": ("analyze_cost",),
        "version": "1",
        "metadata": {},
        "status": "healthy",
    }
    fields.update(changes)
    return Registration(**fields)  # type: ignore[arg-type]


class World:
    def __init__(self, registry: Registry, clock: Clock, metrics: CollectorRegistry):
        self.registry = registry
        self.clock = clock
        self.metrics = metrics

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.get_sample_value(name, labels)
        return 0.0 if value is None else value


@pytest_twisted.async_yield_fixture
async def world(tmp_path: Path, logs: LogCapture) -> AsyncIterator[World]:
    backend = SQLiteBackend(tmp_path / "db", reactor)
    backend.open()
    backend.start()
    clock = Clock()
    clock.advance(1_000_000)
    metrics = CollectorRegistry()
    registry = Registry(
        SQLStore(backend, reactor),
        clock,
        RegistryConfig(),
        RegistryMetrics(metrics),
    )
    yield World(registry, clock, metrics)
    await backend.close()


@pytest_twisted.ensureDeferred
async def test_silent_agents_become_unreachable_then_come_back(
    world: World, logs: LogCapture
) -> None:
    agent, created = await world.registry.register(registration())
    assert created
    assert world.registry.status_of(agent) == "healthy"
    world.clock.advance(44)
    assert world.registry.status_of(agent) == "healthy"
    world.clock.advance(2)  # 46 s of silence: past 1.5 intervals
    assert world.registry.status_of(agent) == "unreachable"
    listed = await world.registry.list(AgentQuery(status="unreachable"))
    assert [a.id for a in listed] == [agent.id]
    await world.registry.sweep()
    changes = [e for e in logs.events if e["event"] == "agent status changed"]
    assert [(e["previous"], e["status"], e["cause"]) for e in changes] == [
        ("healthy", "unreachable", "silence")
    ]
    await world.registry.sweep()  # reported once, not at every sweep
    assert len([e for e in logs.events if e["event"] == "agent status changed"]) == 1
    assert world.sample("optiinfra_agents", type="cost", status="unreachable") == 1
    await world.registry.heartbeat(agent.id, Beat("degraded", {}))
    stored = await world.registry.get(agent.id)
    assert world.registry.status_of(stored) == "degraded"
    last = [e for e in logs.events if e["event"] == "agent status changed"][-1]
    assert (last["previous"], last["status"]) == ("unreachable", "degraded")


@pytest_twisted.ensureDeferred
async def test_long_silent_agents_are_removed_and_logged(
    world: World, logs: LogCapture
) -> None:
    agent, _ = await world.registry.register(registration())
    world.clock.advance(601)
    await world.registry.sweep()
    with pytest.raises(NotFound):
        await world.registry.get(agent.id)
    [removed] = [e for e in logs.events if e["event"] == "agent removed after silence"]
    assert removed["agent_id"] == agent.id
    assert removed["silent_seconds"] == 601
    assert (
        world.sample("optiinfra_agent_removals_total", type="cost", reason="expired")
        == 1
    )
    assert world.sample("optiinfra_agents", type="cost", status="healthy") == 0


@pytest_twisted.ensureDeferred
async def test_events_are_counted(world: World, logs: LogCapture) -> None:
    agent, _ = await world.registry.register(registration())
    await world.registry.register(registration())
    await world.registry.heartbeat(agent.id, Beat("healthy", {}))
    with pytest.raises(NotFound):
        await world.registry.heartbeat("ghost", Beat("healthy", {}))
    await world.registry.unregister(agent.id)
    with pytest.raises(NotFound):
        await world.registry.unregister(agent.id)
    assert (
        world.sample(
            "optiinfra_agent_registrations_total", type="cost", outcome="registered"
        )
        == 1
    )
    assert (
        world.sample(
            "optiinfra_agent_registrations_total", type="cost", outcome="refreshed"
        )
        == 1
    )
    assert world.sample("optiinfra_agent_heartbeats_total", outcome="accepted") == 1
    assert (
        world.sample("optiinfra_agent_heartbeats_total", outcome="unknown_agent") == 1
    )
    assert (
        world.sample(
            "optiinfra_agent_removals_total", type="cost", reason="unregistered"
        )
        == 1
    )
    messages = logs.messages()
    assert "agent registered" in messages
    assert "agent registered again" in messages
    assert "agent unregistered" in messages


@pytest_twisted.ensureDeferred
async def test_sweeper_runs_on_the_clock(world: World, logs: LogCapture) -> None:
    await world.registry.register(registration())
    sweeper = Sweeper(world.registry, world.clock)
    sweeper.startService()  # sweeps at once, while the agent is fresh
    try:
        assert sweeper._running is not None
        await sweeper._running
        world.clock.advance(50)  # the next sweep is due; the agent went quiet
        await sweeper._running
        assert any(e["event"] == "agent status changed" for e in logs.events)
    finally:
        await sweeper.stopService()
