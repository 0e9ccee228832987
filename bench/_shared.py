"""
What the bench scripts share, in two halves.

Servers (bench/baseline_*.py): the /health body and the listening loop.  The
body is computed per request exactly as the service computes it (clock read,
RFC 3339 timestamp with whole seconds, Go-style uptime, orjson, explicit
Content-Type and Content-Length), so the baselines differ from the service only
in what surrounds the handler: routing, request ids, metrics and the access log.
Deliberately a copy, not an import of C{optiinfra.web.health}: the baselines must
not change when the service does.

Harness (bench/health.py, bench/registry.py, bench/tasks.py): wrk (installed
if missing, run, parsed), CPU pinning, the noise check (L{CpuWindow}), servers
as child processes, plain HTTP requests, the machine's description and the
exit-status convention.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import http.client
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

# The baseline servers -------------------------------------------------------

VERSION = "0.1.0"
_JSON = [b"application/json"]


def go_duration(seconds: float) -> str:
    total = max(0, int(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def json_response(request: Any, body: bytes, code: int = 200) -> bytes:
    """Set the status and the headers the service sets on a JSON body."""
    request.setResponseCode(code)
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", _JSON)
    headers.setRawHeaders(b"content-length", [str(len(body)).encode("ascii")])
    return body


def health_body(request: Any, now: float, started: float) -> bytes:
    """Serialise the health payload and set the same headers the service sets."""
    body = orjson.dumps(
        {
            "status": "healthy",
            "timestamp": rfc3339(now),
            "version": VERSION,
            "uptime": go_duration(now - started),
        }
    )
    return json_response(request, body)


def parse_args(
    description: str,
    more: Callable[[argparse.ArgumentParser], object] | None = None,
) -> argparse.Namespace:
    """A baseline server's options; C{more} adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument(
        "--tune-gc",
        action="store_true",
        help="apply the service's GC tuning (gc.freeze, thresholds 20000/20/20)",
    )
    if more is not None:
        more(parser)
    return parser.parse_args()


def serve(site: Any, args: argparse.Namespace) -> None:
    """Listen on C{args.port} with C{site} (access log off) until SIGTERM."""
    from twisted.internet import reactor

    site.noisy = False
    # Site.log would format a combined-log line per request; a bare baseline
    # logs nothing.
    site.log = lambda request: None
    reactor.listenTCP(args.port, site, interface=args.interface)
    if args.tune_gc:

        def tune() -> None:
            gc.collect()
            gc.freeze()
            gc.set_threshold(20_000, 20, 20)

        reactor.callWhenRunning(tune)
    print(f"listening on {args.interface}:{args.port}", file=sys.stderr, flush=True)
    reactor.run()


# The harness ------------------------------------------------------------------

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
INTERFACE = "127.0.0.1"
#: The only variables of the caller's environment the servers see.
KEPT_VARIABLES = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")


class BenchError(Exception):
    """The benchmark cannot run; the message says why and what to do."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def add_timing_options(
    parser: argparse.ArgumentParser, *, run: str, rounds: str, warmup: str
) -> None:
    """--duration, --rounds and --warmup, each defaulting to its BENCH_ variable."""
    for flag, variable, default, what in (
        ("--duration", "BENCH_DURATION", 5, run),
        ("--rounds", "BENCH_ROUNDS", 3, rounds),
        ("--warmup", "BENCH_WARMUP", 2, warmup),
    ):
        parser.add_argument(
            flag,
            type=int,
            default=env_int(variable, default),
            help=f"{what} [{variable}, {default}]",
        )


def add_numbers(
    parser: argparse.ArgumentParser, options: dict[str, tuple[float, str]]
) -> None:
    """Numeric options, flag: (default, help); the type is the default's."""
    for flag, (default, text) in options.items():
        parser.add_argument(
            flag, type=type(default), default=default, help=f"{text} [{default:g}]"
        )


def add_run_options(parser: argparse.ArgumentParser, *, strict: str) -> None:
    """--strict (C{strict}: when it exits 1), --json, --no-pin and --no-install."""
    parser.add_argument(
        "--strict",
        action="store_true",
        help=f"exit 1 when {strict} (default: exit 0)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the servers and the load generators to separate CPUs",
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="fail instead of installing wrk with apt-get when it is missing",
    )


