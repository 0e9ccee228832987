"""
Tasks end to end: throughput and the orchestrator's added latency, with a fast
local agent, beside GET /health from the same run.

    python bench/tasks.py                  # 3 rounds x 5 s of submissions, ~75 s
    python bench/tasks.py --quick          # 1 round x 3 s, ~30 s
    python bench/tasks.py --json out.json --strict

What runs, each phase, the figures and the exit statuses: bench/README.md.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import attrs
import orjson
from _shared import (
    BENCH,
    INTERFACE,
    BenchError,
    CpuWindow,
    Pinning,
    Server,
    add_numbers,
    add_run_options,
    add_timing_options,
    agent_call,
    base_environment,
    choose_cpus,
    ensure_wrk,
    finish,
    guarded,
    http_request,
    machine_info,
    median,
    metric_samples,
    noise_note,
    noise_warning,
    percentile,
    print_machine,
    rotated,
    run_wrk,
    say,
    script_server,
    service_server,
    table,
    with_service_env,
)
from _shared import (
    check as one_check,
)

TASKS_SCRIPT = BENCH / "tasks.lua"
TASK_BODY = '{"task_type":"analyze_cost","agent_type":"cost"}'
#: On top of the clean environment.  The access log and the task lines are on
#: (LOG_LEVEL=info), as in production; the per-agent cap is raised so that one
#: agent's 8 slots are not what limits the rate.
SERVICE_SETTINGS = {"LOG_LEVEL": "info", "AGENT_CONCURRENCY": "64"}
HEALTH_TARGETS = ("service", "klein")
#: The bare Klein + treq relay (bench/baseline_relay.py): context, not a target.
RELAY = "relay"
#: Below this share of its core, the relay was held back by something else (the
#: load CPU): its rate understates the floor, and the report says so.
RELAY_SATURATED = 0.9
LABELS = {
    "tasks": "tasks, service",
    "service": "GET /health, service",
    "klein": "GET /health, bare Klein",
    RELAY: "tasks, bare Klein + treq relay",
}
FINISHED = ("completed", "failed", "timeout", "cancelled")
#: Keep-alive connections of the paced client, in both latency phases.
PACE_CONNECTIONS = 8
#: The service's log times are truncated to the millisecond: a time logged as
#: T happened in [T, T + 1 ms); the middle is the best estimate.
LOG_RESOLUTION_S = 0.001


# Options ------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Tasks end to end with a fast local agent: completed/s on one "
        "core, the orchestrator's added latency at a steady rate, and GET /health "
        "of the same service and of bare Klein in the same run.",
        epilog="Environment defaults: BENCH_DURATION, BENCH_ROUNDS, BENCH_WARMUP "
        "(flags win).  Exit status is 0 after a completed run even on FAIL unless "
        "--strict is given; 2 if the benchmark could not run.",
    )
    add_timing_options(
        parser,
        run="seconds of submissions per throughput round",
        rounds="interleaved rounds; medians are reported",
        warmup="seconds of unmeasured submissions first (0: none)",
    )
    add_numbers(
        parser,
        {
            "--connections": (
                50,
                "wrk connections submitting tasks and loading /health",
            ),
            "--health-duration": (3, "seconds per GET /health run"),
            "--rate": (100.0, "tasks/s of the latency phase"),
            "--latency-seconds": (10.0, "seconds of the latency phase"),
            "--agent-concurrency": (
                int(SERVICE_SETTINGS["AGENT_CONCURRENCY"]),
                "the service's AGENT_CONCURRENCY (calls in flight to the agent)",
            ),
            "--target-rate": (1000.0, "target tasks completed/s end to end"),
            "--latency-limit": (5.0, "target p99 of the added latency, ms"),
        },
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 1 round, 3 s of submissions, 1 s warm-up, 2 s of "
        "/health, 5 s of paced tasks",
    )
    parser.add_argument(
        "--service-log",
        metavar="FILE",
        help="keep the service's JSON log here (by default it goes to a file in "
        "the temporary directory, removed at the end; it cannot be /dev/null: "
        "the completion times are read from it)",
    )
    parser.add_argument(
        "--service-env",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="set a variable for the service (repeatable); it otherwise runs "
        "with a clean environment, LOG_LEVEL=info, AGENT_CONCURRENCY=64 and a "
        "throw-away STATE_DIR",
    )
    add_run_options(parser, strict="a target is missed")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 3, 1
        args.health_duration, args.latency_seconds = 2, 5.0
    if args.duration < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--duration and --rounds must be >= 1, --warmup >= 0")
    if args.rate <= 0 or args.latency_seconds <= 0 or args.health_duration < 1:
        parser.error("--rate, --latency-seconds, --health-duration must be > 0")
    if args.service_log is not None and os.path.realpath(args.service_log) == (
        os.path.realpath(os.devnull)
    ):
        parser.error("--service-log cannot be /dev/null: the benchmark reads it")
    return args


# Servers ------------------------------------------------------------------


def service_settings(args: argparse.Namespace) -> dict[str, str]:
    settings = dict(SERVICE_SETTINGS)
    settings["AGENT_CONCURRENCY"] = str(args.agent_concurrency)
    return with_service_env(settings, args.service_env)


def build_servers(
    args: argparse.Namespace,
    pinning: Pinning,
    workdir: Path,
    service_log: IO[bytes],
    devnull: IO[bytes],
) -> dict[str, Server]:
    env = base_environment() | service_settings(args)
    env["STATE_DIR"] = str(workdir / "var")  # a throw-away SQLite store
    return {
        "service": service_server("service", pinning.server, env, workdir, service_log),
        "klein": script_server(
            "klein", pinning.server, "baseline_klein.py", workdir, devnull
        ),
    }


def agent_server(
    pinning: Pinning, workdir: Path, devnull: IO[bytes], service: Server
) -> Server:
    return script_server(
        "agent",
        pinning.load,
        "fast_agent.py",
        workdir,
        devnull,
        "--orchestrator",
        str(service.port),
    )


def relay_server(
    pinning: Pinning, workdir: Path, devnull: IO[bytes], agent: Server
) -> Server:
    """The bare Klein + treq relay, on the server CPU, calling C{agent}."""
    return script_server(
        RELAY,
        pinning.server,
        "baseline_relay.py",
        workdir,
        devnull,
        "--agent-port",
        str(agent.port),
    )


def check_relay(relay: Server) -> None:
    """One task through the relay: it must reach the agent and answer 201."""
    try:
        status, body = http_request(
            relay.port, "POST", "/tasks", TASK_BODY.encode(), timeout=10
        )
    except OSError as error:
        raise BenchError(
            f"the relay could not be asked to relay a task: {error!r}\n"
            f"{relay.diagnostics()}"
        ) from None
    try:
        answer = orjson.loads(body) if status == 201 else None
    except orjson.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict) or "task_id" not in answer:
        raise BenchError(
            f"the relay could not relay a task to the agent: it answered {status} "
            f"{body[:200]!r}\n{relay.diagnostics()}"
        )


# The service's own records --------------------------------------------------


def task_counts(service: Server) -> dict[str, float]:
    """
    The service's own counts: tasks submitted, finished by status, and
    POST /tasks whose client hung up before the answer (status 499).
    """
    counts: Counter[str] = Counter()
    for _, value in metric_samples(
        service.port, "optiinfra_tasks_submitted_total", timeout=10
    ):
        counts["submitted"] += value
    for labels, value in metric_samples(
        service.port, "optiinfra_tasks_finished_total", timeout=10
    ):
        counts[labels.get("status", "?")] += value
    for labels, value in metric_samples(
        service.port, "optiinfra_http_requests_total", timeout=10
    ):
        if labels.get("route") == "/tasks" and labels.get("method") == "POST":
            counts["abandoned" if labels.get("status") == "499" else "answered"] += (
                value
            )
    return dict(counts)


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    keys = ("submitted", *FINISHED, "abandoned", "answered")
    delta = {key: round(after.get(key, 0.0) - before.get(key, 0.0)) for key in keys}
    #: Every task the service created, whether it counted it as submitted
    #: or not (see "uncounted" in bench/README.md): all are finished by now.
    delta["finished"] = sum(delta[status] for status in FINISHED)
    return delta


def _log_time(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


class ServiceLog:
    """The service's JSON log, read on from where the last read stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def skip(self) -> None:
        """Forget what is there: the next read starts at the end."""
        self.offset = self.path.stat().st_size

    def finished(self) -> dict[str, tuple[float, str]]:
        """
        Since the last read, from the "task finished" lines (written once the
        store has committed the change): task id -> (when, status).
        """
        finished: dict[str, tuple[float, str]] = {}
        with open(self.path, "rb") as log:
            log.seek(self.offset)
            data = log.read()
        # Only whole lines; a partial last one is read next time.
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].splitlines():
            if b'"task finished"' in line:
                record = orjson.loads(line)
                finished[record["task_id"]] = (
                    _log_time(record["timestamp"]) + LOG_RESOLUTION_S / 2,
                    record["status"],
                )
        return finished


