"""
Stamina: minutes of overload, then minutes at a steady load under capacity.

    .venv/bin/python bench/soak.py            # 5 min at 3x capacity, 5 min at 80 %
    .venv/bin/python bench/soak.py --quick    # 40 s of each, to try it out

The service (twistd, embedded SQLite store, on the server CPU) and the fast
agent (bench/fast_agent.py, which also holds the load client, on the load CPU)
run as in bench/tasks.py.  The agent takes --agent-delay seconds a task and
the service sends it --agent-concurrency at once, so, as in the field, the
agents are what limits the rate (about concurrency / delay tasks a second).
--agent-delay 0 makes the orchestrator's own CPU the limit instead: a harsher
test, since every refusal then costs capacity.  Phases, in one run:

  capacity  a closed loop (the next task goes out when one reaches the agent,
            at most 32 on their way): completions per second with no queue
            and no refusals, the unloaded rate the others are compared with
  overload  tasks offered at --overload times that rate (open loop, 3 s
            timeouts): the service must refuse the excess at the door and
            keep completing
  steady    tasks offered at --steady times that rate

Every --window seconds it prints completed/s, refused/s, tasks waiting, the
oldest wait, RSS, open file descriptors, the database and WAL sizes, and
GET /health latency (probed every 0.25 s beside the load).  At the end it waits
for every accepted task to finish and checks that each did.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from _shared import (
    BenchError,
    Pinning,
    Server,
    add_run_options,
    agent_call,
    base_environment,
    check,
    choose_cpus,
    counter,
    finish,
    guarded,
    http_get,
    machine_info,
    percentile,
    say,
    script_server,
    service_server,
    table,
)

TASK_BODY = orjson.dumps(
    {"task_type": "analyze_cost", "agent_type": "cost", "timeout_seconds": 3}
).decode()
#: Keep-alive connections of the load client.
CONNECTIONS = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="40 s phases")
    parser.add_argument("--capacity-seconds", type=float, default=30.0)
    parser.add_argument("--overload-seconds", type=float, default=300.0)
    parser.add_argument("--steady-seconds", type=float, default=300.0)
    parser.add_argument("--overload", type=float, default=3.0)
    parser.add_argument("--steady", type=float, default=0.8)
    parser.add_argument("--window", type=float, default=30.0, help="seconds a row")
    parser.add_argument("--agent-delay", type=float, default=0.02)
    parser.add_argument("--agent-concurrency", type=int, default=8)
    add_run_options(parser, strict="a target is missed")
    args = parser.parse_args(argv)
    if args.quick:
        args.capacity_seconds = 15.0
        args.overload_seconds = args.steady_seconds = 40.0
        args.window = 10.0
    return args


class HealthProbe(threading.Thread):
    """GET /health every 0.25 s on a connection of its own; latencies in ms."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.samples: list[float] = []
        self.failures = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.25):
            began = time.perf_counter()
            try:
                status, _ = http_get(self.port, "/health", timeout=5.0)
            except OSError:
                status = 0
            if status == 200:
                self.samples.append((time.perf_counter() - began) * 1000)
            else:
                self.failures += 1

    def take(self) -> list[float]:
        taken, self.samples = self.samples, []
        return taken


