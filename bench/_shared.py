"""
What the two baseline servers share: the /health body and the listening loop.

The body is computed per request exactly as the service computes it (clock read,
RFC 3339 timestamp with whole seconds, Go-style uptime, orjson, explicit
Content-Type and Content-Length), so the baselines differ from the service only in
what surrounds the handler: routing, request ids, metrics and the access log.

Deliberately a copy, not an import of C{optiinfra.web.health}: the baselines must
not change when the service does.
"""

from __future__ import annotations

import argparse
import gc
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

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
    request.setResponseCode(200)
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", _JSON)
    headers.setRawHeaders(b"content-length", [str(len(body)).encode("ascii")])
    return body


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument(
        "--tune-gc",
        action="store_true",
        help="apply the service's GC tuning (gc.freeze, thresholds 20000/20/20)",
    )
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
