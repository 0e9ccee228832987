"""
C{/health}, C{/livez}, C{/readyz}, C{/} and C{/metrics}.

The three probes are answered on the fast routes, in front of Klein: load
balancers, kubelets and monitors call them far more often than anything else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from klein import Klein
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from optiinfra import __version__
from optiinfra.readiness import Readiness
from optiinfra.timefmt import go_duration, rfc3339
from optiinfra.web.app import route
from optiinfra.web.front import FastRoutes
from optiinfra.web.render import render_json

SERVICE_NAME = "OptiInfra Orchestrator"

#: A probe's answer: status code and JSON body.
Answer = tuple[int, dict[str, Any]]


class Probes:
    """What the probes say, from the clock and the readiness."""

    def __init__(self, clock: IReactorTime, readiness: Readiness) -> None:
        self._clock = clock
        self._readiness = readiness
        self._started = clock.seconds()

    def health(self) -> Answer:
        now = self._clock.seconds()
        return 200, {
            "status": "healthy",
            "timestamp": rfc3339(now),
            "version": __version__,
            "uptime": go_duration(now - self._started),
        }

    def live(self) -> Answer:
        return 200, {"status": "alive"}

    def ready(self) -> Answer:
        if self._readiness.ready:
            return 200, {"status": "ready"}
        return 503, {"status": "not ready", "reasons": self._readiness.reasons()}


#: The paths answered in front of Klein.
PROBE_PATHS = ("/health", "/livez", "/readyz")


def mount_probes(routes: FastRoutes, probes: Probes) -> None:
    """The probes, on the fast routes."""

    def answer(probe: Callable[[], Answer]) -> Callable[[IRequest], bytes]:
        def render(request: IRequest) -> bytes:
            status, payload = probe()
            return render_json(request, payload, status)

        return render

    for path, probe in zip(
        PROBE_PATHS, (probes.health, probes.live, probes.ready), strict=True
    ):
        routes.add(path, ("GET",), answer(probe))


def mount(app: Klein, *, registry: CollectorRegistry) -> None:
    """Add C{/} and C{/metrics} to C{app}."""

    index = {"service": SERVICE_NAME, "version": __version__, "status": "running"}

    @route(app, "/", ("GET",))
    def root(request: IRequest) -> bytes:
        return render_json(request, index)

    @route(app, "/metrics", ("GET",))
    def metrics(request: IRequest) -> bytes:
        body = generate_latest(registry)
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        request.setHeader(b"content-length", str(len(body)).encode())
        return body
