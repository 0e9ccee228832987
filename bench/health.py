"""
GET /health throughput and latency: the service against two baselines.

    python bench/health.py                 # 3 rounds x 5 s per run, ~2 minutes
    python bench/health.py --quick         # 1 round x 2 s, ~20 s
    python bench/health.py --json out.json --strict

Starts three servers, each its own process pinned to one CPU:

  service  the real service, ``twistd -n --pidfile= optiinfra`` from this source
           tree, with its JSON access log, request ids and metrics all on
  klein    bench/baseline_klein.py: a bare Klein app, no logging, no metrics
  web      bench/baseline_web.py: a plain twisted.web Resource, no logging

All three compute the same JSON body per request.  The load generator (wrk, on the
other CPU) hits them in interleaved rounds -- service, klein, web, then the next
round rotated -- so a slow patch of the machine touches every target alike, and
the median of the rounds is reported per target.  See bench/README.md.

Exit status: 0 after a completed run whatever the figures (1 on FAIL only with
--strict); 2 when the benchmark could not run (no wrk, a server did not start).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.metadata
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
TARGETS = ("service", "klein", "web")
LABELS = {
    "service": "service (twistd optiinfra)",
    "klein": "bare Klein",
    "web": "plain twisted.web",
}
HEALTH_KEYS = {"status", "timestamp", "version", "uptime"}
INTERFACE = "127.0.0.1"
#: The only variables of the caller's environment the servers see.
_KEPT_VARIABLES = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")


class BenchError(Exception):
    """The benchmark cannot run; the message says why and what to do."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Options ------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"{name}={value!r} is not a whole number") from None