UNFINISHED = ("pending", "queued", "retrying", "sent", "running")


def unfinished(service: Server) -> int:
    """
    Whether any task is not finished, per the service's store (C{GET /tasks}
    by status, in the order a task goes through them, so that one moving on
    between two queries is still seen); 0 when none is.
    """
    found = 0
    for status in UNFINISHED:
        code, body = http_request(
            service.port, "GET", f"/tasks?status={status}&limit=1", timeout=10
        )
        if code != 200:
            raise BenchError(f"GET /tasks?status={status} answered {code}: {body!r}")
        found += int(orjson.loads(body)["count"])
    return found


def wait_finished(
    service: Server, agent: Server, before: dict[str, float], timeout: float
) -> dict[str, Any]:
    """
    Wait until no task is left unfinished, then the service's counts since
    C{before}.  The agent is asked first (it is on the load CPU); the service
    only once the agent has answered as many tasks as were counted submitted,
    or every second (tasks that fail never reach the agent), so as not to load
    it while it works.
    """
    time.sleep(0.2)  # requests a client left in flight reach the store
    deadline = time.monotonic() + timeout
    submitted = _delta(task_counts(service), before)["submitted"]
    last_check = 0.0
    while True:
        _, stats = agent_call(agent, "GET", "/bench/stats")
        now = time.monotonic()
        if stats["unique"] >= submitted or now - last_check >= 1.0:
            last_check = now
            if not unfinished(service):
                return _delta(task_counts(service), before) | {"quiet": True}
        if now > deadline:
            return _delta(task_counts(service), before) | {"quiet": False}
        time.sleep(0.1)


# Throughput ------------------------------------------------------------------


def begin_phase(
    pinning: Pinning, service: Server, agent: Server, log: ServiceLog
) -> tuple[dict[str, float], CpuWindow]:
    """
    Before a phase of tasks through the service: the agent's records reset,
    the service's counts so far, its log read to the end, the CPU window open.
    """
    agent_call(agent, "POST", "/bench/reset")
    before = task_counts(service)
    log.skip()
    window = CpuWindow(pinning, [service], [agent])
    window.start()
    return before, window