def table(
    title: str, columns: str, rows: Iterable[Sequence[Any]] = ()
) -> Callable[[Sequence[Any]], None]:
    """
    The one table printer of bench/: a blank line, C{title}, the header, a rule
    and C{rows}; it returns the printer of one more row, for rows that come one
    at a time.  C{columns} is "heading width|heading width|...": the first
    column is left-aligned, the others right-aligned; cells are text already
    formatted (floats get one decimal).
    """
    spec = [column.rpartition(" ") for column in columns.split("|")]
    (first, _, width), *rest = ((name, _, int(w)) for name, _, w in spec)
    header = f"  {first:<{width}}" + "".join(f"{n:>{w}}" for n, _, w in rest)
    print(f"\n{title}\n{header}\n  " + "-" * (len(header) - 2))

    def row(cells: Sequence[Any]) -> None:
        head, *more = (f"{c:.1f}" if isinstance(c, float) else str(c) for c in cells)
        line = "".join(f"{c:>{w}}" for c, (_, _, w) in zip(more, rest, strict=True))
        print(f"  {head:<{width}}{line}", flush=True)

    for cells in rows:
        row(cells)
    return row


def agent_call(
    server: Server, method: str, path: str, document: object = None
) -> tuple[int, Any]:
    """A JSON request to a bench server (the fast agent); status and JSON answer."""
    body = None if document is None else orjson.dumps(document)
    status, payload = http_request(server.port, method, path, body, timeout=30)
    return status, orjson.loads(payload) if payload else None


def counter(port: int, name: str, **labels: str) -> float:
    """The sum of metric C{name}'s samples with C{labels} on the service's page."""
    return sum(
        value
        for found, value in metric_samples(port, name)
        if all(found.get(k) == v for k, v in labels.items())
    )


def print_machine(what: str, info: dict[str, Any]) -> None:
    """The report's first line: what ran, on which machine, at which commit."""
    packages = "".join(
        f", {name.capitalize() if name != 'treq' else name} {info[name]}"
        for name in ("twisted", "klein", "treq")
        if name in info
    )
    print(
        f"\nOptiInfra {what} benchmark -- {info.get('cpu_model', 'unknown CPU')}, "
        f"Python {info['python']}{packages}, {info['pinning']}, "
        f"git {info.get('git', '?')}"
    )


def check(what: str, figure: str, met: bool, subject: str = "") -> dict[str, Any]:
    """One target of a benchmark: what it asks, the figure measured, met or not."""
    return {"subject": subject, "what": what, "figure": figure, "met": bool(met)}


def noise_warning(noisy: int, runs: int, more: str = ", or with more --rounds") -> None:
    if noisy:
        print(
            f"warning: {noisy} of {runs} runs had other load above "
            f"{NOISE_LIMIT:.0%} of a benchmark CPU (see the per-run lines): the "
            f"machine was not quiet; rerun when it is{more}."
        )


def finish(
    args: argparse.Namespace,
    checks: Sequence[dict[str, Any]],
    figures: dict[str, Any],
    machine: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> int:
    """
    The one ending and report shape of every benchmark: a PASS/FAIL line per
    check, the verdict, and with --json FILE the report C{{machine, config,
    figures, checks, passed}}.  The exit status is 1 on FAIL only with --strict.
    """
    print()
    for c in checks:
        subject = f"{c['subject']:<11}" if c["subject"] else ""
        print(
            f"  {'PASS' if c['met'] else 'FAIL'}  {subject}{c['what']}: {c['figure']}"
        )
    missed = [
        f"{c['subject'] + ' ' if c['subject'] else ''}{c['what']} ({c['figure']})"
        for c in checks
        if not c["met"]
    ]
    print()
    if missed:
        print(
            f"FAIL: {len(missed)} of {len(checks)} targets missed: " + "; ".join(missed)
        )
    else:
        print(f"PASS: every target met ({len(checks)} checks)")
    if args.json:
        report = {
            "machine": machine,
            "config": config,
            "figures": figures,
            "checks": list(checks),
            "passed": not missed,
        }
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"figures written to {args.json}")
    return 1 if missed and args.strict else 0


def median(runs: Sequence[dict[str, Any]], key: str) -> float:
    """The median of C{key} over the runs that have it; NaN for none."""
    values = [run[key] for run in runs if run.get(key) is not None]
    return float(statistics.median(values)) if values else float("nan")


def rotated(items: Sequence[Any], number: int) -> Sequence[Any]:
    """C{items} starting at the C{number}th: round C{number}'s order of targets."""
    shift = number % len(items)
    return [*items[shift:], *items[:shift]]


