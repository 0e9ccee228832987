"""
GET /health throughput and latency: the service against two baselines.

    python bench/health.py                 # 3 rounds x 5 s per run, ~2 minutes
    python bench/health.py --quick         # 1 round x 2 s, ~20 s
    python bench/health.py --json out.json --strict

What runs, each phase, the figures and the exit statuses: bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

from _shared import (
    Pinning,
    Server,
    add_run_options,
    add_timing_options,
    base_environment,
    check,
    choose_cpus,
    connection_list,
    ensure_wrk,
    finish,
    guarded,
    http_get,
    machine_info,
    median,
    metric_samples,
    noise_note,
    noise_warning,
    print_machine,
    rotated,
    run_wrk,
    say,
    script_server,
    service_server,
    table,
    with_service_env,
)

TARGETS = ("service", "klein", "web")
LABELS = {
    "service": "service (twistd optiinfra)",
    "klein": "bare Klein",
    "web": "plain twisted.web",
}
COLUMNS = "target 28|req/s 9|p50 11|p99 11|CPU/req 11|errors 8"
HEALTH_KEYS = {"status", "timestamp", "version", "uptime"}


# Options ------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="GET /health throughput and p50/p99 latency: the service "
        "against a bare Klein app and a plain twisted.web Resource, interleaved.",
        epilog="Environment defaults: BENCH_DURATION, BENCH_ROUNDS, BENCH_WARMUP, "
        "BENCH_CONNECTIONS (flags win).  Exit status is 0 after a completed run "
        "even on FAIL unless --strict is given; 2 if the benchmark could not run.",
    )
    add_timing_options(
        parser,
        run="seconds per measured run",
        rounds="interleaved rounds; the median is reported",
        warmup="seconds of unmeasured load per target first (0: none)",
    )
    parser.add_argument(
        "--connections",
        type=connection_list,
        default=connection_list(os.environ.get("BENCH_CONNECTIONS", "1,50")),
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
    add_run_options(parser, strict="the service misses the target")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 2, 1
    if args.duration < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--duration and --rounds must be >= 1, --warmup >= 0")
    return args


# Servers ------------------------------------------------------------------


def build_servers(
    args: argparse.Namespace,
    pinning: Pinning,
    workdir: Path,
    service_log: IO[bytes],
    devnull: IO[bytes],
) -> dict[str, Server]:
    env = base_environment()  # no settings leak in from the caller's shell
    env["LOG_LEVEL"] = "info"  # the access log is on, as in production
    env["STATE_DIR"] = str(workdir / "var")  # a throw-away SQLite store
    gc_flag = ["--tune-gc"] if args.baseline_gc == "tuned" else []
    cpus = pinning.server
    servers = {
        "service": service_server(
            "service",
            cpus,
            with_service_env(env, args.service_env),
            workdir,
            service_log,
        ),
        "klein": script_server(
            "klein", cpus, "baseline_klein.py", workdir, devnull, *gc_flag
        ),
        "web": script_server(
            "web", cpus, "baseline_web.py", workdir, devnull, *gc_flag
        ),
    }
    return {name: servers[name] for name in TARGETS}


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
    counts = [
        value
        for labels, value in metric_samples(
            server.port, "optiinfra_http_requests_total"
        )
        if labels.get("route") == "/health"
    ]
    return sum(counts) if counts else None


# Measuring ----------------------------------------------------------------


def summarise(
    runs: dict[int, dict[str, list[dict[str, Any]]]], threshold: float
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for connections, by_target in runs.items():
        medians = {
            name: {
                key: median(target_runs, key)
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
        plural = "s" if args.rounds > 1 else ""
        table(
            f"GET /health, {connections} {noun} "
            f"(median of {args.rounds} round{plural} x {args.duration} s)",
            COLUMNS,
            (
                (
                    LABELS[name],
                    f"{m['rps']:,.0f}",
                    f"{m['p50_ms']:.2f} ms",
                    f"{m['p99_ms']:.2f} ms",
                    f"{m['cpu_us_per_request']:.0f} us",
                    m["errors"],
                )
                for name in TARGETS
                for m in [block["median"][name]]
            ),
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
        for connections in args.connections:
            for name in rotated(TARGETS, number):
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
                    + noise_note(figures)
                    + (f"  ERRORS {figures['errors']}" if figures["errors"] else "")
                )
    info["loadavg_after"] = os.getloadavg()
    counted = counted_health_requests(servers["service"])

    summary = summarise(runs, args.threshold)
    print_machine("/health", info)
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
    noise_warning(noisy, len(all_runs))
    checks = [
        check(
            f"service >= {args.threshold:g}x bare Klein throughput at {c} conn",
            f"{block['service_over_klein']:.2f}x",
            block["meets_target"],
        )
        for c, block in summary.items()
    ]
    config = {
        "duration_s": args.duration,
        "rounds": args.rounds,
        "warmup_s": args.warmup,
        "connections": args.connections,
        "threshold": args.threshold,
        "baseline_gc": args.baseline_gc,
        "load_generator": "wrk -t1 --latency",
    }
    figures = {
        "runs": {str(c): by_target for c, by_target in runs.items()},
        "summary": summary,
        "service_metrics_health_requests": counted,
        "noisy_runs": noisy,
    }
    return finish(args, checks, figures, info, config)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return guarded(lambda: benchmark(args))


if __name__ == "__main__":
    sys.exit(main())