class Watch:
    """One row per window: what the service did and what it holds."""

    COLUMNS = [
        "phase",
        "t_s",
        "completed/s",
        "refused/s",
        "timeout/s",
        "waiting",
        "oldest_s",
        "rss_mb",
        "fds",
        "db_mb",
        "wal_mb",
        "written_kb/task",
        "health_p99_ms",
    ]

    def __init__(self, service: Server, state: Path, probe: HealthProbe) -> None:
        self.service = service
        self.state = state
        self.probe = probe
        self.rows: list[dict[str, Any]] = []
        self.began = time.monotonic()
        self._last = self._counts()
        self.print_row = table(
            f"Every window: what the service did and holds ({len(self.COLUMNS)})",
            "|".join(f"{c} {max(12, len(c) + 2)}" for c in self.COLUMNS),
        )

    def _counts(self) -> dict[str, float]:
        port = self.service.port
        return {
            "at": time.monotonic(),
            "completed": counter(
                port, "optiinfra_tasks_finished_total", status="completed"
            ),
            "timeout": counter(
                port, "optiinfra_tasks_finished_total", status="timeout"
            ),
            "refused": counter(port, "optiinfra_tasks_refused_total"),
            "written": self._written(),
        }

    def _written(self) -> float:
        """Bytes the service's process has had written to disk so far."""
        assert self.service.process is not None
        try:
            io = Path(f"/proc/{self.service.process.pid}/io").read_text()
        except OSError:
            return float("nan")
        fields = dict(line.split(": ") for line in io.splitlines())
        return float(fields["write_bytes"])

    def _size_mb(self, name: str) -> float:
        try:
            return (self.state / name).stat().st_size / 1e6
        except OSError:
            return 0.0

    def row(self, phase: str) -> dict[str, Any]:
        now = self._counts()
        last, self._last = self._last, now
        seconds = now["at"] - last["at"]
        assert self.service.process is not None
        pid = self.service.process.pid
        status = Path(f"/proc/{pid}/status").read_text()
        rss = next(
            int(line.split()[1]) for line in status.splitlines() if line[:6] == "VmRSS:"
        )
        port = self.service.port
        row = {
            "phase": phase,
            "t_s": round(now["at"] - self.began),
            "completed/s": (now["completed"] - last["completed"]) / seconds,
            "refused/s": (now["refused"] - last["refused"]) / seconds,
            "timeout/s": (now["timeout"] - last["timeout"]) / seconds,
            "waiting": counter(port, "optiinfra_tasks_waiting"),
            "oldest_s": counter(port, "optiinfra_oldest_waiting_task_seconds"),
            "rss_mb": rss / 1024,
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "db_mb": self._size_mb("orchestrator.db"),
            "wal_mb": self._size_mb("orchestrator.db-wal"),
            "written_kb/task": (now["written"] - last["written"])
            / 1024
            / max(1.0, now["completed"] - last["completed"]),
            "health_p99_ms": percentile(self.probe.take(), 0.99),
        }
        self.rows.append(row)
        self.print_row([row[c] for c in self.COLUMNS])
        return row


def phase(
    name: str,
    agent: Server,
    watch: Watch,
    seconds: float,
    every: float,
    **pace: Any,
) -> dict[str, Any]:
    """Run one load phase, a row every C{every} seconds; the client's report."""
    status, answer = agent_call(
        agent,
        "POST",
        "/bench/pace",
        {
            "seconds": seconds,
            "body": TASK_BODY,
            "connections": CONNECTIONS,
            "rows": False,
            **pace,
        },
    )
    if status != 202:
        raise BenchError(f"the agent would not start the {name} phase: {answer}")
    watch.row(f"{name}:start")
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(every, left))
        watch.row(name)
    for _ in range(240):
        status, report = agent_call(agent, "GET", "/bench/pace")
        if status == 200:
            return dict(report)
        time.sleep(0.25)
    raise BenchError(f"the {name} phase's client did not finish: {report}")


def rate_of(rows: list[dict[str, Any]], name: str, column: str) -> float:
    values = [row[column] for row in rows if row["phase"] == name]
    return statistics.fmean(values) if values else float("nan")


def benchmark(args: argparse.Namespace) -> int:
    pinning: Pinning = choose_cpus(args.no_pin)
    info = machine_info(pinning, ("twisted", "klein", "treq"))
    with tempfile.TemporaryDirectory(prefix="optiinfra-soak-") as tmp:
        workdir = Path(tmp)
        state = workdir / "var"
        env = base_environment() | {
            "STATE_DIR": str(state),
            "LOG_LEVEL": "warn",
            "AGENT_CONCURRENCY": str(args.agent_concurrency),
        }
        with open(os.devnull, "wb") as devnull:
            service = service_server("service", pinning.server, env, workdir, devnull)
            agent = script_server(
                "agent",
                pinning.load,
                "fast_agent.py",
                workdir,
                devnull,
                "--orchestrator",
                str(service.port),
                "--delay",
                str(args.agent_delay),
            )
            try:
                service.start()
                service.wait_ready()
                agent.start()
                agent.wait_ready()
                say(f"service and fast agent up; {pinning.note}")
                return measure(args, service, agent, state, info)
            finally:
                agent.stop()
                service.stop()


