"""
Two real replicas on one PostgreSQL, the second one's clock 30 s ahead
(libfaketime): the leases the first holds are seen as the database sees them,
so the second never takes over its calls; and the second says it is not ready.
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

from ..databases import REQUIRE_POSTGRES
from ..pgcluster import PrivateCluster, private_cluster  # noqa: F401 - a fixture
from .test_database_faults import call, until
from .twistd import Twistd

pytestmark = pytest.mark.slow

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
LOCAL = "tcp:0:interface=127.0.0.1"
TASK = {"task_type": "analyze_cost", "agent_type": "cost"}
#: Longer than the time the skewed replica needs to see the leases as lapsed.
WORK_SECONDS = 4.0


class SlowAgent(BaseHTTPRequestHandler):
    """Records each task it is sent, works on it a while, then completes it."""

    received: list[str] = []
    open_calls = 0
    most_open = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = orjson.loads(self.rfile.read(int(self.headers["content-length"])))
        cls = type(self)
        with cls.lock:
            cls.received.append(body["task_id"])
            cls.open_calls += 1
            cls.most_open = max(cls.most_open, cls.open_calls)
        time.sleep(WORK_SECONDS)
        answer = orjson.dumps(
            {"task_id": body["task_id"], "status": "completed", "result": {}}
        )
        with cls.lock:
            cls.open_calls -= 1
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def agent() -> Iterator[int]:
    if not LIBFAKETIME.exists():
        reason = "libfaketime is not installed (apt-get install faketime)"
        if REQUIRE_POSTGRES:  # CI: .ci/run installs it
            pytest.fail(reason)
        pytest.skip(reason)
    SlowAgent.received, SlowAgent.open_calls, SlowAgent.most_open = [], 0, 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowAgent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()


def replicas(
    processes: list[Twistd],
    cluster: PrivateCluster,
) -> tuple[Twistd, Twistd]:
    """Two replicas on C{cluster}, the second one's clock 30 s ahead."""
    # A store timeout that a loaded machine's pings do not exceed, and the
    # shortest lease it allows.
    env = {"DATABASE_URL": cluster.url, "STORE_TIMEOUT": "3", "TASK_LEASE": "8"}
    first = Twistd("--port", LOCAL, env=env)
    processes.append(first)
    ahead = Twistd(
        "--port",
        LOCAL,
        env={
            **env,
            "LD_PRELOAD": str(LIBFAKETIME),
            "FAKETIME": "+30s",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        },
    )
    processes.append(ahead)
    return first, ahead


def test_a_replica_whose_clock_is_ahead_takes_over_no_call(
    processes: list[Twistd],
    private_cluster: PrivateCluster,  # noqa: F811 - the fixture
    agent: int,
) -> None:
    first, ahead = replicas(processes, private_cluster)
    port, ahead_port = first.port(), ahead.port()
    code, _, _ = call(
        port,
        "POST",
        "/agents/register",
        {
            "name": "slow",
            "type": "cost",
            "host": "127.0.0.1",
            "port": agent,
            "capabilities": ["analyze_cost"],
        },
    )
    assert code == 201
    tasks = [call(port, "POST", "/tasks", TASK)[1]["task_id"] for _ in range(4)]
    until(
        lambda: "clock" in call(ahead_port, "GET", "/readyz")[1].get("reasons", {}),
        "not ready for its clock",
    )
    ahead.wait_for_message("this host's clock is off the database's")
    until(
        lambda: all(
            call(port, "GET", f"/tasks/{task}")[1]["status"] == "completed"
            for task in tasks
        ),
        "completed",
    )
    assert sorted(SlowAgent.received) == sorted(tasks)  # each sent once
    assert SlowAgent.most_open == 4


def test_a_replica_whose_clock_is_ahead_expires_no_waiting_task(
    processes: list[Twistd],
    private_cluster: PrivateCluster,  # noqa: F811 - the fixture
) -> None:
    """
    Deadlines are compared in the database's time too: a task waiting on the
    first replica (no agent of its type) is not timed out by the replica 30 s
    ahead, though in that replica's own time its deadline passed long ago.
    """
    first, ahead = replicas(processes, private_cluster)
    port, ahead_port = first.port(), ahead.port()
    ahead.wait_for_message("this host's clock is off the database's")
    waiting = call(port, "POST", "/tasks", {**TASK, "timeout_seconds": 20})[1]
    soon = call(port, "POST", "/tasks", {**TASK, "timeout_seconds": 1})[1]
    # The short one expires in everybody's time: the expiry passes are running.
    until(
        lambda: (
            call(port, "GET", f"/tasks/{soon['task_id']}")[1]["status"] == "timeout"
        ),
        "timed out",
    )
    # Several more passes of the skewed replica (4 a second), then the long one
    # still waits: in that replica's time its deadline passed 10 s ago.
    time.sleep(2.0)
    task = call(ahead_port, "GET", f"/tasks/{waiting['task_id']}")[1]
    assert task["status"] in ("pending", "queued"), task
