"""
The registry under load: registration, heartbeats, listing and memory with
10,000 agents, on the SQLite and the PostgreSQL store, against a bare baseline.

    python bench/registry.py                  # 3 rounds x 5 s per run, ~2.5 minutes
    python bench/registry.py --quick          # 1 round x 2 s, ~40 s
    python bench/registry.py --json out.json --strict

What runs, each phase, the figures and the exit statuses: bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import orjson
from _shared import (
    BENCH,
    INTERFACE,
    NOISE_LIMIT,
    BenchError,
    Pinning,
    Server,
    add_numbers,
    add_run_options,
    add_timing_options,
    base_environment,
    check,
    choose_cpus,
    clock_ticks,
    connection_list,
    ensure_wrk,
    env_int,
    finish,
    guarded,
    http_get,
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

STORES = ("sqlite", "postgresql")
TARGETS = (*STORES, "echo")
LABELS = {
    "sqlite": "service, SQLite",
    "postgresql": "service, PostgreSQL",
    "echo": "bare Klein echo",
}
STORE_NAMES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}


#: A server's figures in a run: req/s, p50, p99, {extra}, CPU, DB CPU, errors.
SERVER_COLUMNS = "{first} 22|req/s 9|p50 11|p99 11|{extra}|CPU 6|DB CPU 8|errors 8"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
HEARTBEAT_SCRIPT = BENCH / "heartbeat.lua"
HEARTBEAT_ROUTE = "/agents/{agent_id}/heartbeat"
HEARTBEAT_BODY = b'{"status":"healthy","metadata":{"load":0.5}}'
#: How the service counts a request whose client hung up before the answer:
#: wrk does that to whatever is in flight when a run's time is up.
ABANDONED = "status:499"
#: On top of the clean environment, for both services.  The access log is on
#: (LOG_LEVEL=info), as in production.  No agent turns unreachable or expires
#: during a run: in steady state every agent beats within its interval, whereas
#: here a cycle over all of them can take longer than the default 45 s at one
#: connection, and a sweep flipping thousands of agents is not what is measured.
SERVICE_SETTINGS = {
    "LOG_LEVEL": "info",
    "UNREACHABLE_AFTER": "3600",
    "AGENT_EXPIRY": "7200",
}
AGENT_TYPES = ("cost", "performance", "resource", "application")
CAPABILITIES = (
    ["cost-analysis", "recommendations"],
    ["latency", "throughput"],
    ["scaling", "rightsizing"],
    ["tracing", "errors"],
)
REGIONS = ("us-east-1", "eu-west-1", "ap-south-1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Registry load with many agents on SQLite and PostgreSQL: "
        "registrations/s, memory per agent, heartbeat throughput and p50/p99 "
        "against a bare Klein JSON echo (interleaved), GET /agents latency.",
        epilog="Environment defaults: BENCH_AGENTS, BENCH_DURATION, BENCH_ROUNDS, "
        "BENCH_WARMUP, BENCH_CONNECTIONS, BENCH_POSTGRES_URL (flags win).  Exit "
        "status is 0 after a completed run even on FAIL unless --strict is given; "
        "2 if the benchmark could not run.",
    )
    parser.add_argument(
        "--agents",
        type=int,
        default=env_int("BENCH_AGENTS", 10_000),
        help="agents registered per store [BENCH_AGENTS, 10000]",
    )
    add_timing_options(
        parser,
        run="seconds per measured heartbeat run",
        rounds="interleaved heartbeat rounds; medians are reported",
        warmup="seconds of unmeasured heartbeats per target first",
    )
    parser.add_argument(
        "--connections",
        type=connection_list,
        default=connection_list(os.environ.get("BENCH_CONNECTIONS", "1,50")),
        help="heartbeat concurrencies; the throughput target is judged at the "
        "highest [BENCH_CONNECTIONS, 1,50]",
    )
    add_numbers(
        parser,
        {
            "--register-connections": (
                50,
                "concurrent connections registering the agents",
            ),
            "--list-duration": (5, "seconds of GET /agents at 1 connection per store"),
            "--threshold": (
                0.9,
                "target ratio of service to echo heartbeat throughput",
            ),
            "--p99-limit": (25.0, "target heartbeat p99 in ms, at every concurrency"),
            "--list-limit": (100.0, "target GET /agents p99 in ms"),
        },
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 1 round, 2 s per run, 1 s warm-up, 2 s of GET /agents",
    )
    parser.add_argument(
        "--service-log",
        metavar="FILE",
        default=os.devnull,
        help="where the SQLite service's JSON log lines (one per request) go; the "
        "PostgreSQL one's go to FILE.postgresql; they are always written "
        "[default: /dev/null]",
    )
    parser.add_argument(
        "--service-env",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="set a variable for both services (repeatable); they otherwise run "
        "with a clean environment, LOG_LEVEL=info, UNREACHABLE_AFTER=3600, "
        "AGENT_EXPIRY=7200 and a throw-away STATE_DIR",
    )
    parser.add_argument(
        "--baseline-gc",
        choices=("stock", "tuned"),
        default="stock",
        help="stock: the echo baseline keeps CPython's GC defaults; tuned: it "
        "gets the service's gc.freeze() and thresholds too [stock]",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES),
        help="a PostgreSQL server to create the throw-away database on "
        f"[BENCH_POSTGRES_URL, {DEFAULT_POSTGRES}]",
    )
    parser.add_argument(
        "--no-postgres",
        action="store_true",
        help="measure the SQLite store only",
    )
    add_run_options(parser, strict="a target is missed")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup, args.list_duration = 1, 2, 1, 2
    if args.duration < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--duration and --rounds must be >= 1, --warmup >= 0")
    if args.agents < 1 or args.register_connections < 1 or args.list_duration < 1:
        parser.error("--agents, --register-connections, --list-duration must be >= 1")
    return args


# PostgreSQL -----------------------------------------------------------------


@dataclass
class Database:
    """A throw-away database on the PostgreSQL server at C{admin_url}."""

    admin_url: str
    name: str

    @property
    def url(self) -> str:
        return urlsplit(self.admin_url)._replace(path=f"/{self.name}").geturl()

    def drop(self) -> None:
        import psycopg
        from psycopg import sql

        try:
            with psycopg.connect(
                self.admin_url, autocommit=True, connect_timeout=10
            ) as connection:
                connection.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(self.name)
                    )
                )
        except Exception as error:  # say it, and leave the rest to run
            say(f"warning: could not drop database {self.name}: {error}")
        else:
            say(f"dropped database {self.name}")


def create_database(admin_url: str) -> Database | str:
    """A fresh database, or why there is none (PostgreSQL is then skipped)."""
    try:
        import psycopg
        from psycopg import sql
    except ImportError as error:
        return f"psycopg is not importable ({error})"
    database = Database(admin_url, f"optiinfra_bench_{secrets.token_hex(4)}")
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as c:
            c.execute(
                sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database.name))
            )
    except Exception as error:  # any failure means: skip PostgreSQL
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return (
            f"no PostgreSQL answered at {admin_url} ({type(error).__name__}: {first})"
        )
    say(f"created database {database.name}")
    return database


def postgres_cpu_seconds() -> float | None:
    """CPU time used so far by the local PostgreSQL server's processes."""
    total = 0
    found = False
    ticks = clock_ticks()
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            head, _, rest = stat.rpartition(")")
            if head.partition("(")[2] != "postgres":
                continue
            fields = rest.split()
            total += int(fields[11]) + int(fields[12])
            found = True
    return total / ticks if found else None