def measure(
    args: argparse.Namespace,
    service: Server,
    agent: Server,
    state: Path,
    info: dict[str, Any],
) -> int:
    probe = HealthProbe(service.port)
    probe.start()
    watch = Watch(service, state, probe)
    reports: dict[str, dict[str, Any]] = {}
    reports["capacity"] = phase(
        "capacity", agent, watch, args.capacity_seconds, args.window, window=32
    )
    capacity = rate_of(watch.rows, "capacity", "completed/s")
    say(f"unloaded rate: {capacity:.0f} tasks/s")
    for name, factor, seconds in (
        ("overload", args.overload, args.overload_seconds),
        ("steady", args.steady, args.steady_seconds),
    ):
        if not seconds:
            continue
        reports[name] = phase(
            name, agent, watch, seconds, args.window, rate=capacity * factor
        )
    # Every accepted task must end: wait for the queue and the calls to empty.
    port = service.port
    for _ in range(120):
        submitted = counter(port, "optiinfra_tasks_submitted_total")
        finished = counter(port, "optiinfra_tasks_finished_total")
        if submitted == finished:
            break
        time.sleep(0.5)
    watch.row("drained")
    probe.stopping.set()
    accepted = sum(int(r["codes"].get("201", 0)) for r in reports.values())
    refused = sum(int(r["codes"].get("429", 0)) for r in reports.values())
    other = {
        code: n
        for r in reports.values()
        for code, n in r["codes"].items()
        if code not in ("201", "429")
    }
    loaded = [r for r in watch.rows if r["phase"] in ("overload", "steady")]
    first = loaded[0]
    figures = {
        "unloaded_per_s": capacity,
        "overload_completed_per_s": rate_of(watch.rows, "overload", "completed/s"),
        "steady_completed_per_s": rate_of(watch.rows, "steady", "completed/s"),
        "overload_refused_per_s": rate_of(watch.rows, "overload", "refused/s"),
        "accepted": accepted,
        "refused": refused,
        "other_answers": other,
        "submitted": submitted,
        "finished": finished,
        "health_p99_ms_worst": max(r["health_p99_ms"] for r in loaded),
        "health_failures": probe.failures,
        "rss_mb_first_last": (first["rss_mb"], watch.rows[-1]["rss_mb"]),
        "fds_first_last": (first["fds"], watch.rows[-1]["fds"]),
        "wal_mb_max": max(r["wal_mb"] for r in watch.rows),
        "written_kb_per_task_steady": rate_of(watch.rows, "steady", "written_kb/task"),
        "rows": watch.rows,
    }
    ratio = figures["overload_completed_per_s"] / capacity
    print()
    print(f"unloaded rate (same run)       {capacity:8.0f} tasks/s")
    print(
        f"completed under {args.overload:g}x overload   "
        f"{figures['overload_completed_per_s']:8.0f} tasks/s  ({ratio:.2f}x unloaded)"
    )
    print(
        f"completed at {args.steady:g}x capacity     "
        f"{figures['steady_completed_per_s']:8.0f} tasks/s"
    )
    print(f"accepted / refused             {accepted} / {refused}  other: {other}")
    took = reports.get("overload", {}).get("answer_ms", {})
    refusal_p99 = took.get("429", {}).get("p99", float("nan"))
    figures["overload_answer_ms"] = took
    print(f"answers under overload, ms     {took}")
    print(f"submitted / finished (service) {submitted:.0f} / {finished:.0f}")
    print(
        f"GET /health p99, worst window  {figures['health_p99_ms_worst']:8.1f} ms"
        f"  ({probe.failures} probes failed)"
    )
    print(
        "written to disk per task (steady) "
        f"{figures['written_kb_per_task_steady']:.1f} KB"
    )
    print(
        "RSS first/last loaded window   "
        f"{first['rss_mb']:.0f} / {watch.rows[-1]['rss_mb']:.0f} MB; fds "
        f"{first['fds']} / {watch.rows[-1]['fds']}; "
        f"WAL max {figures['wal_mb_max']:.1f} MB"
    )
    rss_growth = watch.rows[-1]["rss_mb"] - first["rss_mb"]
    checks = [
        check(
            "completions under overload >= 0.8x unloaded", f"{ratio:.2f}x", ratio >= 0.8
        ),
        check(
            "/health p99 < 50 ms",
            f"{figures['health_p99_ms_worst']:.1f} ms",
            figures["health_p99_ms_worst"] < 50,
        ),
        check(
            "every accepted task finished",
            f"{finished:.0f} of {submitted:.0f}",
            submitted == finished,
        ),
        check("429s answered in < 5 ms at p99", f"{refusal_p99} ms", refusal_p99 < 5),
        check(
            "201s = tasks stored",
            f"{accepted} = {submitted:.0f}",
            accepted == submitted,
        ),
        check("only 201 and 429 answered", f"others {other}", not other),
        check(
            "WAL < 64 MB",
            f"at most {figures['wal_mb_max']:.1f} MB",
            figures["wal_mb_max"] < 64,
        ),
        check(
            "RSS flat (grew < 50 MB after the first loaded window)",
            f"{rss_growth:.0f} MB",
            rss_growth < 50,
        ),
        check(
            "no wedge: tasks completed in every loaded window",
            f"{sum(r['completed/s'] > 0 for r in loaded)} of {len(loaded)} windows",
            all(r["completed/s"] > 0 for r in loaded),
        ),
    ]
    return finish(args, checks, figures, info, vars(args))


if __name__ == "__main__":
    sys.exit(guarded(lambda: benchmark(parse_args())))
