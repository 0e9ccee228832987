"""
A real replica on a PostgreSQL cluster of the test's own, frozen (SIGSTOP: a
stalled disk or a partition), stopped and started again.  Every request is
answered (503 and Retry-After while the database is lost), C{/readyz} says so,
the replica comes back when the database does, and SIGTERM ends it whatever
the database does.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from ..client import call_port
from ..pgcluster import PrivateCluster, private_cluster  # noqa: F401 - a fixture
from .twistd import Twistd

pytestmark = pytest.mark.slow

LOCAL = "tcp:0:interface=127.0.0.1"
AGENT = {
    "name": "cost-agent",
    "type": "cost",
    "host": "10.1.1.1",
    "port": 8001,
    "capabilities": ["analyze_cost"],
}
#: Short, so the test is quick; the figures in the README use the defaults.
STORE_TIMEOUT = 1.0
DRAIN_TIMEOUT = 1.0
#: How long a client waits for any answer: far past every bound promised.
PATIENCE = 60.0


def call(
    port: int, method: str, path: str, body: Any = None
) -> tuple[int, Any, dict[str, str]]:
    return call_port(port, method, path, body, timeout=PATIENCE)


def start(processes: list[Twistd], cluster: PrivateCluster) -> tuple[Twistd, int]:
    process = Twistd(
        "--port",
        LOCAL,
        env={
            "DATABASE_URL": cluster.url,
            "STORE_TIMEOUT": str(STORE_TIMEOUT),
            "DRAIN_TIMEOUT": str(DRAIN_TIMEOUT),
        },
    )
    processes.append(process)
    return process, process.port()


def at_once(port: int, count: int) -> list[tuple[int, dict[str, str]]]:
    with ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(lambda _: call(port, "GET", "/agents"), range(count)))
    return [(code, headers) for code, _, headers in answers]


def until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"never {what}")


def ready(port: int) -> int:
    return call(port, "GET", "/readyz")[0]


def test_a_frozen_database_is_503_then_sigterm_still_ends_the_replica(
    processes: list[Twistd],
    private_cluster: PrivateCluster,  # noqa: F811 - the fixture
) -> None:
    process, port = start(processes, private_cluster)
    assert call(port, "POST", "/agents/register", AGENT)[0] == 201
    private_cluster.freeze()
    answers = at_once(port, 5)
    assert [code for code, _ in answers] == [503] * 5
    assert all(headers.get("retry-after") for _, headers in answers)
    until(lambda: ready(port) == 503, "not ready")
    process.signal()
    assert process.wait(PATIENCE) in (0, -15, 143)
    assert process.wait_for_message("database down")


def test_a_stopped_database_is_503_at_once_and_used_again_when_back(
    processes: list[Twistd],
    private_cluster: PrivateCluster,  # noqa: F811 - the fixture
) -> None:
    _, port = start(processes, private_cluster)
    assert call(port, "POST", "/agents/register", AGENT)[0] == 201
    private_cluster.stop()
    until(lambda: ready(port) == 503, "not ready")
    assert [code for code, _ in at_once(port, 16)] == [503] * 16
    private_cluster.start()
    until(lambda: ready(port) == 200, "ready again")
    code, listing, _ = call(port, "GET", "/agents")
    assert code == 200
    assert [agent["name"] for agent in listing["agents"]] == ["cost-agent"]