# Servers ------------------------------------------------------------------


def build_servers(
    args: argparse.Namespace,
    pinning: Pinning,
    workdir: Path,
    logs: Mapping[str, IO[bytes]],
    devnull: IO[bytes],
    database: Database | None,
) -> dict[str, Server]:
    servers: dict[str, Server] = {}
    stores = STORES if database is not None else STORES[:1]
    for store in stores:
        env = base_environment() | SERVICE_SETTINGS
        env["STATE_DIR"] = str(workdir / f"var-{store}")  # throw-away SQLite file
        if store == "postgresql":
            assert database is not None
            env["DATABASE_URL"] = database.url
        servers[store] = service_server(
            store,
            pinning.server,
            with_service_env(env, args.service_env),
            workdir,
            logs[store],
        )
    gc_flag = ["--tune-gc"] if args.baseline_gc == "tuned" else []
    servers["echo"] = script_server(
        "echo", pinning.server, "baseline_echo.py", workdir, devnull, *gc_flag
    )
    return servers


def memory(server: Server) -> dict[str, int]:
    """The server's resident set now (VmRSS) and at its peak (VmHWM), bytes."""
    assert server.process is not None
    found: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{server.process.pid}/status").read_text().split("\n"):
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) * 1024
    if "VmRSS" not in found:
        raise BenchError(f"cannot read /proc/{server.process.pid}/status")
    return found


