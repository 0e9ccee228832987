"""
How long the worst batch of recommendations takes, and how long it holds up
everyone else.

The worst batch is the largest allowed (MAX_RECOMMENDATIONS) with every
recommendation on one resource and contradictory actions: every pair conflicts
twice.  While it is coordinated, a client probes GET /health every 10 ms; the
probes' latency before the batch is the baseline, and the longest probe while it
runs is the stall the batch caused.  No target is set by the issues: the figures
are for the operator (and for the README).

    .venv/bin/python bench/coordination.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import orjson
from _shared import (
    base_environment,
    guarded,
    http_get,
    http_request,
    say,
    service_server,
    table,
)

#: optiinfra.coordination.parse.MAX_RECOMMENDATIONS (not imported: the bench
#: runs against the source tree, whatever is installed).
MAX_RECOMMENDATIONS = 100

KINDS = ("cost", "performance", "resource", "application")


def worst_batch(size: int) -> bytes:
    recommendations = [
        {
            "id": f"r{n}",
            "agent_type": KINDS[n % 4],
            "action": ("scale_up", "scale_down")[n % 2],
            "risk_level": "low",
            "affected_resources": ["cluster-a"],
        }
        for n in range(size)
    ]
    return orjson.dumps({"customer_id": "bench", "recommendations": recommendations})


class Prober(threading.Thread):
    """GET /health every 10 ms on one connection; each latency in ms."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.latencies: list[tuple[float, float]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            started = time.perf_counter()
            http_get(self.port, "/health", timeout=30)
            self.latencies.append((started, (time.perf_counter() - started) * 1000))
            time.sleep(0.01)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=MAX_RECOMMENDATIONS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state:
        server = service_server(
            "service",
            [],
            base_environment() | {"STATE_DIR": state},
            Path(state),
            open(os.devnull, "wb"),  # noqa: SIM115 - closed with the process
        )
        server.start()
        try:
            server.wait_ready()
            return measure(server.port, args.rounds, args.size)
        finally:
            server.stop()


def measure(port: int, rounds: int, size: int) -> int:
    body = worst_batch(size)
    say(f"worst batch: {size} recommendations on one resource, contradictory actions")
    row = table(
        "The worst batch, round by round",
        "round 5|conflicts 11|answer 10|took 9|/health p50 before 20"
        "|longest /health during 24",
    )
    for round_ in range(1, rounds + 1):
        prober = Prober(port)
        prober.start()
        time.sleep(1.0)
        began = time.perf_counter()
        code, answer = http_request(
            port, "POST", "/coordination/coordinate", body, timeout=120
        )
        ended = time.perf_counter()
        time.sleep(0.3)
        prober.stopping.set()
        prober.join()
        if code != 200:
            say(f"bench: the batch got {code}: {answer[:200]!r}")
            return 2
        before = [ms for at, ms in prober.latencies if at < began]
        during = [ms for at, ms in prober.latencies if began <= at <= ended]
        conflicts = orjson.loads(answer)["conflicts_detected"]
        row(
            (
                round_,
                f"{conflicts:,}",
                f"{len(answer) / 1e6:.1f}MB",
                f"{ended - began:.2f}s",
                f"{statistics.median(before):.1f}ms",
                f"{max(during, default=0.0):.1f}ms",
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(guarded(main))
