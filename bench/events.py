"""
The change feed under load: 1,000 connected clients of ``GET /events``, the
memory each costs, and the delay from a change to its delivery at 200 changes
a second, with ``GET /health`` measured beside it in the same run.

    python bench/events.py                 # 1,000 clients, 200 changes/s for 10 s
    python bench/events.py --quick         # 200 clients, 3 s
    python bench/events.py --clients 1000 --rate 200 --duration 10 --json out.json

The service (``twistd -n --pidfile= optiinfra``, SQLite store, access control
off) runs alone on CPU 0; this script, the clients and the change generator, on
CPU 1.  Steps:

  1. ``GET /health`` latency with no feed client (baseline): 100 requests/s.
  2. N feed clients connect (all topics, no filter: every event goes to every
     client); VmRSS before and after, divided by N, is the memory per client.
  3. For ``--duration`` seconds a generator registers a new agent every
     1/rate s (each change is one ``agents`` event); ``--probes`` of the
     clients parse the stream and time each event against the moment its
     change was sent (one clock: this process's); the others only read.
     ``GET /health`` is measured again meanwhile.  The service's CPU use over
     the run is read from /proc.

Target: change -> delivery p99 < 100 ms.  Exit status 0 after a completed
run (1 on FAIL only with --strict); 2 when the benchmark could not run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import re
import selectors
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from _shared import (
    INTERFACE,
    BenchError,
    add_run_options,
    base_environment,
    check,
    choose_cpus,
    finish,
    guarded,
    machine_info,
    percentile,
    say,
    service_server,
)
from registry import memory

TARGET_P99_MS = 100.0
_NAME = re.compile(rb'"name":"bench-(\d+)"')


def connect(port: int) -> socket.socket:
    client = socket.create_connection((INTERFACE, port), timeout=30)
    client.sendall(b"GET /events HTTP/1.1\r\nHost: bench\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += client.recv(4096)
    if not head.startswith(b"HTTP/1.1 200"):
        raise BenchError(f"the feed answered {head[:60]!r}")
    client.setblocking(False)
    return client


def sink(port: int, count: int, ready: Any, stop: Any, totals: Any) -> None:
    """
    The clients that are not timed, in a process of their own at a lower
    priority: they read what arrives every 50 ms, in bulk, so that the timed
    clients and the generator are not kept waiting for the CPU they share.
    """
    os.nice(10)
    clients = [connect(port) for _ in range(count)]
    ready.set()
    read = closed = 0
    open_ = set(clients)
    while not stop.is_set():
        time.sleep(0.05)
        for client in list(open_):
            while True:
                try:
                    data = client.recv(1 << 20)
                except BlockingIOError:
                    break
                if not data:
                    closed += 1
                    open_.discard(client)
                    break
                read += len(data)
    totals.put((read, closed))
    for client in clients:
        client.close()


class Clients:
    """The timed clients on one selector, parsing; the others in a sink process."""

    def __init__(self, port: int, count: int, probes: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.sockets: list[socket.socket] = []
        self.received: dict[int, list[float]] = {}
        self.bytes = 0
        self.closed = 0
        context = multiprocessing.get_context("fork")
        self._ready, self._halt = context.Event(), context.Event()
        self._totals: Any = context.Queue()
        self._sink = context.Process(
            target=sink,
            args=(port, count - probes, self._ready, self._halt, self._totals),
        )
        self._sink.start()
        if not self._ready.wait(120):
            raise BenchError("the sink clients did not connect")
        for _ in range(probes):
            client = connect(port)
            self.selector.register(client, selectors.EVENT_READ, [b""])
            self.sockets.append(client)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for key, _ in self.selector.select(timeout=0.1):
                now = time.monotonic()
                tail = key.data
                try:
                    data = key.fileobj.recv(262144)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                if not data:
                    self.closed += 1
                    self.selector.unregister(key.fileobj)
                    continue
                self.bytes += len(data)
                text = tail[0] + data
                end = 0
                for found in _NAME.finditer(text):
                    self.received.setdefault(int(found.group(1)), []).append(now)
                    end = found.end()
                tail[0] = text[end:][-64:]  # a name cut between two reads

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(5)
        self._halt.set()
        read, closed = self._totals.get(timeout=30)
        self.bytes += read
        self.closed += closed
        self._sink.join(10)
        for client in self.sockets:
            client.close()


def health_latencies(port: int, seconds: float, rate: float = 100.0) -> list[float]:
    """Milliseconds per GET /health, at C{rate} a second, on one connection."""
    connection = http.client.HTTPConnection(INTERFACE, port, timeout=10)
    found = []
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < seconds:
        began = time.monotonic()
        connection.request("GET", "/health")
        response = connection.getresponse()
        response.read()
        found.append((time.monotonic() - began) * 1000)
        n += 1
        pause = start + n / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    connection.close()
    return found


def generate(port: int, rate: float, seconds: float, sent: dict[int, float]) -> None:
    """
    Register a new agent every 1/C{rate} s, on C{_SENDERS} connections so that
    a slow answer does not hold back the next change (an open loop); when each
    was sent, by number.
    """
    start = time.monotonic()
    senders = [
        threading.Thread(target=_send, args=(port, rate, seconds, sent, start, k))
        for k in range(_SENDERS)
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()


#: Milliseconds each change took to be answered.
ANSWERED: list[float] = []

#: Connections the changes are sent on, each taking every _SENDERS-th change.
_SENDERS = 8


def _send(
    port: int,
    rate: float,
    seconds: float,
    sent: dict[int, float],
    start: float,
    k: int,
) -> None:
    connection = http.client.HTTPConnection(INTERFACE, port, timeout=10)
    n = k
    while n / rate < seconds:
        pause = start + n / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        body = orjson.dumps(
            {
                "name": f"bench-{n}",
                "type": "cost",
                "host": "10.0.0.1",
                "port": 1 + n % 60000,
                "capabilities": ["analyze_cost"],
            }
        )
        sent[n] = time.monotonic()
        connection.request(
            "POST", "/agents/register", body, {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        response.read()
        ANSWERED.append((time.monotonic() - sent[n]) * 1000)
        if response.status != 201:
            raise BenchError(f"registration answered {response.status}")
        n += _SENDERS
    connection.close()


def summary(values: list[float]) -> dict[str, float]:
    return {
        "count": len(values),
        "p50_ms": round(percentile(values, 0.50), 2),
        "p99_ms": round(percentile(values, 0.99), 2),
        "max_ms": round(max(values), 2) if values else float("nan"),
    }


def run(args: argparse.Namespace) -> int:
    pinning = choose_cpus(args.no_pin)
    if pinning.load_cpu is not None:
        os.sched_setaffinity(0, {pinning.load_cpu})
    workdir = Path(tempfile.mkdtemp(prefix="optiinfra-bench-events-"))
    env = base_environment()
    env.update({"STATE_DIR": str(workdir / "state"), "AUTH_DISABLED": "1"})
    env["LOG_LEVEL"] = "warn"
    with open(workdir / "service.log", "wb") as log:
        server = service_server("service", pinning.server, env, workdir, log)
        server.start()
        clients: Clients | None = None
        try:
            server.wait_ready()
            assert server.process is not None
            say("GET /health with no feed client ...")
            idle_health = health_latencies(server.port, 3.0)
            before = memory(server)["VmRSS"]
            say(f"connecting {args.clients} feed clients ...")
            clients = Clients(server.port, args.clients, args.probes)
            time.sleep(1.0)  # let the service settle after the connections
            after = memory(server)["VmRSS"]
            clients.start()
            sent: dict[int, float] = {}
            say(f"{args.rate} changes/s for {args.duration} s ...")
            cpu_before, wall_before = server.cpu_seconds(), time.monotonic()
            generator = threading.Thread(
                target=generate, args=(server.port, args.rate, args.duration, sent)
            )
            generator.start()
            busy_health = health_latencies(server.port, args.duration)
            generator.join()
            time.sleep(1.0)  # the last deliveries
            cpu = (server.cpu_seconds() - cpu_before) / (time.monotonic() - wall_before)
            clients.stop()
            delays = [
                (at - sent[n]) * 1000
                for n, times in clients.received.items()
                if n in sent
                for at in times
            ]
            expected = len(sent) * args.probes
            figures: dict[str, Any] = {
                "clients": args.clients,
                "probes": args.probes,
                "rate": args.rate,
                "duration_s": args.duration,
                "changes": len(sent),
                "deliveries_timed": len(delays),
                "deliveries_expected": expected,
                "clients_closed": clients.closed,
                "bytes_read": clients.bytes,
                "memory_per_client_bytes": round((after - before) / args.clients),
                "vmrss_before": before,
                "vmrss_after": after,
                "service_cpu_share": round(cpu, 3),
                "delivery": summary(delays),
                "change_answered": summary(ANSWERED),
                "health_idle": summary(idle_health),
                "health_with_feed": summary(busy_health),
            }
        finally:
            if clients is not None:
                clients.stop()
            server.stop()
    print(json.dumps(figures, indent=2))
    print()
    print(
        f"{args.clients} clients: {figures['memory_per_client_bytes'] / 1024:.1f} KiB"
        f" each (VmRSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB)"
    )
    delivery = figures["delivery"]
    print(
        f"change -> delivery at {args.rate}/s: p50 {delivery['p50_ms']} ms,"
        f" p99 {delivery['p99_ms']} ms, max {delivery['max_ms']} ms"
        f" ({len(delays)} of {expected} deliveries timed; service CPU {cpu:.0%})"
    )
    print(
        f"the changes themselves (POST /agents/register) answered in: p50"
        f" {figures['change_answered']['p50_ms']} ms,"
        f" p99 {figures['change_answered']['p99_ms']} ms"
    )
    print(
        f"GET /health p99: {figures['health_idle']['p99_ms']} ms alone,"
        f" {figures['health_with_feed']['p99_ms']} ms beside the feed"
    )
    missing = expected - len(delays)
    checks = [
        check(
            f"change -> delivery p99 < {TARGET_P99_MS:g} ms",
            f"{delivery['p99_ms']} ms",
            delivery["p99_ms"] < TARGET_P99_MS,
        ),
        check(
            "every change delivered to every probe, no client closed",
            f"{missing} deliveries missing, {clients.closed} closed",
            missing <= 0 and not clients.closed,
        ),
    ]
    config = {k: v for k, v in vars(args).items() if k != "json"}
    return finish(args, checks, figures, machine_info(pinning), config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="200 clients, 3 s")
    add_run_options(parser, strict="the delivery p99 target is missed")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.duration = min(args.clients, 200), 3.0
    return guarded(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