def throughput_run(
    args: argparse.Namespace,
    wrk: str,
    pinning: Pinning,
    service: Server,
    agent: Server,
    log: ServiceLog,
    seconds: int,
) -> dict[str, Any]:
    """Submit for C{seconds} at full speed, then wait until all are finished."""
    before, window = begin_phase(pinning, service, agent, log)
    first = time.time()  # before wrk starts: the window can only be longer
    wrk_figures = run_wrk(
        wrk,
        pinning,
        service,
        args.connections,
        seconds,
        path="/tasks",
        script=TASKS_SCRIPT,
        load_processes=[agent],
    )
    counts = wait_finished(service, agent, before, timeout=60 + seconds)
    usage = window.stop()
    finished = log.finished()
    _, stats = agent_call(agent, "GET", "/bench/stats")
    tasks = counts["finished"]
    last = max((at for at, _ in finished.values()), default=float("nan"))
    by_status = Counter(status for _, status in finished.values())
    span = last - first
    return {
        "seconds": seconds,
        "tasks": tasks,
        "submitted_per_s": wrk_figures["rps"],
        "submit_p50_ms": wrk_figures["p50_ms"],
        "submit_p99_ms": wrk_figures["p99_ms"],
        "submit_errors": wrk_figures["errors"],
        "answered_201": wrk_figures["requests"],
        "span_s": span,
        "completed_per_s": tasks / span if span > 0 else float("nan"),
        "drain_s": last - first - seconds,
        "counted": counts,
        "uncounted": tasks - counts["submitted"],
        "logged": dict(by_status),
        "agent_answered": stats["answered"],
        "agent_duplicates": stats["duplicates"],
        "all_completed": (
            counts["quiet"]
            and counts["completed"] == tasks
            and by_status.get("completed", 0) == tasks
            and stats["unique"] == tasks
            and not stats["duplicates"]
        ),
        "server_cpu": usage["server_cpu"],
        "cpu_us_per_task": usage["server_cpu_s"] / tasks * 1e6
        if tasks
        else float("nan"),
        "load_cpu": usage["load_cpu_s"] / usage["wall_s"],
        "other_on_server_cpu": usage["other_on_server_cpu"],
        "other_on_load_cpu": usage["other_on_load_cpu"],
        "noisy": usage["noisy"] or wrk_figures["noisy"],
    }


# The relay ---------------------------------------------------------------------


def settle_agent(agent: Server, timeout: float = 5.0) -> dict[str, Any]:
    """
    The agent's counters once they stop moving (unchanged over 0.1 s): calls
    the relay had in flight when wrk stopped have landed by then, and none can
    land after the next run has reset the counters.
    """
    _, stats = agent_call(agent, "GET", "/bench/stats")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        _, now = agent_call(agent, "GET", "/bench/stats")
        if now["answered"] == stats["answered"]:
            return dict(now)
        stats = now
    raise BenchError(
        f"the agent was still answering {timeout:g} s after a relay run ended"
    )


def relay_run(
    args: argparse.Namespace,
    wrk: str,
    pinning: Pinning,
    relay: Server,
    agent: Server,
    seconds: int,
) -> dict[str, Any]:
    """
    wrk POST /tasks (tasks.lua) against the relay for C{seconds}.  It answers
    201 only after the agent did, so wrk's rate is tasks completed per second.
    The agent's counters are reset first and read once they are still: the
    calls it answered are the 201s plus those in flight when wrk stopped.
    """
    agent_call(agent, "POST", "/bench/reset")
    figures = run_wrk(
        wrk,
        pinning,
        relay,
        args.connections,
        seconds,
        path="/tasks",
        script=TASKS_SCRIPT,
        load_processes=[agent],
    )
    stats = settle_agent(agent)
    figures["agent_answered"] = stats["answered"]
    figures["agent_duplicates"] = stats["duplicates"]
    return figures


# Latency ---------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": percentile(ordered, 0.50),
        "p90": percentile(ordered, 0.90),
        "p99": percentile(ordered, 0.99),
        "max": ordered[-1] if ordered else float("nan"),
        "mean": statistics.fmean(ordered) if ordered else float("nan"),
    }


def fetch_histories(service: Server, task_ids: Sequence[str]) -> dict[str, Any]:
    """GET /tasks/{id} for each, on one kept-alive connection."""
    documents: dict[str, Any] = {}
    connection = http.client.HTTPConnection(INTERFACE, service.port, timeout=10)
    try:
        for task_id in task_ids:
            status, body = http_request(
                service.port, "GET", f"/tasks/{task_id}", connection=connection
            )
            if status == 200:
                documents[task_id] = orjson.loads(body)
    finally:
        connection.close()
    return documents


def paced_run(args: argparse.Namespace, agent: Server, target: Server) -> Any:
    """
    The agent's paced client submits C{TASK_BODY} to C{target} at
    C{--rate} for C{--latency-seconds}: its report once every task was
    answered, with per row [scheduled, sent, 201 received, status code, task
    id, agent received, agent answered].
    """
    status, answer = agent_call(
        agent,
        "POST",
        "/bench/pace",
        {
            "rate": args.rate,
            "seconds": args.latency_seconds,
            "body": TASK_BODY,
            "connections": PACE_CONNECTIONS,
            "port": target.port,
        },
    )
    if status != 202:
        raise BenchError(f"the agent would not start the paced run: {answer}")
    deadline = time.monotonic() + args.latency_seconds + 60
    while True:
        time.sleep(0.25)
        status, report = agent_call(agent, "GET", "/bench/pace")
        if status == 200:
            return report
        if time.monotonic() > deadline:
            raise BenchError(
                f"the paced run against {target.name} did not end: {report}\n"
                f"{agent.diagnostics()}"
            )


def _achieved_rate(rows: Sequence[Sequence[Any]]) -> float:
    if len(rows) > 1 and rows[-1][1] and rows[0][1]:
        return (len(rows) - 1) / (rows[-1][1] - rows[0][1])
    return float("nan")