def percentile(values: Sequence[float], share: float) -> float:
    """The value C{share} (0.99: p99) of the way up C{values}; NaN for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"{name}={value!r} is not a whole number") from None


def connection_list(text: str) -> list[int]:
    """C{"1,50"} -> C{[1, 50]}, for an argparse C{type=}."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected numbers like 1,50"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers like 1,50")
    return values


def base_environment() -> dict[str, str]:
    """
    A clean environment for a server: the service's settings (DATABASE_URL,
    API_KEYS_FILE, ENVIRONMENT, NOTIFY_SOCKET ...) must not leak in from the
    caller's shell; PYTHONPATH is the source tree, not an installed copy.
    """
    env = {key: os.environ[key] for key in KEPT_VARIABLES if key in os.environ}
    env["PYTHONPATH"] = str(REPO)
    return env


def guarded(run: Callable[[], int]) -> int:
    """
    Run a benchmark: SIGTERM/SIGHUP unwind like Ctrl-C (so servers are
    stopped), L{BenchError} is exit status 2, an interrupt 130.
    """

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the servers' stop()

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    try:
        return run()
    except BenchError as error:
        say(f"bench: {error}")
        return 2
    except KeyboardInterrupt:
        say("bench: interrupted; servers stopped")
        return 130


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


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    timeout: float = 10.0,
    connection: http.client.HTTPConnection | None = None,
) -> tuple[int, bytes]:
    """
    One request to 127.0.0.1:C{port}, a JSON body when C{body} is given; on
    C{connection} (kept open, for many requests in a row) or a fresh one.
    """
    own = connection is None
    if connection is None:
        connection = http.client.HTTPConnection(INTERFACE, port, timeout=timeout)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        if own:
            connection.close()


def clock_ticks() -> int:
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
    #: The real service: its stdout is its JSON log, worth showing on failure.
    service: bool = False
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
        if self.service and self.stdout.name != os.devnull:
            self.stdout.flush()
            with contextlib.suppress(OSError):
                text = Path(self.stdout.name).read_text(errors="replace")
                lines += [f"  log: {line}" for line in text.splitlines()[-10:]]
        elif self.service:
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
        return (int(fields[11]) + int(fields[12])) / clock_ticks()

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


def service_server(
    name: str,
    cpus: Sequence[str],
    env: dict[str, str],
    workdir: Path,
    stdout: IO[bytes],
) -> Server:
    """The service under twistd on a free port, run on C{cpus} (taskset)."""
    port = free_port()
    return Server(
        name=name,
        argv=[*cpus, *service_argv(port)],
        env=env,
        cwd=workdir,
        stdout=stdout,
        stderr_path=workdir / f"{name}.stderr",
        port=port,
        service=True,
    )


def script_server(
    name: str,
    cpus: Sequence[str],
    script: str,
    workdir: Path,
    devnull: IO[bytes],
    *args: str,
) -> Server:
    """A server in C{bench/script} (a baseline, the fast agent) on a free port."""
    port = free_port()
    return Server(
        name=name,
        argv=[*cpus, sys.executable, str(BENCH / script), "--port", str(port), *args],
        env=base_environment(),
        cwd=workdir,
        stdout=devnull,
        stderr_path=workdir / f"{name}.stderr",
        port=port,
    )


def with_service_env(env: dict[str, str], assignments: Sequence[str]) -> dict[str, str]:
    """C{env} with the --service-env NAME=VALUE assignments over it."""
    merged = dict(env)
    for assignment in assignments:
        key, _, value = assignment.partition("=")
        merged[key] = value
    return merged


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


def service_argv(port: int) -> list[str]:
    """The service as production starts it, on 127.0.0.1:C{port}."""
    return [
        find_twistd(),
        "-n",
        "--pidfile=",
        "optiinfra",
        "--port",
        f"tcp:{port}:interface={INTERFACE}",
    ]


def metric_samples(
    port: int, name: str, timeout: float = 2.0
) -> list[tuple[dict[str, str], float]]:
    """
    The samples of metric C{name} on the service's C{/metrics}, as
    (labels, value); empty when the page cannot be read.
    """
    try:
        status, body = http_get(port, "/metrics", timeout=timeout)
    except OSError:
        return []
    if status != 200:
        return []
    samples = []
    for line in body.decode("utf-8", "replace").splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', head))
        samples.append((labels, float(value)))
    return samples