def warm_up_paths(server: Server) -> None:
    """One request down each path measured, so first-use costs are not per agent."""
    http_get(server.port, "/health")
    http_get(server.port, "/agents")
    http_get(server.port, "/metrics")
    status, _ = http_request(
        server.port, "POST", "/agents/no-such-agent/heartbeat", HEARTBEAT_BODY
    )
    if status != 404:
        raise BenchError(f"{server.name}: a heartbeat to no agent answered {status}")


@contextlib.contextmanager
def on_cpu(cpu: int | None) -> Iterator[None]:
    """Run this process on C{cpu} (the load generator's) for a while."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# Registration -----------------------------------------------------------------


def registration_body(index: int) -> bytes:
    """A unique agent per index: its name, address and port are its own."""
    return orjson.dumps(
        {
            "name": f"bench-agent-{index:06d}",
            "type": AGENT_TYPES[index % len(AGENT_TYPES)],
            "host": f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}",
            "port": 1024 + index % 64_000,
            "capabilities": CAPABILITIES[index % len(CAPABILITIES)],
            "version": "1.4.2",
            "metadata": {
                "region": REGIONS[index % len(REGIONS)],
                "instance_type": "m5.large",
            },
        }
    )


@dataclass
class Registered:
    ids: list[str]
    seconds: float
    latencies_ms: list[float]
    failures: list[str] = field(default_factory=list)

    def figures(self, count: int, connections: int) -> dict[str, Any]:
        ordered = sorted(self.latencies_ms)
        return {
            "agents": count,
            "registered": len(self.ids),
            "connections": connections,
            "seconds": self.seconds,
            "per_second": len(self.ids) / self.seconds if self.seconds else 0.0,
            "p50_ms": percentile(ordered, 0.50),
            "p99_ms": percentile(ordered, 0.99),
            "errors": len(self.failures),
            "first_errors": self.failures[:5],
        }


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("the server closed the connection")
    status = int(status_line.split(b" ", 2)[1])
    length, close = 0, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    return status, (await reader.readexactly(length) if length else b""), close


async def _register_all(port: int, count: int, connections: int) -> Registered:
    """POST /agents/register C{count} times over C{connections} keep-alive ones."""
    indices = iter(range(count))  # shared: each worker takes the next
    ids: list[str | None] = [None] * count
    latencies: list[float] = []
    failures: list[str] = []
    head = (
        f"POST /agents/register HTTP/1.1\r\nHost: {INTERFACE}:{port}\r\n"
        "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    ).encode()

    async def worker() -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            for index in indices:
                if writer is None or reader is None:
                    reader, writer = await asyncio.open_connection(INTERFACE, port)
                body = registration_body(index)
                started = time.perf_counter()
                writer.write(head % len(body) + body)
                status, payload, close = await _read_response(reader)
                latencies.append((time.perf_counter() - started) * 1000)
                if status == 201:
                    ids[index] = orjson.loads(payload)["agent_id"]
                else:
                    failures.append(f"{status} {payload[:200]!r}")
                if close:
                    writer.close()
                    reader = writer = None
        finally:
            if writer is not None:
                writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(connections, count))))
    seconds = time.perf_counter() - started
    return Registered([i for i in ids if i is not None], seconds, latencies, failures)


def register_agents(
    server: Server, count: int, connections: int, pinning: Pinning
) -> Registered:
    try:
        with on_cpu(pinning.load_cpu):
            return asyncio.run(
                asyncio.wait_for(
                    _register_all(server.port, count, connections),
                    timeout=max(300.0, count / 20),
                )
            )
    except (OSError, TimeoutError, ValueError) as error:
        raise BenchError(
            f"registering agents on {server.name} failed: {error!r}\n"
            f"{server.diagnostics()}"
        ) from error


def list_agents(server: Server) -> tuple[int, dict[str, Any]]:
    """GET /agents once: its size, and the parsed document."""
    status, body = http_get(server.port, "/agents", timeout=60)
    if status != 200:
        raise BenchError(f"{server.name}: GET /agents answered {status}")
    return len(body), orjson.loads(body)


# Heartbeats -------------------------------------------------------------------


@dataclass
class HeartbeatLoad:
    """Where each target's cycle over its ids has got to, run after run."""

    ids_files: dict[str, Path]
    agents: dict[str, int]
    sent: dict[str, int] = field(default_factory=dict)
    #: Requests wrk may have had in flight when its runs ended: their answers
    #: are never read, and the service logs and counts them as 499.
    in_flight: dict[str, int] = field(default_factory=dict)

    def run(
        self,
        wrk: str,
        pinning: Pinning,
        server: Server,
        connections: int,
        seconds: int,
    ) -> dict[str, Any]:
        name = server.name
        start = self.sent.get(name, 0) % self.agents[name]
        figures = run_wrk_with_db(
            wrk,
            pinning,
            server,
            connections,
            seconds,
            path="/",
            script=HEARTBEAT_SCRIPT,
            script_args=(str(self.ids_files[name]), str(start)),
        )
        self.sent[name] = self.sent.get(name, 0) + figures["requests"]
        self.in_flight[name] = self.in_flight.get(name, 0) + connections
        return figures


