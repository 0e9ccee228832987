"""Real twistd processes sharing one PostgreSQL, and restarts that forget nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..client import call_port
from ..databases import postgres_database
from .twistd import Twistd

LOCAL = "tcp:0:interface=127.0.0.1"
AGENT = {
    "name": "cost-agent",
    "type": "cost",
    "host": "10.1.1.1",
    "port": 8001,
    "capabilities": ["analyze_cost"],
}

pytestmark = pytest.mark.slow


def call(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    status, answer, _ = call_port(port, method, path, body)
    return status, answer


@pytest.fixture
def database() -> Iterator[str]:
    with postgres_database() as (url, _):
        yield url


def start(processes: list[Twistd], env: dict[str, str]) -> tuple[Twistd, int]:
    process = Twistd("--port", LOCAL, env=env)
    processes.append(process)
    return process, process.port()


def stop(process: Twistd) -> None:
    process.signal()
    assert process.wait() in (0, -15, 143)


def test_two_replicas_see_the_same_agents(
    processes: list[Twistd], database: str
) -> None:
    env = {"DATABASE_URL": database}
    _, first = start(processes, env)
    _, second = start(processes, env)
    code, registered = call(first, "POST", "/agents/register", AGENT)
    assert code == 201
    agent_id = registered["agent_id"]
    code, listing = call(second, "GET", "/agents")
    assert [a["id"] for a in listing["agents"]] == [agent_id]
    code, _ = call(
        second, "POST", f"/agents/{agent_id}/heartbeat", {"status": "degraded"}
    )
    assert code == 200
    _, seen = call(first, "GET", f"/agents/{agent_id}")
    assert seen["status"] == "degraded"
    code, _ = call(second, "POST", f"/agents/{agent_id}/unregister")
    assert code == 200
    code, _ = call(first, "GET", f"/agents/{agent_id}")
    assert code == 404


def test_two_replicas_sweep_each_agent_once(
    processes: list[Twistd], database: str
) -> None:
    env = {
        "DATABASE_URL": database,
        "UNREACHABLE_AFTER": "1",
        "AGENT_EXPIRY": "3",
        "SWEEP_INTERVAL": "0.2",
    }
    first_process, first = start(processes, env)
    second_process, _ = start(processes, env)
    ids = [
        call(first, "POST", "/agents/register", {**AGENT, "port": 9000 + n})[1][
            "agent_id"
        ]
        for n in range(10)
    ]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and call(first, "GET", "/agents")[1]["count"]:
        time.sleep(0.2)
    assert call(first, "GET", "/agents")[1]["count"] == 0
    lines = first_process.lines + second_process.lines

    def reported(message: str) -> list[str]:
        return sorted(line["agent_id"] for line in lines if line["message"] == message)

    silence = [
        line["agent_id"]
        for line in lines
        if line["message"] == "agent status changed" and line["cause"] == "silence"
    ]
    assert sorted(silence) == sorted(ids)  # each once, by one replica or the other
    assert reported("agent removed after silence") == sorted(ids)


def test_restart_keeps_agents_on_postgres(
    processes: list[Twistd], database: str
) -> None:
    process, port = start(processes, {"DATABASE_URL": database})
    _, registered = call(port, "POST", "/agents/register", AGENT)
    stop(process)
    _, port = start(processes, {"DATABASE_URL": database})
    code, _ = call(port, "POST", f"/agents/{registered['agent_id']}/heartbeat", {})
    assert code == 200


def test_restart_keeps_agents_on_sqlite(
    processes: list[Twistd], tmp_path: Path
) -> None:
    env = {"STATE_DIR": str(tmp_path)}
    process, port = start(processes, env)
    _, registered = call(port, "POST", "/agents/register", AGENT)
    stop(process)
    assert (tmp_path / "orchestrator.db").is_file()
    _, port = start(processes, env)
    code, _ = call(port, "POST", f"/agents/{registered['agent_id']}/heartbeat", {})
    assert code == 200


def test_unreachable_database_at_startup_is_a_clear_error(
    processes: list[Twistd],
) -> None:
    process = Twistd(
        "--port",
        LOCAL,
        env={"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1"},
    )
    processes.append(process)
    assert process.wait(timeout=30) == 1
    [line] = [line for line in process.lines if line["level"] == "error"]
    assert line["setting"] == "DATABASE_URL"
    assert "cannot connect to PostgreSQL" in line["message"]
    assert "nobody" not in line["value"]  # credentials stay out of the log


def test_production_refuses_to_start_without_keys(processes: list[Twistd]) -> None:
    process = Twistd("--port", LOCAL, env={"ENVIRONMENT": "production"})
    processes.append(process)
    assert process.wait() == 2
    [line] = process.lines
    assert line["setting"] == "API_KEYS_FILE"
