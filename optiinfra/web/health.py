"""C{/health}, C{/}, C{/livez}, C{/readyz} and C{/metrics}."""

from __future__ import annotations

from datetime import UTC, datetime

from klein import Klein
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from optiinfra import __version__
from optiinfra.readiness import Readiness
from optiinfra.web.app import route
from optiinfra.web.render import render_json

SERVICE_NAME = "OptiInfra Orchestrator"


def go_duration(seconds: float) -> str:
    """Whole seconds in Go's C{time.Duration} style: C{5s}, C{5m30s}, C{2h0m5s}."""
    total = max(0, int(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def rfc3339(seconds: float) -> str:
    """A UTC time as RFC 3339 with whole seconds, as the Go prototype printed it."""
    return datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def mount(
    app: Klein,
    *,
    clock: IReactorTime,
    started: float,
    readiness: Readiness,
    registry: CollectorRegistry,
) -> None:
    """Add the service's own routes to C{app}."""

    index = {"service": SERVICE_NAME, "version": __version__, "status": "running"}

    @route(app, "/health", ("GET",))
    def health(request: IRequest) -> bytes:
        now = clock.seconds()
        return render_json(
            request,
            {
                "status": "healthy",
                "timestamp": rfc3339(now),
                "version": __version__,
                "uptime": go_duration(now - started),
            },
        )

    @route(app, "/", ("GET",))
    def root(request: IRequest) -> bytes:
        return render_json(request, index)

    @route(app, "/livez", ("GET",))
    def livez(request: IRequest) -> bytes:
        return render_json(request, {"status": "alive"})

    @route(app, "/readyz", ("GET",))
    def readyz(request: IRequest) -> bytes:
        if readiness.ready:
            return render_json(request, {"status": "ready"})
        return render_json(
            request, {"status": "not ready", "reasons": readiness.reasons()}, 503
        )

    @route(app, "/metrics", ("GET",))
    def metrics(request: IRequest) -> bytes:
        body = generate_latest(registry)
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        request.setHeader(b"content-length", str(len(body)).encode())
        return body