def run_wrk_with_db(
    wrk: str, pinning: Pinning, server: Server, *args: Any, **kwargs: Any
) -> dict[str, Any]:
    """
    L{run_wrk}, plus the share of a CPU the local PostgreSQL server's processes
    used meanwhile ("db_cpu"; None when there are none to see).  Against the
    PostgreSQL service that is part of what is measured, not noise; against
    the others it is interference, and stays counted as other load.
    """
    db_before = postgres_cpu_seconds()
    wall_before = time.monotonic()
    figures = run_wrk(wrk, pinning, server, *args, **kwargs)
    wall = time.monotonic() - wall_before
    db_after = postgres_cpu_seconds()
    if db_before is None or db_after is None or not wall:
        figures["db_cpu"] = None
        return figures
    # Processes that exited meanwhile take their CPU time with them: never < 0.
    figures["db_cpu"] = max(0.0, (db_after - db_before) / wall)
    if server.name == "postgresql":
        others = sum(
            share or 0.0
            for share in (figures["other_on_server_cpu"], figures["other_on_load_cpu"])
        )
        figures["noisy"] = others - figures["db_cpu"] > NOISE_LIMIT
    return figures


def heartbeat_counts(server: Server) -> dict[str, float]:
    """The service's own counts: heartbeats by outcome, answers by status."""
    counts: dict[str, float] = {}
    for labels, value in metric_samples(
        server.port, "optiinfra_agent_heartbeats_total", timeout=10
    ):
        counts[f"outcome:{labels.get('outcome')}"] = value
    for labels, value in metric_samples(
        server.port, "optiinfra_http_requests_total", timeout=10
    ):
        if labels.get("route") == HEARTBEAT_ROUTE:
            counts[f"status:{labels.get('status')}"] = value
    return counts