def _connections(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected numbers like 1,50"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers like 1,50")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="GET /health throughput and p50/p99 latency: the service "
        "against a bare Klein app and a plain twisted.web Resource, interleaved.",
        epilog="Environment defaults: BENCH_DURATION, BENCH_ROUNDS, BENCH_WARMUP, "
        "BENCH_CONNECTIONS (flags win).  Exit status is 0 after a completed run "
        "even on FAIL unless --strict is given; 2 if the benchmark could not run.",
    )
    parser.add_argument(
        "--duration",
        type=int,
        default=_env_int("BENCH_DURATION", 5),
        help="seconds per measured run [BENCH_DURATION, 5]",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=_env_int("BENCH_ROUNDS", 3),
        help="interleaved rounds; the median is reported [BENCH_ROUNDS, 3]",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=_env_int("BENCH_WARMUP", 2),
        help="seconds of unmeasured load per target first (0: none) [BENCH_WARMUP, 2]",
    )
    parser.add_argument(
        "--connections",
        type=_connections,
        default=_connections(os.environ.get("BENCH_CONNECTIONS", "1,50")),
        help="comma-separated concurrencies [BENCH_CONNECTIONS, 1,50]",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 1 round, 2 s per run, 1 s warm-up",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.9,
        help="target ratio of service to bare Klein throughput [0.9]",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when the service misses the target (default: exit 0)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    parser.add_argument(
        "--service-log",
        metavar="FILE",
        default=os.devnull,
        help="where the service's JSON log lines (one per request) go; "
        "they are always written [default: /dev/null]",
    )
    parser.add_argument(
        "--service-env",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="set a variable for the service (repeatable); it otherwise runs "
        "with a clean environment, LOG_LEVEL=info and a throw-away STATE_DIR",
    )
    parser.add_argument(
        "--baseline-gc",
        choices=("stock", "tuned"),
        default="stock",
        help="stock: the baselines keep CPython's GC defaults; tuned: they get "
        "the service's gc.freeze() and thresholds too [stock]",
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the servers and wrk to separate CPUs",
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="fail instead of installing wrk with apt-get when it is missing",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 2, 1
    if args.duration < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--duration and --rounds must be >= 1, --warmup >= 0")
    return args


# wrk ----------------------------------------------------------------------


def ensure_wrk(allow_install: bool) -> str:
    """The path of wrk, installed from the distribution's packages if missing."""
    found = shutil.which("wrk")
    if found:
        return found
    hint = (
        "wrk (the HTTP load generator) is required: install it with "
        "`apt-get install -y wrk` (Debian/Ubuntu) or your distribution's package."
    )
    if not allow_install:
        raise BenchError(f"wrk not found and --no-install given. {hint}")
    if not shutil.which("apt-get"):
        raise BenchError(f"wrk not found and there is no apt-get here. {hint}")
    if os.geteuid() == 0:
        prefix: list[str] = []
    elif shutil.which("sudo"):
        prefix = ["sudo", "-n"]
    else:
        raise BenchError(f"wrk not found; installing it needs root. {hint}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, "apt-get", "install", "-y", "--no-install-recommends", "wrk"]
    say("wrk not found: installing it with apt-get ...")
    result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        # A fresh machine or container often has no package lists yet.
        say("apt-get install failed; running apt-get update and trying again ...")
        subprocess.run(
            [*prefix, "apt-get", "update"], env=env, capture_output=True, text=True
        )
        result = subprocess.run(install, env=env, capture_output=True, text=True)
    found = shutil.which("wrk")
    if result.returncode != 0 or not found:
        tail = (result.stdout + result.stderr).strip().splitlines()[-8:]
        raise BenchError(
            "could not install wrk with apt-get:\n  "
            + "\n  ".join(tail or ["(no output)"])
            + f"\n{hint}"
        )
    say(f"installed {found}")
    return found


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_DURATION = r"([0-9.]+)(us|ms|s|m|h)"


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


def parse_wrk(text: str) -> dict[str, Any]:
    """Requests/s, p50/p99 (ms), request and error counts from `wrk --latency`."""
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
    p50 = re.search(r"^\s+50%\s+" + _DURATION, text, re.M)
    p99 = re.search(r"^\s+99%\s+" + _DURATION, text, re.M)
    total = re.search(r"^\s+(\d+) requests in ", text, re.M)
    if not (rps and p50 and p99 and total):
        raise BenchError(f"could not read wrk's output:\n{text}")
    errors = 0
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    if sockets:
        errors += sum(int(n) for n in sockets.groups())
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if bad:
        errors += int(bad.group(1))
    return {
        "rps": float(rps.group(1)),
        "p50_ms": _ms(*p50.groups()),
        "p99_ms": _ms(*p99.groups()),
        "requests": int(total.group(1)),
        "errors": errors,
    }


# CPUs ---------------------------------------------------------------------


@dataclass
class Pinning:
    server: list[str]
    load: list[str]
    note: str
    server_cpu: int | None = None
    load_cpu: int | None = None


def choose_cpus(disabled: bool) -> Pinning:
    if disabled:
        return Pinning([], [], "not pinned (--no-pin)")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        say(
            f"warning: only {len(cpus)} CPU available; servers and wrk will share "
            "it and the figures will be low and noisy"
        )
        return Pinning([], [], f"not pinned: only {len(cpus)} CPU")
    if not shutil.which("taskset"):
        say("warning: taskset not found (package util-linux); not pinning")
        return Pinning([], [], "not pinned: no taskset")
    server, load = cpus[0], cpus[1]
    return Pinning(
        ["taskset", "-c", str(server)],
        ["taskset", "-c", str(load)],
        f"servers on CPU {server}, wrk on CPU {load} (of {len(cpus)})",
        server,
        load,
    )


def busy_ticks() -> dict[int, int]:
    """Per CPU: clock ticks spent on anything but idling (steal included)."""
    busy: dict[int, int] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            name, *values = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                user, nice, system = (int(v) for v in values[:3])
                steal = int(values[7]) if len(values) > 7 else 0
                busy[int(name[3:])] = user + nice + system + steal
    return busy


#: A run is flagged when something else used more than this share of either
#: benchmark CPU: the machine was not quiet and its figures are suspect.
NOISE_LIMIT = 0.10


# Servers ------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((INTERFACE, 0))
        return int(sock.getsockname()[1])


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(INTERFACE, port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    stdout: IO[bytes]
    stderr_path: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    _stderr: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self.stdout,
            stderr=self._stderr,
            start_new_session=True,  # a Ctrl-C reaches us; we stop it ourselves
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with status {self.process.returncode} "
                    f"before answering.\n{self.diagnostics()}"
                )
            try:
                status, _ = http_get(self.port, "/health", timeout=1.0)
            except OSError as error:
                last = repr(error)
            else:
                if status == 200:
                    return
                last = f"status {status}"
            time.sleep(0.1)
        raise BenchError(
            f"{self.name} did not answer GET /health within {timeout:.0f} s "
            f"({last}).\n{self.diagnostics()}"
        )

    def diagnostics(self) -> str:
        lines = [f"  command: {' '.join(self.argv)}"]
        try:
            tail = self.stderr_path.read_text(errors="replace").splitlines()[-15:]
        except OSError:
            tail = []
        lines += [f"  stderr: {line}" for line in tail]
        if self.name == "service" and self.stdout.name != os.devnull:
            self.stdout.flush()
            with contextlib.suppress(OSError):
                text = Path(self.stdout.name).read_text(errors="replace")
                lines += [f"  log: {line}" for line in text.splitlines()[-10:]]
        elif self.name == "service":
            lines.append(
                "  (its JSON log went to /dev/null: rerun with --service-log FILE "
                "to see it)"
            )
        return "\n".join(lines)

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        assert self.process is not None
        try:
            stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        except OSError:
            return float("nan")
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _clock_ticks()

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


def find_twistd() -> str:
    beside = Path(sys.executable).with_name("twistd")
    if beside.exists():
        return str(beside)
    found = shutil.which("twistd")
    if found:
        return found
    raise BenchError(
        f"twistd not found beside {sys.executable} nor on PATH: run "
        "`make bench` (it installs the service's environment) or use .venv/bin/python"
    )


def build_servers(
    args: argparse.Namespace,
    pinning: Pinning,
    workdir: Path,
    service_log: IO[bytes],
    devnull: IO[bytes],
) -> dict[str, Server]:
    # A clean environment: the service's settings (DATABASE_URL, API_KEYS_FILE,
    # ENVIRONMENT, NOTIFY_SOCKET ...) must not leak in from the caller's shell.
    env = {key: os.environ[key] for key in _KEPT_VARIABLES if key in os.environ}
    env["PYTHONPATH"] = str(REPO)  # the source tree, not an installed copy
    env["LOG_LEVEL"] = "info"  # the access log is on, as in production
    env["STATE_DIR"] = str(workdir / "var")  # a throw-away SQLite store
    for assignment in args.service_env:
        key, _, value = assignment.partition("=")
        env[key] = value
    ports = {name: free_port() for name in TARGETS}
    gc_flag = ["--tune-gc"] if args.baseline_gc == "tuned" else []
    argv = {
        "service": [
            find_twistd(),
            "-n",
            "--pidfile=",
            "optiinfra",
            "--port",
            f"tcp:{ports['service']}:interface={INTERFACE}",
        ],
        "klein": [
            sys.executable,
            str(BENCH / "baseline_klein.py"),
            "--port",
            str(ports["klein"]),
            *gc_flag,
        ],
        "web": [
            sys.executable,
            str(BENCH / "baseline_web.py"),
            "--port",
            str(ports["web"]),
            *gc_flag,
        ],
    }
    return {
        name: Server(
            name=name,
            argv=[*pinning.server, *argv[name]],
            env=env,
            cwd=workdir,
            stdout=service_log if name == "service" else devnull,
            stderr_path=workdir / f"{name}.stderr",
            port=ports[name],
        )
        for name in TARGETS
    }


def check_body(server: Server) -> str | None:
    """None when /health has the expected shape, else what is wrong."""
    status, body = http_get(server.port, "/health")
    try:
        payload = json.loads(body)
    except ValueError:
        return f"{server.name}: /health is not JSON: {body[:200]!r}"
    if status != 200 or not isinstance(payload, dict):
        return f"{server.name}: /health answered {status} {body[:200]!r}"
    if set(payload) != HEALTH_KEYS or payload.get("status") != "healthy":
        return f"{server.name}: /health body differs in shape: {payload}"
    return None


def counted_health_requests(server: Server) -> float | None:
    """The service's own count of GET /health requests, from /metrics."""
    try:
        status, body = http_get(server.port, "/metrics")
    except OSError:
        return None
    if status != 200:
        return None
    total = 0.0
    found = False
    for line in body.decode("utf-8", "replace").splitlines():
        if (
            line.startswith("optiinfra_http_requests_total{")
            and 'route="/health"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else None


# Measuring ----------------------------------------------------------------


def run_wrk(
    wrk: str, pinning: Pinning, server: Server, connections: int, seconds: int
) -> dict[str, Any]:
    command = [
        *pinning.load,
        wrk,
        "-t1",  # one load-generator thread: it has one CPU
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        "--latency",
        f"http://{INTERFACE}:{server.port}/health",
    ]
    ticks_before = busy_ticks()
    load_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_before = server.cpu_seconds()
    wall_before = time.monotonic()
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 60
    )
    wall = time.monotonic() - wall_before
    cpu = server.cpu_seconds() - cpu_before
    load_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    ticks_after = busy_ticks()
    if result.returncode != 0:
        raise BenchError(
            f"wrk failed (status {result.returncode}): "
            f"{(result.stderr or result.stdout).strip()}"
        )
    figures = parse_wrk(result.stdout)
    figures["server_cpu"] = cpu / wall if wall else float("nan")
    figures["cpu_us_per_request"] = (
        cpu / figures["requests"] * 1e6 if figures["requests"] else float("nan")
    )
    wrk_cpu = (
        load_after.ru_utime
        + load_after.ru_stime
        - load_before.ru_utime
        - load_before.ru_stime
    )

    def other(cpu_id: int | None, own: float) -> float | None:
        if cpu_id is None or cpu_id not in ticks_before or not wall:
            return None
        used = (ticks_after[cpu_id] - ticks_before[cpu_id]) / _clock_ticks()
        return max(0.0, (used - own) / wall)

    # What else ran on the two CPUs (other processes, the hypervisor's steal):
    figures["other_on_server_cpu"] = other(pinning.server_cpu, cpu)
    figures["other_on_load_cpu"] = other(pinning.load_cpu, wrk_cpu)
    figures["noisy"] = any(
        share is not None and share > NOISE_LIMIT
        for share in (figures["other_on_server_cpu"], figures["other_on_load_cpu"])
    )
    return figures


def _noise_note(figures: dict[str, Any]) -> str:
    shares = [
        f"{share:.0%} on {where}"
        for where, share in (
            ("server CPU", figures["other_on_server_cpu"]),
            ("wrk CPU", figures["other_on_load_cpu"]),
        )
        if share is not None and share > NOISE_LIMIT / 2
    ]
    if not shares:
        return ""
    flag = "  NOISY" if figures["noisy"] else ""
    return f"  (other load {', '.join(shares)}){flag}"


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(run[key] for run in runs))


def summarise(
    runs: dict[int, dict[str, list[dict[str, Any]]]], threshold: float
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for connections, by_target in runs.items():
        medians = {
            name: {
                key: median_of(target_runs, key)
                for key in ("rps", "p50_ms", "p99_ms", "cpu_us_per_request")
            }
            | {"errors": sum(run["errors"] for run in target_runs)}
            for name, target_runs in by_target.items()
        }
        service = medians["service"]["rps"]
        per_round = [
            s["rps"] / k["rps"]
            for s, k in zip(by_target["service"], by_target["klein"], strict=True)
        ]
        summary[str(connections)] = {
            "median": medians,
            "service_over_klein": service / medians["klein"]["rps"],
            "service_over_web": service / medians["web"]["rps"],
            "cpu_klein_over_service": medians["klein"]["cpu_us_per_request"]
            / medians["service"]["cpu_us_per_request"],
            "service_over_klein_per_round": per_round,
            "meets_target": service / medians["klein"]["rps"] >= threshold,
        }
    return summary


def print_tables(summary: dict[str, Any], args: argparse.Namespace) -> None:
    for connections, block in summary.items():
        noun = "connection" if connections == "1" else "connections"
        print()
        print(
            f"GET /health, {connections} {noun} "
            f"(median of {args.rounds} round{'s' if args.rounds > 1 else ''} "
            f"x {args.duration} s)"
        )
        header = (
            f"  {'target':<28}{'req/s':>9}{'p50':>11}{'p99':>11}"
            f"{'CPU/req':>11}{'errors':>8}"
        )
        print(header)
        print("  " + "-" * (len(header) - 2))
        for name in TARGETS:
            m = block["median"][name]
            print(
                f"  {LABELS[name]:<28}{m['rps']:>9,.0f}"
                f"{m['p50_ms']:>8.2f} ms{m['p99_ms']:>8.2f} ms"
                f"{m['cpu_us_per_request']:>8.0f} us{m['errors']:>8}"
            )
        rounds = " ".join(f"{r:.2f}" for r in block["service_over_klein_per_round"])
        print(
            f"  service/klein throughput: {block['service_over_klein']:.2f}x "
            f"(per round: {rounds})"
        )
        print(f"  service/web   throughput: {block['service_over_web']:.2f}x")
        print(
            "  CPU per request, klein/service: "
            f"{block['cpu_klein_over_service']:.2f}x (less sensitive to a busy "
            "machine than req/s)"
        )


def verdict(summary: dict[str, Any], threshold: float) -> tuple[bool, str]:
    passed = all(block["meets_target"] for block in summary.values())
    figures = ", ".join(
        f"{block['service_over_klein']:.2f}x at {c} conn"
        for c, block in summary.items()
    )
    word = "PASS" if passed else "FAIL"
    return passed, (
        f"{word}: service >= {threshold:g}x bare Klein throughput "
        f"({figures}; the target holds only if met at every concurrency)"
    )


def machine_info(pinning: Pinning) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "cpus": len(os.sched_getaffinity(0)),
        "pinning": pinning.note,
        "loadavg_before": os.getloadavg(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    for package in ("twisted", "klein"):
        with contextlib.suppress(Exception):
            info[package] = importlib.metadata.version(package)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["git"] = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    return info


def benchmark(args: argparse.Namespace) -> int:
    wrk = ensure_wrk(allow_install=not args.no_install)
    pinning = choose_cpus(args.no_pin)
    info = machine_info(pinning)
    runs_total = args.rounds * len(args.connections) * len(TARGETS)
    estimate = runs_total * args.duration + len(TARGETS) * args.warmup
    say(
        f"{runs_total} runs of {args.duration} s ({args.rounds} rounds x "
        f"{len(TARGETS)} targets x connections {args.connections}), "
        f"~{estimate} s of load; {pinning.note}"
    )
    with tempfile.TemporaryDirectory(prefix="optiinfra-bench-") as tmp:
        workdir = Path(tmp)
        with (
            open(args.service_log, "ab") as service_log,
            open(os.devnull, "wb") as devnull,
        ):
            servers = build_servers(args, pinning, workdir, service_log, devnull)
            try:
                for server in servers.values():
                    server.start()
                for server in servers.values():
                    server.wait_ready()
                    problem = check_body(server)
                    if problem:
                        say(f"warning: {problem}")
                say("all three servers answer GET /health")
                return measure(args, wrk, pinning, servers, info)
            finally:
                for server in servers.values():
                    server.stop()


def measure(
    args: argparse.Namespace,
    wrk: str,
    pinning: Pinning,
    servers: dict[str, Server],
    info: dict[str, Any],
) -> int:
    if args.warmup:
        for name in TARGETS:
            run_wrk(wrk, pinning, servers[name], max(args.connections), args.warmup)
        say(f"warmed up each target for {args.warmup} s")
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {
        c: {name: [] for name in TARGETS} for c in args.connections
    }
    sent_to_service = 0
    for number in range(args.rounds):
        shift = number % len(TARGETS)
        order = TARGETS[shift:] + TARGETS[:shift]
        for connections in args.connections:
            for name in order:
                figures = run_wrk(
                    wrk, pinning, servers[name], connections, args.duration
                )
                runs[connections][name].append(figures)
                if name == "service":
                    sent_to_service += figures["requests"]
                say(
                    f"round {number + 1}/{args.rounds}  c={connections:<3} "
                    f"{name:<8}{figures['rps']:>9,.0f} req/s  "
                    f"p50 {figures['p50_ms']:.2f} ms  p99 {figures['p99_ms']:.2f} ms"
                    f"  server CPU {figures['server_cpu']:.0%}"
                    + _noise_note(figures)
                    + (f"  ERRORS {figures['errors']}" if figures["errors"] else "")
                )
    info["loadavg_after"] = os.getloadavg()
    counted = counted_health_requests(servers["service"])

    summary = summarise(runs, args.threshold)
    print()
    print(
        f"OptiInfra /health benchmark -- {info.get('cpu_model', 'unknown CPU')}, "
        f"Python {info['python']}, Twisted {info.get('twisted', '?')}, "
        f"Klein {info.get('klein', '?')}, {pinning.note}, "
        f"git {info.get('git', '?')}"
    )
    print(
        "Load: wrk, 1 thread; baselines' GC "
        f"{args.baseline_gc}; service log -> {args.service_log}"
    )
    print_tables(summary, args)
    print()
    if counted is not None:
        print(
            f"The service's metrics counted {counted:,.0f} GET /health requests "
            f"(wrk completed {sent_to_service:,} in measured runs; the rest are "
            "warm-up, readiness probes and in-flight at run ends)."
        )
    else:
        print("note: could not read the service's /health request count in /metrics")
    all_runs = [run for by in runs.values() for rs in by.values() for run in rs]
    noisy = sum(run["noisy"] for run in all_runs)
    if noisy:
        print(
            f"warning: {noisy} of {len(all_runs)} runs had other load above "
            f"{NOISE_LIMIT:.0%} of a benchmark CPU (see the per-run lines): the "
            "machine was not quiet; rerun when it is, or with more --rounds."
        )
    passed, line = verdict(summary, args.threshold)
    print(line)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": info,
                    "config": {
                        "duration_s": args.duration,
                        "rounds": args.rounds,
                        "warmup_s": args.warmup,
                        "connections": args.connections,
                        "threshold": args.threshold,
                        "baseline_gc": args.baseline_gc,
                        "load_generator": "wrk -t1 --latency",
                    },
                    "runs": {str(c): by_target for c, by_target in runs.items()},
                    "summary": summary,
                    "service_metrics_health_requests": counted,
                    "noisy_runs": noisy,
                    "passed": passed,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"figures written to {args.json}")
    if not passed and args.strict:
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the servers' stop()

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    try:
        return benchmark(args)
    except BenchError as error:
        say(f"bench: {error}")
        return 2
    except KeyboardInterrupt:
        say("bench: interrupted; servers stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