@attrs.define
class PerTask:
    """A paced run's tasks, figure by figure (ms), and why any was left out."""

    added: list[float] = attrs.Factory(list)
    to_agent: list[float] = attrs.Factory(list)
    back: list[float] = attrs.Factory(list)
    accepted: list[float] = attrs.Factory(list)
    agent_own: list[float] = attrs.Factory(list)
    late: list[float] = attrs.Factory(list)
    #: Added ms, seconds into the phase, task id.
    slow: list[tuple[float, float, str]] = attrs.Factory(list)
    problems: Counter[str] = attrs.Factory(Counter)


def per_task(
    rows: Sequence[Sequence[Any]],
    completed: Callable[[str, float], float | str],
) -> PerTask:
    """
    Each accepted task's figures from the paced client's rows and the agent's
    records: C{completed(task id, 201 received)} says when the task completed
    (a problem when it did not), which is all the two targets differ in.
    """
    tasks = PerTask()
    for scheduled, sent, answered_201, code, task_id, received, answered in rows:
        if code != 201 or task_id is None:
            tasks.problems[f"POST /tasks answered {code}"] += 1
            continue
        tasks.accepted.append((answered_201 - sent) * 1000)
        tasks.late.append((sent - scheduled) * 1000)
        if received is None:
            tasks.problems["never reached the agent"] += 1
            continue
        done = completed(task_id, answered_201)
        if isinstance(done, str):
            tasks.problems[done] += 1
            continue
        own = answered - received
        tasks.agent_own.append(own * 1000)
        tasks.added.append((done - sent - own) * 1000)
        tasks.slow.append((tasks.added[-1], sent - rows[0][1], task_id))
        tasks.to_agent.append((received - sent) * 1000)
        tasks.back.append((done - answered) * 1000)
    return tasks


def paced_figures(
    args: argparse.Namespace,
    report: dict[str, Any],
    tasks: PerTask,
    usage: dict[str, Any],
) -> dict[str, Any]:
    """What a paced phase reports, whichever target it ran against."""
    rows = report["rows"]
    return {
        "rate": args.rate,
        "seconds": args.latency_seconds,
        "tasks": len(rows),
        "achieved_rate": _achieved_rate(rows),
        "measured": len(tasks.added),
        "problems": dict(tasks.problems),
        "added_ms": spread(tasks.added),
        "to_agent_ms": spread(tasks.to_agent),
        "back_ms": spread(tasks.back),
        "accepted_ms": spread(tasks.accepted),
        "agent_own_ms": spread(tasks.agent_own),
        "client_late_ms": spread(tasks.late),
        "connections_opened": report["connections_opened"],
        "waited_for_connection": report["waited_for_connection"],
        # The slowest tasks: added ms, seconds into the phase, task id.  Stalls
        # that come back at a fixed period point at a timer in the service.
        "slowest": sorted(tasks.slow, reverse=True)[:10],
        "server_cpu": usage["server_cpu"],
        "other_on_server_cpu": usage["other_on_server_cpu"],
        "other_on_load_cpu": usage["other_on_load_cpu"],
        "noisy": usage["noisy"],
    }


def latency_phase(
    args: argparse.Namespace,
    pinning: Pinning,
    service: Server,
    agent: Server,
    log: ServiceLog,
) -> dict[str, Any]:
    before, window = begin_phase(pinning, service, agent, log)
    report = paced_run(args, agent, service)
    counts = wait_finished(service, agent, before, timeout=40)
    usage = window.stop()
    finished = log.finished()

    rows = report["rows"]

    def logged(task_id: str, _: float) -> float | str:
        done = finished.get(task_id)
        if done is None or done[1] != "completed":
            return f"not completed ({done[1] if done else 'no log line'})"
        return done[0]

    tasks = per_task(rows, logged)

    # Where the time goes, from the service's stored history (ms resolution).
    ids = [row[4] for row in rows if row[4] is not None]
    documents = fetch_histories(service, ids)
    by_id = {row[4]: row for row in rows if row[4] is not None}
    stages: dict[str, list[float]] = {
        "sent -> created_at (HTTP, parse, route)": [],
        "created_at -> 'sent' (store insert, dispatch pass)": [],
        "'sent' -> agent received (claim commit, HTTP out)": [],
        "agent received -> answered (the agent)": [],
        "answered -> completed_at (answer read)": [],
        "completed_at -> logged (store commit)": [],
    }
    shapes: Counter[str] = Counter()
    for task_id, document in documents.items():
        history = document.get("history", [])
        shapes[" > ".join(event["status"] for event in history)] += 1
        marks = {event["status"]: _log_time(event["at"]) for event in history}
        row = by_id[task_id]
        done = finished.get(task_id)
        if (
            document.get("status") != "completed"
            or row[5] is None
            or done is None
            or not {"pending", "sent", "completed"} <= set(marks)
        ):
            continue
        points = [
            row[1],
            marks["pending"],
            marks["sent"],
            row[5],
            row[6],
            marks["completed"],
            done[0],
        ]
        for stage, start, end in zip(stages, points, points[1:], strict=False):
            stages[stage].append((end - start) * 1000)
    example = next(iter(documents.values()), None)
    return {
        **paced_figures(args, report, tasks, usage),
        "counted": counts,
        "stages_ms": {stage: spread(values) for stage, values in stages.items()},
        "histories": len(documents),
        "history_shapes": dict(shapes),
        "example": example,
    }