def _difference(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    return {
        key: round(value - before.get(key, 0.0))
        for key, value in after.items()
        if round(value - before.get(key, 0.0))
    }


# Summaries --------------------------------------------------------------------


def summarise_heartbeats(
    runs: dict[int, dict[str, list[dict[str, Any]]]],
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for connections, by_target in runs.items():
        medians = {
            name: {
                key: median(target_runs, key)
                for key in (
                    "rps",
                    "p50_ms",
                    "p99_ms",
                    "cpu_us_per_request",
                    "server_cpu",
                    "db_cpu",
                )
            }
            | {"errors": sum(run["errors"] for run in target_runs)}
            for name, target_runs in by_target.items()
        }
        ratios = {
            store: {
                "over_echo": medians[store]["rps"] / medians["echo"]["rps"],
                "per_round": [
                    s["rps"] / e["rps"]
                    for s, e in zip(by_target[store], by_target["echo"], strict=True)
                ],
            }
            for store in by_target
            if store != "echo"
        }
        summary[str(connections)] = {"median": medians, "ratios": ratios}
    return summary


def _size(count: float) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(count) >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count:.0f} B"


def print_report(
    args: argparse.Namespace,
    info: dict[str, Any],
    stores: list[str],
    registration: dict[str, dict[str, Any]],
    memory_figures: dict[str, dict[str, Any]],
    heartbeats: dict[str, Any],
    counted: dict[str, dict[str, Any]],
    listing: dict[str, dict[str, Any]],
    skipped: str | None,
) -> None:
    agents = f"{args.agents:,}"
    print_machine("registry", info)
    settings = " ".join(f"{k}={v}" for k, v in SERVICE_SETTINGS.items())
    print(
        f"{agents} agents per store; services: {settings}"
        f"{' ' + ' '.join(args.service_env) if args.service_env else ''}, "
        f"log -> {args.service_log}; echo baseline GC {args.baseline_gc}"
    )
    if skipped:
        print(f"PostgreSQL column skipped: {skipped}")
    table(
        f"Registration: POST /agents/register x {agents}, "
        f"{args.register_connections} connections (asyncio client on the load CPU)",
        "store 22|agents/s 10|p50 11|p99 11|time 9|errors 8",
        [
            (
                LABELS[store],
                f"{r['per_second']:,.0f}",
                f"{r['p50_ms']:.2f} ms",
                f"{r['p99_ms']:.2f} ms",
                f"{r['seconds']:.1f} s",
                r["errors"],
            )
            for store in stores
            for r in [registration[store]]
        ],
    )
    table(
        f"Memory: the service's VmRSS before and after registering {agents} agents",
        "store 22|before 11|after 11|per agent 12|peak (run) 12",
        [
            (
                LABELS[store],
                _size(m["before"]),
                _size(m["after"]),
                f"{m['per_agent']:,.0f} B",
                _size(m["peak"]),
            )
            for store in stores
            for m in [memory_figures[store]]
        ],
    )
    for connections, block in heartbeats.items():
        noun = "connection" if connections == "1" else "connections"
        table(
            f"POST /agents/{{id}}/heartbeat over {agents} agents, {connections} "
            f"{noun} (median of {args.rounds} round{'s' if args.rounds > 1 else ''}"
            f" x {args.duration} s)",
            SERVER_COLUMNS.format(first="target", extra="CPU/req 11"),
            [
                (
                    LABELS[name],
                    f"{m['rps']:,.0f}",
                    f"{m['p50_ms']:.2f} ms",
                    f"{m['p99_ms']:.2f} ms",
                    f"{m['cpu_us_per_request']:.0f} us",
                    f"{m['server_cpu']:.0%}",
                    f"{m['db_cpu']:.0%}" if m["db_cpu"] == m["db_cpu"] else "",
                    m["errors"],
                )
                for name, m in block["median"].items()
            ],
        )
        for store, ratio in block["ratios"].items():
            rounds = " ".join(f"{r:.2f}" for r in ratio["per_round"])
            print(
                f"  {STORE_NAMES[store]}/echo throughput: {ratio['over_echo']:.2f}x "
                f"(per round: {rounds})"
            )
    table(
        f"GET /agents with {agents} agents, 1 connection, {args.list_duration} s",
        SERVER_COLUMNS.format(first="store", extra="size 11"),
        [
            (
                LABELS[store],
                f"{g['rps']:,.1f}",
                f"{g['p50_ms']:.2f} ms",
                f"{g['p99_ms']:.2f} ms",
                _size(g["bytes"]),
                f"{g['server_cpu']:.0%}",
                f"{g['db_cpu']:.0%}" if g["db_cpu"] is not None else "",
                g["errors"],
            )
            for store in stores
            for g in [listing[store]]
        ],
    )
    print()
    for store in stores:
        c = counted[store]
        print(
            f"{STORE_NAMES[store]}: the service counted {c['accepted']:,} heartbeats "
            f"accepted, {c['unknown']:,} for unknown agents, {c['non_2xx']:,} "
            f"non-2xx answers, {c['abandoned']:,} abandoned by wrk in flight at the "
            f"end of a run (499, at most {c['in_flight']:,}); wrk completed "
            f"{c['sent']:,}, warm-up included; "
            f"GET /agents lists {listing[store]['count']:,} agents, "
            f"{listing[store]['with_beat']:,} carrying the heartbeat's metadata"
        )


def checks(
    args: argparse.Namespace,
    stores: list[str],
    registration: dict[str, dict[str, Any]],
    heartbeats: dict[str, Any],
    counted: dict[str, dict[str, Any]],
    listing: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """Every target, per store: what, the figure, met or not."""
    top = str(max(args.connections))
    results: list[dict[str, Any]] = []
    for store in stores:
        name = STORE_NAMES[store]
        ratio = heartbeats[top]["ratios"][store]["over_echo"]
        results.append(
            check(
                f"heartbeat throughput >= {args.threshold:g}x bare Klein echo "
                f"at {top} connections",
                f"{ratio:.2f}x",
                ratio >= args.threshold,
                name,
            )
        )
        for connections, block in heartbeats.items():
            p99 = block["median"][store]["p99_ms"]
            results.append(
                check(
                    f"heartbeat p99 < {args.p99_limit:g} ms at {connections} "
                    f"connection{'' if connections == '1' else 's'}",
                    f"{p99:.2f} ms",
                    p99 < args.p99_limit,
                    name,
                )
            )
        c = counted[store]
        wrong = (
            sum(block["median"][store]["errors"] for block in heartbeats.values())
            + c["non_2xx"]
            + c["unknown"]
        )
        p99 = listing[store]["p99_ms"]
        results += [
            check(
                "heartbeats: no non-2xx answers or socket errors",
                f"{wrong} ({c['abandoned']} left in flight at run ends, at most "
                f"{c['in_flight']} possible)",
                wrong == 0 and c["abandoned"] <= c["in_flight"],
                name,
            ),
            check(
                f"registrations all 201 ({args.agents:,})",
                f"{registration[store]['registered']:,} of {args.agents:,}",
                registration[store]["errors"] == 0
                and registration[store]["registered"] == args.agents,
                name,
            ),
            check(
                f"GET /agents p99 < {args.list_limit:g} ms",
                f"{p99:.1f} ms (p50 {listing[store]['p50_ms']:.1f} ms)",
                p99 < args.list_limit and listing[store]["errors"] == 0,
                name,
            ),
        ]
    echo_errors = sum(
        block["median"]["echo"]["errors"] for block in heartbeats.values()
    )
    results.append(
        check("baseline: no errors", str(echo_errors), echo_errors == 0, "echo")
    )
    return results


def print_summary(
    args: argparse.Namespace,
    stores: list[str],
    registration: dict[str, dict[str, Any]],
    memory_figures: dict[str, dict[str, Any]],
    heartbeats: dict[str, Any],
    listing: dict[str, dict[str, Any]],
    skipped: str | None,
) -> None:
    top = str(max(args.connections))
    echo = heartbeats[top]["median"]["echo"]["rps"]
    rows: list[tuple[str, Any, str]] = [
        ("registrations/s", lambda s: f"{registration[s]['per_second']:,.0f}", ""),
        (
            "memory per agent (VmRSS)",
            lambda s: f"{memory_figures[s]['per_agent']:,.0f} B",
            "",
        ),
        (
            f"heartbeats/s, {top} conn",
            lambda s: f"{heartbeats[top]['median'][s]['rps']:,.0f}",
            "",
        ),
        (
            f"  / bare Klein echo ({echo:,.0f})",
            lambda s: f"{heartbeats[top]['ratios'][s]['over_echo']:.2f}x",
            f">= {args.threshold:g}x",
        ),
    ]
    for connections, block in heartbeats.items():
        rows.append(
            (
                f"heartbeat p50 / p99, {connections} conn",
                lambda s, b=block["median"]: (
                    f"{b[s]['p50_ms']:.1f} / {b[s]['p99_ms']:.1f} ms"
                ),
                f"p99 < {args.p99_limit:g} ms",
            )
        )
    rows += [
        (
            "GET /agents p50 / p99",
            lambda s: f"{listing[s]['p50_ms']:.1f} / {listing[s]['p99_ms']:.1f} ms",
            f"< {args.list_limit:g} ms",
        ),
        ("GET /agents size", lambda s: _size(listing[s]["bytes"]), ""),
    ]
    table(
        f"Summary, {args.agents:,} agents",
        " 34|SQLite 20|PostgreSQL 20|   target 0",
        [
            (
                label,
                *(text(s) if s in stores else "skipped" for s in STORE_NAMES),
                f"   {target}" if target else "",
            )
            for label, text, target in rows
        ],
    )
    if skipped:
        print(f"  PostgreSQL skipped: {skipped}")


# The run ----------------------------------------------------------------------


def benchmark(args: argparse.Namespace) -> int:
    wrk = ensure_wrk(allow_install=not args.no_install)
    if not HEARTBEAT_SCRIPT.is_file():
        raise BenchError(f"{HEARTBEAT_SCRIPT} is missing")
    pinning = choose_cpus(args.no_pin)
    info = machine_info(pinning, ("twisted", "klein", "psycopg"))
    database: Database | None = None
    skipped: str | None = None
    if args.no_postgres:
        skipped = "--no-postgres given"
    else:
        created = create_database(args.postgres_url)
        if isinstance(created, str):
            skipped = created
            say(f"PostgreSQL column skipped: {skipped}")
        else:
            database = created
    try:
        with tempfile.TemporaryDirectory(prefix="optiinfra-bench-") as tmp:
            workdir = Path(tmp)
            with contextlib.ExitStack() as files:
                devnull = files.enter_context(open(os.devnull, "wb"))
                logs = {
                    "sqlite": files.enter_context(open(args.service_log, "ab")),
                    "postgresql": files.enter_context(
                        open(
                            args.service_log
                            if args.service_log == os.devnull
                            else f"{args.service_log}.postgresql",
                            "ab",
                        )
                    ),
                }
                servers = build_servers(args, pinning, workdir, logs, devnull, database)
                try:
                    for server in servers.values():
                        server.start()
                    for server in servers.values():
                        server.wait_ready()
                    say(f"servers answer GET /health: {', '.join(servers)}")
                    return measure(args, wrk, pinning, servers, info, workdir, skipped)
                finally:
                    for server in servers.values():
                        server.stop()
    finally:
        if database is not None:
            database.drop()


def measure(
    args: argparse.Namespace,
    wrk: str,
    pinning: Pinning,
    servers: dict[str, Server],
    info: dict[str, Any],
    workdir: Path,
    skipped: str | None,
) -> int:
    stores = [name for name in STORES if name in servers]
    targets = [*stores, "echo"]
    runs_total = args.rounds * len(args.connections) * len(targets)
    estimate = (
        runs_total * args.duration
        + len(targets) * args.warmup
        + len(stores) * args.list_duration
    )
    say(
        f"{len(stores)} store(s) x {args.agents:,} agents; then {runs_total} "
        f"heartbeat runs of {args.duration} s (~{estimate} s of load after "
        f"registering); {pinning.note}"
    )

    # Registration and memory, one store at a time.
    registration: dict[str, dict[str, Any]] = {}
    memory_figures: dict[str, dict[str, Any]] = {}
    ids_files: dict[str, Path] = {}
    for store in stores:
        server = servers[store]
        warm_up_paths(server)
        time.sleep(0.5)
        before = memory(server)["VmRSS"]
        registered = register_agents(
            server, args.agents, args.register_connections, pinning
        )
        after = memory(server)["VmRSS"]
        registration[store] = registered.figures(args.agents, args.register_connections)
        memory_figures[store] = {
            "before": before,
            "after": after,
            "per_agent": (after - before) / max(1, len(registered.ids)),
        }
        r = registration[store]
        say(
            f"{store}: registered {r['registered']:,} agents in {r['seconds']:.1f} s "
            f"({r['per_second']:,.0f}/s, p50 {r['p50_ms']:.1f} ms, p99 "
            f"{r['p99_ms']:.1f} ms); VmRSS {_size(before)} -> {_size(after)} "
            f"({memory_figures[store]['per_agent']:,.0f} B per agent)"
            + (f"; ERRORS {r['errors']}: {r['first_errors']}" if r["errors"] else "")
        )
        if not registered.ids:
            raise BenchError(f"{store}: no agent could be registered")
        _, document = list_agents(server)
        if document.get("count") != len(registered.ids):
            raise BenchError(
                f"{store}: GET /agents lists {document.get('count')} agents, "
                f"{len(registered.ids)} were registered"
            )
        ids_files[store] = workdir / f"{store}.ids"
        ids_files[store].write_text("\n".join(registered.ids) + "\n")
    # The echo baseline gets the same paths as the first store.
    ids_files["echo"] = ids_files[stores[0]]
    load = HeartbeatLoad(
        ids_files,
        {name: len(ids_files[name].read_text().split()) for name in targets},
    )

    # Heartbeats, interleaved.
    counts_before = {store: heartbeat_counts(servers[store]) for store in stores}
    if args.warmup:
        for name in targets:
            load.run(wrk, pinning, servers[name], max(args.connections), args.warmup)
        say(f"warmed up each target with {args.warmup} s of heartbeats")
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {
        c: {name: [] for name in targets} for c in args.connections
    }
    for number in range(args.rounds):
        for connections in args.connections:
            for name in rotated(targets, number):
                figures = load.run(
                    wrk, pinning, servers[name], connections, args.duration
                )
                runs[connections][name].append(figures)
                db = figures.get("db_cpu")
                say(
                    f"round {number + 1}/{args.rounds}  c={connections:<3} "
                    f"{name:<11}{figures['rps']:>8,.0f} req/s  "
                    f"p50 {figures['p50_ms']:.2f} ms  p99 {figures['p99_ms']:.2f} ms"
                    f"  server CPU {figures['server_cpu']:.0%}"
                    + (f"  DB CPU {db:.0%}" if db else "")
                    + noise_note(figures)
                    + (f"  ERRORS {figures['errors']}" if figures["errors"] else "")
                )
    counted: dict[str, dict[str, Any]] = {}
    for store in stores:
        delta = _difference(heartbeat_counts(servers[store]), counts_before[store])
        counted[store] = {
            "accepted": delta.get("outcome:accepted", 0),
            "unknown": delta.get("outcome:unknown_agent", 0),
            "non_2xx": sum(
                n
                for key, n in delta.items()
                if key.startswith("status:") and key[7:][:1] != "2" and key != ABANDONED
            ),
            "abandoned": delta.get(ABANDONED, 0),
            "in_flight": load.in_flight.get(store, 0),
            "by_status": {
                k[7:]: n for k, n in delta.items() if k.startswith("status:")
            },
            "sent": load.sent.get(store, 0),
        }

    # GET /agents, one store at a time.
    listing: dict[str, dict[str, Any]] = {}
    for store in stores:
        server = servers[store]
        size, document = list_agents(server)
        figures = run_wrk_with_db(
            wrk, pinning, server, 1, args.list_duration, path="/agents"
        )
        figures["bytes"] = size
        figures["count"] = document.get("count")
        figures["with_beat"] = sum(
            1
            for agent in document.get("agents", [])
            if agent.get("metadata", {}).get("load") == 0.5
        )
        listing[store] = figures
        say(
            f"{store}: GET /agents {figures['rps']:.1f} req/s, p50 "
            f"{figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms, "
            f"{_size(size)}, server CPU {figures['server_cpu']:.0%}"
            + (f", DB CPU {figures['db_cpu']:.0%}" if figures["db_cpu"] else "")
            + noise_note(figures)
        )
        memory_figures[store]["peak"] = memory(server).get("VmHWM", 0)
    info["loadavg_after"] = os.getloadavg()

    heartbeats = summarise_heartbeats(runs)
    results = checks(args, stores, registration, heartbeats, counted, listing)
    print_report(
        args,
        info,
        stores,
        registration,
        memory_figures,
        heartbeats,
        counted,
        listing,
        skipped,
    )
    print_summary(
        args,
        stores,
        registration,
        memory_figures,
        heartbeats,
        listing,
        skipped,
    )
    all_runs = [
        run
        for by in runs.values()
        for rs in by.values()
        for run in rs
        if run.get("noisy") is not None
    ] + list(listing.values())
    noisy = sum(bool(run["noisy"]) for run in all_runs)
    noise_warning(noisy, len(all_runs), " (PostgreSQL's own CPU aside)")
    config = {
        "agents": args.agents,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "warmup_s": args.warmup,
        "connections": args.connections,
        "register_connections": args.register_connections,
        "list_duration_s": args.list_duration,
        "threshold": args.threshold,
        "p99_limit_ms": args.p99_limit,
        "list_limit_ms": args.list_limit,
        "baseline_gc": args.baseline_gc,
        "service_settings": SERVICE_SETTINGS,
        "service_env": args.service_env,
        "heartbeat_body": HEARTBEAT_BODY.decode(),
        "load_generator": "wrk -t1 --latency -s bench/heartbeat.lua",
    }
    figures = {
        "postgresql_skipped": skipped,
        "registration": registration,
        "memory": memory_figures,
        "heartbeat_runs": {str(c): by for c, by in runs.items()},
        "heartbeats": heartbeats,
        "service_counts": counted,
        "listing": listing,
        "noisy_runs": noisy,
    }
    return finish(args, results, figures, info, config)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return guarded(lambda: benchmark(args))


if __name__ == "__main__":
    sys.exit(main())
