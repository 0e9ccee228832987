"""
Hostile agents on real sockets: an announced length of 2**40 with a flood
behind it, an unannounced flood, a gzip bomb.  Each task fails with a clear
error, the process's memory barely moves, and an honest agent's tasks keep
completing meanwhile.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator

import pytest
import pytest_twisted

from optiinfra.routing.dispatch import MAX_ANSWER_BYTES

from .agents import (
    BROTLI,
    COMPLETE,
    CORRUPT_GZIP,
    FLOOD_ANNOUNCED,
    FLOOD_BYTES,
    FLOOD_CHUNKED,
    GZIP_BOMB,
    GZIP_SMALL,
    STALL_BODY,
    StartAgent,
    gzip_bomb,
    settle,
)
from .conftest import StartService
from .test_routing import FAST, register, submit, wait_for

_PAGE = os.sysconf("SC_PAGE_SIZE")
#: What the issue allows the orchestrator to grow by under attack.
ALLOWED_GROWTH = 20 * 1024 * 1024


def _rss() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE


class PeakRSS:
    """The largest resident size seen by a thread sampling every millisecond."""

    def __init__(self) -> None:
        self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


@pytest.fixture
def sampler() -> Iterator[list[PeakRSS]]:
    running: list[PeakRSS] = []
    yield running
    for peak in running:
        peak.stop()


EXPECTED = {
    FLOOD_ANNOUNCED: f"the agent announced an answer of {2**40} bytes; "
    f"at most {MAX_ANSWER_BYTES} are accepted",
    FLOOD_CHUNKED: f"the agent's answer is larger than {MAX_ANSWER_BYTES} bytes",
    GZIP_BOMB: f"the agent's answer inflates to more than {MAX_ANSWER_BYTES} bytes",
}


@pytest.mark.parametrize("attack", sorted(EXPECTED))
@pytest_twisted.ensureDeferred
async def test_a_hostile_answer_fails_its_task_and_costs_no_memory(
    start_service: StartService,
    start_agent: StartAgent,
    sampler: list[PeakRSS],
    attack: str,
) -> None:
    gzip_bomb()  # made before measuring: the agent's side, not the orchestrator's
    service = await start_service(**FAST)
    hostile, honest = await start_agent(attack), await start_agent(COMPLETE)
    await register(service, hostile, capabilities=["analyze_cost"])
    await register(service, honest, capabilities=["right_size"])
    await wait_for(service, await submit(service, task_type="right_size"))
    gc.collect()
    baseline = _rss()
    peak = PeakRSS()
    sampler.append(peak)
    attacks = [await submit(service, max_retries=2) for _ in range(2)]
    honest_tasks = [await submit(service, task_type="right_size") for _ in range(20)]
    for task_id in attacks:
        task = await wait_for(service, task_id)
        assert (task["status"], task["error"]) == ("failed", EXPECTED[attack])
        assert task["retry_count"] == 0
    for task_id in honest_tasks:
        assert (await wait_for(service, task_id))["status"] == "completed"
    grown = peak.stop() - baseline
    assert grown < ALLOWED_GROWTH, f"grew by {grown / 2**20:.1f} MiB"
    assert len(hostile.received) == 2
    # The floods were cut near the cap, not read to their end.
    assert hostile.flooded < FLOOD_BYTES // 8
    health = await service.get("/health")
    assert health.code == 200


@pytest.mark.parametrize(
    ("behaviour", "status", "error"),
    [
        (GZIP_SMALL, "completed", None),
        (
            BROTLI,
            "failed",
            "the agent's answer has a content encoding that was not asked for: 'br'",
        ),
        (CORRUPT_GZIP, "failed", "the agent's compressed answer is corrupt"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_encodings_nobody_asked_for(
    start_service: StartService,
    start_agent: StartAgent,
    behaviour: str,
    status: str,
    error: str | None,
) -> None:
    service = await start_service(**FAST)
    agent = await start_agent(behaviour)
    await register(service, agent)
    task = await wait_for(service, await submit(service, max_retries=0))
    assert task["status"] == status
    if error is None:
        assert task["result"] == {"n": 1}
    else:
        assert task["error"].startswith(error), task["error"]
    assert agent.received[0].headers["accept-encoding"] == "identity"


@pytest_twisted.ensureDeferred
async def test_the_deadline_cuts_an_answer_that_stops_halfway(
    start_service: StartService, start_agent: StartAgent
) -> None:
    service = await start_service(**FAST)
    agent = await start_agent(STALL_BODY)
    await register(service, agent)
    task = await wait_for(service, await submit(service, timeout_seconds=0.5))
    assert task["status"] == "timeout"
    for _ in range(100):  # the connection is closed, not left to hang
        if agent.lost:
            break
        await settle(0.02)
    assert agent.lost == 1