def relay_latency_phase(
    args: argparse.Namespace, pinning: Pinning, relay: Server, agent: Server
) -> dict[str, Any]:
    """
    The paced phase again, same rate, seconds, body and connections, against
    the relay.  The relay answers 201 only after the agent answered it, so a
    task is complete when its 201 arrives: per task, added = (201 received -
    sent) - (agent answered - agent received), matched by task id with the
    agent's records, which are reset first (the service's phase must not mix
    in).
    """
    agent_call(agent, "POST", "/bench/reset")
    window = CpuWindow(pinning, [relay], [agent])
    window.start()
    report = paced_run(args, agent, relay)
    usage = window.stop()
    stats = settle_agent(agent)

    rows = report["rows"]
    tasks = per_task(rows, lambda _, answered_201: answered_201)
    return {
        "target": "bench/baseline_relay.py",
        **paced_figures(args, report, tasks, usage),
        "agent_answered": stats["answered"],
        "agent_duplicates": stats["duplicates"],
    }


def service_over_relay(
    latency: dict[str, Any], relay_latency: dict[str, Any]
) -> dict[str, float]:
    """
    The service's added-latency percentiles minus the relay's: what the
    service adds on top of the Klein + treq floor (differences of
    percentiles, not percentiles of a difference: the tasks are not paired).
    """
    service, relay = latency["added_ms"], relay_latency["added_ms"]
    return {key: service[key] - relay[key] for key in ("p50", "p90", "p99", "mean")}


# The run ----------------------------------------------------------------------


def benchmark(args: argparse.Namespace) -> int:
    wrk = ensure_wrk(allow_install=not args.no_install)
    if not TASKS_SCRIPT.is_file():
        raise BenchError(f"{TASKS_SCRIPT} is missing")
    pinning = choose_cpus(args.no_pin)
    info = machine_info(pinning, ("twisted", "klein", "treq"))
    with tempfile.TemporaryDirectory(prefix="optiinfra-bench-") as tmp:
        workdir = Path(tmp)
        log_path = Path(args.service_log or workdir / "service.log")
        with (
            open(log_path, "ab") as service_log,
            open(os.devnull, "wb") as devnull,
        ):
            servers = build_servers(args, pinning, workdir, service_log, devnull)
            agent = agent_server(pinning, workdir, devnull, servers["service"])
            relay = relay_server(pinning, workdir, devnull, agent)
            running = [*servers.values(), agent, relay]
            try:
                for server in servers.values():
                    server.start()
                for server in servers.values():
                    server.wait_ready()
                # The agent registers with the service: started once it is up.
                agent.start()
                relay.start()
                agent.wait_ready()
                relay.wait_ready()
                check_relay(relay)
                servers[RELAY] = relay
                _, health = agent_call(agent, "GET", "/health")
                info["agent_id"] = health["agent_id"]
                say(
                    f"service, bare Klein, the relay and the fast agent are up "
                    f"(agent {health['agent_id']} registered); {pinning.note}"
                )
                return measure(
                    args, wrk, pinning, servers, agent, ServiceLog(log_path), info
                )
            finally:
                for server in reversed(running):
                    server.stop()


