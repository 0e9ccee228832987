"""C{/health}, C{/}, C{/livez}, C{/readyz} and C{/metrics}."""

from __future__ import annotations

from klein import Klein
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from optiinfra import __version__
from optiinfra.readiness import Readiness
from optiinfra.timefmt import go_duration, rfc3339
from optiinfra.web.app import route
from optiinfra.web.render import render_json

SERVICE_NAME = "OptiInfra Orchestrator"


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
