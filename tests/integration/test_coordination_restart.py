"""
A plan carried across a real restart: twistd is stopped with SIGTERM in the
middle of a step, started again on the same state, and finishes the plan.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest

from .test_shared_store import LOCAL, call, stop
from .twistd import Twistd

pytestmark = pytest.mark.slow


class Agents(ThreadingHTTPServer):
    """
    One HTTP server standing in for every agent (each registers it under its
    own type): completes every task, except the task types in C{hang}, whose
    calls are held until the caller gives up.
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.received: list[str] = []
        self.hang: set[str] = set()
        self.released = threading.Event()

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    server: Agents

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        body = orjson.loads(self.rfile.read(length))
        self.server.received.append(body["task_type"])
        if body["task_type"] in self.server.hang:
            self.server.released.wait(30)
            return
        answer = orjson.dumps(
            {"task_id": body["task_id"], "status": "completed", "result": {}}
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def agents() -> Iterator[Agents]:
    server = Agents()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.released.set()
    server.shutdown()
    server.server_close()


def register(port: int, agents: Agents) -> None:
    for kind in ("cost", "application"):
        code, _ = call(
            port,
            "POST",
            "/agents/register",
            {
                "name": f"{kind}-agent",
                "type": kind,
                "host": "127.0.0.1",
                "port": agents.port,
                "capabilities": [
                    "take_snapshot",
                    "migrate_workload",
                    "restore_snapshot",
                    "validate_quality",
                ],
            },
        )
        assert code == 201


def wait_plan(port: int, plan_id: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        code, plan = call(port, "GET", f"/coordination/plans/{plan_id}")
        assert code == 200
        if plan["status"] == status:
            return plan  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError(f"plan stayed {plan['status']}: {plan}")


def test_a_plan_survives_a_real_restart(
    processes: list[Twistd], agents: Agents, tmp_path: Path
) -> None:
    env = {"STATE_DIR": str(tmp_path), "DRAIN_TIMEOUT": "0.5", "RETRY_DELAY": "0.1"}
    first = Twistd("--port", LOCAL, env=env)
    processes.append(first)
    port = first.port()
    register(port, agents)
    agents.hang.add("migrate_workload")
    code, result = call(
        port,
        "POST",
        "/coordination/coordinate",
        {
            "customer_id": "acme",
            "execute_now": True,
            "recommendations": [
                {
                    "id": "spot",
                    "agent_type": "cost",
                    "action": "migrate_to_spot",
                    "risk_level": "low",
                    "affected_resources": ["vm-1"],
                }
            ],
        },
    )
    assert code == 200, result
    plan_id = result["execution_plans"][0]["id"]
    first.wait_for(
        lambda line: line.get("message") == "plan step sent" and line.get("step") == 1
    )
    deadline = time.monotonic() + 10
    while "migrate_workload" not in agents.received:
        assert time.monotonic() < deadline, agents.received
        time.sleep(0.02)
    stop(first)  # mid-step: the call is handed back, the plan stays running

    agents.hang.clear()
    second = Twistd("--port", LOCAL, env=env)
    processes.append(second)
    port = second.port()
    done = wait_plan(port, plan_id, "completed")
    assert [step["status"] for step in done["steps"]] == ["completed"] * 3
    assert agents.received.count("take_snapshot") == 1
    assert agents.received.count("migrate_workload") == 2
    assert agents.received.count("validate_quality") == 1
    second.wait_for_message("plan completed")
    stop(second)