def measure(
    args: argparse.Namespace,
    wrk: str,
    pinning: Pinning,
    servers: dict[str, Server],
    agent: Server,
    log: ServiceLog,
    info: dict[str, Any],
) -> int:
    service = servers["service"]
    estimate = (
        args.rounds * (args.duration + 2 + 3 * args.health_duration)
        + args.warmup
        + 3
        + 2 * args.latency_seconds
        + 6
    )
    say(
        f"{args.rounds} rounds of {args.duration} s of submissions + 2 x "
        f"{args.health_duration} s of GET /health + {args.health_duration} s of "
        f"tasks through the relay, then {args.latency_seconds:g} s at "
        f"{args.rate:g} tasks/s to the service and as long to the relay: "
        f"~{estimate:.0f} s"
    )
    everything_before = task_counts(service)
    if args.warmup:
        warm = throughput_run(args, wrk, pinning, service, agent, log, args.warmup)
        for name in HEALTH_TARGETS:
            run_wrk(wrk, pinning, servers[name], args.connections, 1)
        relay_run(args, wrk, pinning, servers[RELAY], agent, 1)
        say(
            f"warmed up: {warm['tasks']:,} tasks in {warm['span_s']:.1f} s, "
            "1 s of /health per target, 1 s of the relay"
        )

    kinds = ("tasks", *HEALTH_TARGETS, RELAY)
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    for number in range(args.rounds):
        for kind in rotated(kinds, number):
            prefix = f"round {number + 1}/{args.rounds}  "
            if kind == "tasks":
                figures = throughput_run(
                    args, wrk, pinning, service, agent, log, args.duration
                )
                runs[kind].append(figures)
                say(
                    prefix + f"tasks   {figures['tasks']:,} submitted at "
                    f"{figures['submitted_per_s']:,.0f}/s, completed end to end "
                    f"{figures['completed_per_s']:,.0f}/s (last "
                    f"{figures['drain_s']:+.2f} s after submissions stopped), "
                    f"{figures['cpu_us_per_task']:,.0f} us CPU/task, server CPU "
                    f"{figures['server_cpu']:.0%}, load CPU {figures['load_cpu']:.0%}"
                    + noise_note(figures)
                    + ("" if figures["all_completed"] else "  NOT ALL COMPLETED")
                )
            elif kind == RELAY:
                figures = relay_run(
                    args, wrk, pinning, servers[RELAY], agent, args.health_duration
                )
                runs[kind].append(figures)
                say(
                    prefix + f"relay   {figures['rps']:>7,.0f} tasks/s        p50 "
                    f"{figures['p50_ms']:.2f} ms  p99 {figures['p99_ms']:.2f} ms  "
                    f"{figures['cpu_us_per_request']:,.0f} us CPU/task, server CPU "
                    f"{figures['server_cpu']:.0%}"
                    + noise_note(figures)
                    + (f"  ERRORS {figures['errors']}" if figures["errors"] else "")
                )
            else:
                figures = run_wrk(
                    wrk, pinning, servers[kind], args.connections, args.health_duration
                )
                runs[kind].append(figures)
                say(
                    prefix + f"{kind:<8}{figures['rps']:>7,.0f} GET /health/s  p50 "
                    f"{figures['p50_ms']:.2f} ms  p99 {figures['p99_ms']:.2f} ms  "
                    f"server CPU {figures['server_cpu']:.0%}"
                    + noise_note(figures)
                    + (f"  ERRORS {figures['errors']}" if figures["errors"] else "")
                )

    say(f"latency: {args.rate:g} tasks/s for {args.latency_seconds:g} s ...")
    latency = latency_phase(args, pinning, service, agent, log)
    added = latency["added_ms"]
    say(
        f"latency: {latency['measured']:,} of {latency['tasks']:,} tasks measured, "
        f"added p50 {added['p50']:.2f} ms, p99 {added['p99']:.2f} ms"
        + noise_note(latency)
    )
    say(f"relay latency: {args.rate:g} tasks/s for {args.latency_seconds:g} s ...")
    relay_latency = relay_latency_phase(args, pinning, servers[RELAY], agent)
    relay_latency["service_minus_relay_ms"] = service_over_relay(latency, relay_latency)
    floor = relay_latency["added_ms"]
    say(
        f"relay latency: {relay_latency['measured']:,} of "
        f"{relay_latency['tasks']:,} tasks measured, added p50 {floor['p50']:.2f} "
        f"ms, p99 {floor['p99']:.2f} ms" + noise_note(relay_latency)
    )
    totals = _delta(task_counts(service), everything_before)
    totals["unfinished"] = unfinished(service)
    _, agent_health = agent_call(agent, "GET", "/health")
    info["loadavg_after"] = os.getloadavg()

    summary = summarise(runs, args.target_rate)
    results = checks(args, summary, runs, latency, totals)
    print_report(args, info, pinning, summary, runs, latency, relay_latency, totals)
    noisy = (
        sum(bool(run["noisy"]) for kind in runs.values() for run in kind)
        + bool(latency["noisy"])
        + bool(relay_latency["noisy"])
    )
    total_runs = sum(len(kind) for kind in runs.values()) + 2
    noise_warning(noisy, total_runs)
    config = {
        "duration_s": args.duration,
        "rounds": args.rounds,
        "warmup_s": args.warmup,
        "connections": args.connections,
        "health_duration_s": args.health_duration,
        "rate": args.rate,
        "latency_seconds": args.latency_seconds,
        "target_rate": args.target_rate,
        "latency_limit_ms": args.latency_limit,
        "service_settings": service_settings(args),
        "task_body": TASK_BODY,
        "load_generator": "wrk -t1 --latency -s bench/tasks.lua",
        "relay": "bench/baseline_relay.py: bare Klein POST /tasks, "
        "one treq call to the agent, no store/logging/metrics",
        "relay_duration_s": args.health_duration,
        "pace_connections": PACE_CONNECTIONS,
    }
    figures = {
        "runs": runs,
        "summary": summary,
        "latency": latency,
        "relay_latency": relay_latency,
        "totals": totals,
        "agent": agent_health,
        "noisy_runs": noisy,
    }
    return finish(args, results, figures, info, config)


# Summaries --------------------------------------------------------------------


def summarise(
    runs: dict[str, list[dict[str, Any]]], target_rate: float
) -> dict[str, Any]:
    tasks = runs["tasks"]
    summary: dict[str, Any] = {
        "tasks": {
            key: median(tasks, key)
            for key in (
                "tasks",
                "submitted_per_s",
                "completed_per_s",
                "submit_p50_ms",
                "submit_p99_ms",
                "cpu_us_per_task",
                "server_cpu",
                "drain_s",
            )
        }
    }
    for name in (*HEALTH_TARGETS, RELAY):
        summary[name] = {
            key: median(runs[name], key)
            for key in ("rps", "p50_ms", "p99_ms", "cpu_us_per_request", "server_cpu")
        } | {"errors": sum(run["errors"] for run in runs[name])}
    summary["completed_per_s_per_round"] = [run["completed_per_s"] for run in tasks]
    summary["tasks_over_service_health"] = (
        summary["tasks"]["completed_per_s"] / summary["service"]["rps"]
    )
    summary["tasks_over_klein_health"] = (
        summary["tasks"]["completed_per_s"] / summary["klein"]["rps"]
    )
    # The relay: the floor of a task with Klein + treq on this machine.
    relay = summary[RELAY]
    summary["tasks_over_relay"] = summary["tasks"]["completed_per_s"] / relay["rps"]
    summary["task_cpu_in_relay_tasks"] = (
        summary["tasks"]["cpu_us_per_task"] / relay["cpu_us_per_request"]
    )
    #: What the relay's CPU per task would allow with its core 100% busy: more
    #: than its rate when something else (the load CPU) held it back.
    summary["relay_rate_at_full_cpu"] = 1e6 / relay["cpu_us_per_request"]
    summary["target_rate"] = target_rate
    summary["target_above_relay"] = target_rate > relay["rps"]
    return summary