# Measuring ----------------------------------------------------------------


@dataclass
class CpuWindow:
    """
    CPU use over a stretch of a run, on the two benchmark CPUs: the share the
    servers (on the server CPU) used, and what anything else used on each CPU
    beyond our own processes -- other processes, the hypervisor's steal.  Our
    own processes on the load CPU are C{load} (long-running, like an agent) and
    every child reaped meanwhile (a wrk run).

        window = CpuWindow(pinning, [server]); window.start()
        ...
        usage = window.stop()   # server_cpu, other_on_server_cpu, noisy ...
    """

    pinning: Pinning
    servers: Sequence[Server]
    load: Sequence[Server] = ()
    _ticks: dict[int, int] = field(default_factory=dict, repr=False)
    _children: Any = field(default=None, repr=False)
    _server_cpu: float = field(default=0.0, repr=False)
    _load_cpu: float = field(default=0.0, repr=False)
    _wall: float = field(default=0.0, repr=False)

    def start(self) -> None:
        self._ticks = busy_ticks()
        self._children = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._server_cpu = sum(server.cpu_seconds() for server in self.servers)
        self._load_cpu = sum(process.cpu_seconds() for process in self.load)
        self._wall = time.monotonic()

    def stop(self) -> dict[str, Any]:
        wall = time.monotonic() - self._wall
        cpu = sum(server.cpu_seconds() for server in self.servers) - self._server_cpu
        load_cpu = sum(process.cpu_seconds() for process in self.load) - self._load_cpu
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        ticks = busy_ticks()
        before = self._children
        reaped = (
            children.ru_utime + children.ru_stime - before.ru_utime - before.ru_stime
        )

        def other(cpu_id: int | None, own: float) -> float | None:
            if cpu_id is None or cpu_id not in self._ticks or not wall:
                return None
            used = (ticks[cpu_id] - self._ticks[cpu_id]) / clock_ticks()
            return max(0.0, (used - own) / wall)

        usage: dict[str, Any] = {
            "wall_s": wall,
            "server_cpu_s": cpu,
            "server_cpu": cpu / wall if wall else float("nan"),
            "load_cpu_s": load_cpu + reaped,
            # What else ran on the two CPUs (other processes, the hypervisor's
            # steal):
            "other_on_server_cpu": other(self.pinning.server_cpu, cpu),
            "other_on_load_cpu": other(self.pinning.load_cpu, load_cpu + reaped),
        }
        usage["noisy"] = any(
            share is not None and share > NOISE_LIMIT
            for share in (usage["other_on_server_cpu"], usage["other_on_load_cpu"])
        )
        return usage


def run_wrk(
    wrk: str,
    pinning: Pinning,
    server: Server,
    connections: int,
    seconds: int,
    path: str = "/health",
    script: Path | None = None,
    script_args: Sequence[str] = (),
    load_processes: Sequence[Server] = (),
) -> dict[str, Any]:
    """
    One wrk run against C{server}: its figures, the server's CPU share and CPU
    per request, and what else ran on the two CPUs meanwhile (besides wrk and
    C{load_processes}, ours on the load CPU).
    """
    command = [
        *pinning.load,
        wrk,
        "-t1",  # one load-generator thread: it has one CPU
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        "--latency",
        *(["-s", str(script)] if script is not None else []),
        f"http://{INTERFACE}:{server.port}{path}",
        *(["--", *script_args] if script_args else []),
    ]
    window = CpuWindow(pinning, [server], load_processes)
    window.start()
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 60
    )
    usage = window.stop()
    if result.returncode != 0:
        raise BenchError(
            f"wrk failed (status {result.returncode}): "
            f"{(result.stderr or result.stdout).strip()}"
        )
    figures = parse_wrk(result.stdout)
    figures["server_cpu"] = usage["server_cpu"]
    figures["cpu_us_per_request"] = (
        usage["server_cpu_s"] / figures["requests"] * 1e6
        if figures["requests"]
        else float("nan")
    )
    for key in ("other_on_server_cpu", "other_on_load_cpu", "noisy"):
        figures[key] = usage[key]
    return figures


def noise_note(figures: dict[str, Any]) -> str:
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


def machine_info(
    pinning: Pinning, packages: Sequence[str] = ("twisted", "klein")
) -> dict[str, Any]:
    import importlib.metadata

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
    for package in packages:
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