def checks(
    args: argparse.Namespace,
    summary: dict[str, Any],
    runs: dict[str, list[dict[str, Any]]],
    latency: dict[str, Any],
    totals: dict[str, int],
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []

    def check(what: str, figure: str, met: bool) -> None:
        results.append(one_check(what, figure, met))

    rate = summary["tasks"]["completed_per_s"]
    rounds = " ".join(f"{r:,.0f}" for r in summary["completed_per_s_per_round"])
    check(
        f"tasks completed end to end >= {args.target_rate:,.0f}/s on one core",
        f"{rate:,.0f}/s (median; per round: {rounds})",
        rate >= args.target_rate,
    )
    incomplete_runs = sum(not run["all_completed"] for run in runs["tasks"])
    check(
        "every task completed (none failed, timed out, lost or left over)",
        f"{totals['completed']:,} of {totals['finished']:,} finished completed; "
        f"failed {totals['failed']}, timeout {totals['timeout']}, cancelled "
        f"{totals['cancelled']}, unfinished at the end {totals['unfinished']}; "
        f"runs with a gap: {incomplete_runs}",
        totals["completed"] == totals["finished"]
        and not totals["unfinished"]
        and incomplete_runs == 0
        and not latency["problems"],
    )
    p99 = latency["added_ms"]["p99"]
    check(
        f"added latency p99 < {args.latency_limit:g} ms at {args.rate:g} tasks/s",
        f"{p99:.2f} ms (p50 {latency['added_ms']['p50']:.2f}, p90 "
        f"{latency['added_ms']['p90']:.2f}; {latency['measured']:,} tasks)",
        p99 < args.latency_limit and latency["measured"] == latency["tasks"],
    )
    health_errors = summary["service"]["errors"] + summary["klein"]["errors"]
    submit_errors = sum(run["submit_errors"] for run in runs["tasks"])
    check(
        "no errors from wrk (tasks and /health)",
        f"{submit_errors} on POST /tasks, {health_errors} on GET /health",
        submit_errors == 0 and health_errors == 0,
    )
    return results


#: The columns of a spread of milliseconds (L{_ms}), after a label of 52.
SPREAD_COLUMNS = "p50 7|p90 8|p99 8|max 8|mean 8"


def _ms(spread_ms: dict[str, float]) -> list[str]:
    return [f"{spread_ms[key]:.2f}" for key in ("p50", "p90", "p99", "max", "mean")]


def spread_rows(
    rows: Iterable[tuple[str, dict[str, float]]],
) -> list[tuple[str, ...]]:
    return [(label, *_ms(values)) for label, values in rows]


def print_phase_end(figures: dict[str, Any], whose: str) -> None:
    """A paced phase's slowest tasks, problems, and CPU (C{whose}: the target)."""
    slowest = ", ".join(
        f"{ms:.1f} ms at {at:.2f} s" for ms, at, _ in figures["slowest"][:6]
    )
    print(f"  slowest (seconds into the phase): {slowest}")
    if figures["problems"]:
        print(f"  {whose.upper()} PROBLEMS: {figures['problems']}")
    print(
        f"  {whose} CPU {figures['server_cpu']:.0%} during the phase; the client "
        f"used {figures['connections_opened']} connections; "
        f"{figures['waited_for_connection']} tasks waited for a free one"
        + noise_note(figures)
    )


def print_relay_latency(latency: dict[str, Any], relay: dict[str, Any]) -> None:
    """The relay's paced phase, in the columns of the service's rows."""
    print(
        f"  then the same client, rate, body and connections against the relay "
        f"(bare Klein + treq, no store): {relay['tasks']:,} tasks, achieved "
        f"{relay['achieved_rate']:.1f}/s, {relay['measured']:,} measured"
    )
    rows = (
        ("relay added: 201 received minus the agent's time", relay["added_ms"]),
        ("  POST /tasks sent -> agent received (exact)", relay["to_agent_ms"]),
        ("  agent answered -> 201 received (exact)", relay["back_ms"]),
        ("the agent's own time (received -> answered)", relay["agent_own_ms"]),
        ("client lateness (sent - scheduled)", relay["client_late_ms"]),
    )
    table("  the relay's phase", f"ms 52|{SPREAD_COLUMNS}", spread_rows(rows))
    print_phase_end(relay, "relay")
    floor, service = relay["added_ms"], latency["added_ms"]
    over = relay["service_minus_relay_ms"]
    print(
        f"  the Klein + treq floor of the added latency on this machine: p50 "
        f"{floor['p50']:.2f} ms, p99 {floor['p99']:.2f} ms; the service's: p50 "
        f"{service['p50']:.2f} ms ({over['p50']:+.2f} ms over the floor), p99 "
        f"{service['p99']:.2f} ms ({over['p99']:+.2f} ms)"
    )
    print(
        "  (differences of percentiles.  The relay's figure ends when its 201 "
        "reaches the client, the service's when it\n  logs the completion (its "
        "201 went out earlier): writing an answer counts in the relay's only, "
        "which\n  slightly favours the service)"
    )
    if over["p50"] < 0 or over["p99"] < 0:
        print(
            "  (below the floor at a percentile: the two phases ran at different "
            "moments of a noisy machine, and the\n  service's call to the agent "
            "costs less than the relay's plain treq call (bench/README.md): the "
            "floor is\n  that of the stack used plainly)"
        )


def print_report(
    args: argparse.Namespace,
    info: dict[str, Any],
    pinning: Pinning,
    summary: dict[str, Any],
    runs: dict[str, list[dict[str, Any]]],
    latency: dict[str, Any],
    relay_latency: dict[str, Any],
    totals: dict[str, int],
) -> None:
    settings = " ".join(f"{k}={v}" for k, v in service_settings(args).items())
    print_machine("tasks", info)
    print(
        f"service: {settings}, SQLite in a temporary STATE_DIR, log to "
        f"{args.service_log or 'a temporary file'}; one fast agent (bench/"
        "fast_agent.py, load CPU) answering at once"
    )

    t = summary["tasks"]
    rounds = [
        (number, run, "yes" if run["all_completed"] else "NO", run["noisy"])
        for number, run in enumerate(runs["tasks"], 1)
    ]
    table(
        f"Throughput: wrk -c{args.connections} POST /tasks for {args.duration} s per "
        f"round, then until all finished (median of {args.rounds} round"
        f"{'s' if args.rounds > 1 else ''})",
        "round 7|tasks 8|submitted/s 13|completed/s 13|drain 9|submit p50 12|p99 10"
        "|CPU/task 10|CPU 6|all done 10| 0",
        [
            (
                number,
                f"{run['tasks']:,.0f}",
                f"{run['submitted_per_s']:,.0f}",
                f"{run['completed_per_s']:,.0f}",
                f"{run['drain_s']:.2f} s",
                f"{run['submit_p50_ms']:.2f} ms",
                f"{run['submit_p99_ms']:.2f} ms",
                f"{run['cpu_us_per_task']:,.0f} us",
                f"{run['server_cpu']:.0%}",
                done,
                " NOISY" if noisy else "",
            )
            for number, run, done, noisy in [*rounds, ("median", t, "", False)]
        ],
    )
    print(
        "  completed/s = tasks / (last completion in the service's log - wrk's "
        "start); drain = how long after\n  the submissions stopped the last task "
        "completed"
    )

    def row(name: str) -> tuple[str, ...]:
        m = summary[name]
        return (
            LABELS[name],
            f"{m['rps']:,.0f}",
            f"{m['p50_ms']:.2f} ms",
            f"{m['p99_ms']:.2f} ms",
            f"{m['cpu_us_per_request']:,.0f} us",
            m["errors"],
        )

    end_to_end = (
        f"{t['completed_per_s']:,.0f}",
        "",
        "",
        f"{t['cpu_us_per_task']:,.0f} us",
    )
    table(
        f"Beside it, GET /health at {args.connections} connections, and POST /tasks "
        f"through the bare Klein + treq relay ({args.health_duration} s runs "
        "interleaved with the rounds above)",
        "target 32|req/s 9|p50 11|p99 11|CPU/req 11|errors 8",
        [
            *(row(name) for name in HEALTH_TARGETS),
            ("tasks, service (end to end)", *end_to_end, ""),
            row(RELAY),
        ],
    )
    cost = t["cpu_us_per_task"] / summary["service"]["cpu_us_per_request"]
    print(
        f"  one task costs {cost:.1f}"
        f" GET /health of the service in CPU; tasks/s = "
        f"{summary['tasks_over_service_health']:.2f}x its /health req/s, "
        f"{summary['tasks_over_klein_health']:.2f}x bare Klein's"
    )
    relay = summary[RELAY]
    print(
        f"  the service completes tasks at {summary['tasks_over_relay']:.2f}x the "
        f"relay's rate; one task costs {summary['task_cpu_in_relay_tasks']:.1f} "
        "relay tasks in CPU"
    )
    print(
        f"  the bare Klein + treq floor on this machine is {relay['rps']:,.0f} "
        f"tasks/s (relay's CPU {relay['server_cpu']:.0%}): the "
        f"{args.target_rate:,.0f}/s target is "
        f"{'above' if summary['target_above_relay'] else 'below'} it"
    )
    if relay["server_cpu"] < RELAY_SATURATED:
        print(
            f"  (the relay's core was not saturated: at its CPU per task, a full "
            f"core would relay ~{summary['relay_rate_at_full_cpu']:,.0f} tasks/s)"
        )

    added = latency["added_ms"]
    rows = (
        ("added: submit-to-complete minus the agent's time", added),
        ("  POST /tasks sent -> agent received (exact)", latency["to_agent_ms"]),
        ("  agent answered -> completion logged (+-0.5)", latency["back_ms"]),
        ("the agent's own time (received -> answered)", latency["agent_own_ms"]),
        ("POST /tasks sent -> 201 received", latency["accepted_ms"]),
        ("client lateness (sent - scheduled)", latency["client_late_ms"]),
    )
    table(
        f"Added latency: {latency['tasks']:,} tasks at {latency['rate']:g}/s "
        f"(achieved {latency['achieved_rate']:.1f}/s) over {latency['seconds']:g} s, "
        "sent by a paced open-loop client in the agent's process",
        f"ms 52|{SPREAD_COLUMNS}",
        spread_rows(rows),
    )
    table(
        f"  from the service's stored history ({latency['histories']:,} tasks, "
        "timestamps to the ms):",
        f"stage 52|{SPREAD_COLUMNS}",
        spread_rows(latency["stages_ms"].items()),
    )
    shapes = ", ".join(
        f"{shape} x{n:,}" for shape, n in latency["history_shapes"].items()
    )
    print(f"  histories: {shapes}")
    print_phase_end(latency, "server")
    print_relay_latency(latency, relay_latency)
    print()
    print(
        f"In all (warm-up included): {totals['finished']:,} tasks finished, "
        f"{totals['completed']:,} completed, {totals['failed']} failed, "
        f"{totals['timeout']} timed out, {totals['cancelled']} cancelled, "
        f"{totals['unfinished']} left unfinished."
    )
    uncounted = totals["finished"] - totals["submitted"]
    if uncounted:
        print(
            f"note: {uncounted:,} of them are missing from "
            f"optiinfra_tasks_submitted_total ({totals['submitted']:,}) and have "
            "no 'task submitted' log line: the POST /tasks that created them were "
            f"abandoned by wrk in flight at the end of its runs ({totals['abandoned']} "
            "answered 499). The service stored and ran those tasks, but the "
            "handler was cancelled before it counted, logged and answered them."
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return guarded(lambda: benchmark(args))


if __name__ == "__main__":
    sys.exit(main())
