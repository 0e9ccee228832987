"""
C{/health}, C{/livez}, C{/readyz}, C{/} and C{/metrics}.

The three probes are answered by L{FrontResource} before Klein sees the request:
load balancers, kubelets and monitors call them far more often than anything
else, and Werkzeug's routing would double their cost.  They still go through
the site, so each is request-id'd, access-logged and counted like any route.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from klein import Klein
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from optiinfra import __version__
from optiinfra.readiness import Readiness
from optiinfra.timefmt import go_duration, rfc3339
from optiinfra.web.app import route
from optiinfra.web.render import render_error, render_json

SERVICE_NAME = "OptiInfra Orchestrator"

#: A probe's answer: status code and JSON body.
Answer = tuple[int, dict[str, Any]]

_PROBE_METHODS = (b"GET", b"HEAD")
_ALLOW = b"GET, HEAD"


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

    def by_path(self) -> Mapping[bytes, Callable[[], Answer]]:
        return {b"/health": self.health, b"/livez": self.live, b"/readyz": self.ready}


#: The paths L{FrontResource} answers itself (GET and HEAD).
PROBE_PATHS = ("/health", "/livez", "/readyz")


def _utf8(request: IRequest) -> bool:
    """Klein (Werkzeug) routes text: refuse what would not decode, in JSON."""
    try:
        for segment in request.postpath:
            segment.decode("utf-8")
        request.getRequestHostname().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class FrontResource(Resource):
    """The site's root: the probes directly, everything else through Klein."""

    isLeaf = True

    def __init__(self, probes: Probes, app: IResource) -> None:
        super().__init__()
        self._probes = probes.by_path()
        self._app = app

    def render(self, request: IRequest) -> Any:
        path = request.path
        probe = self._probes.get(path)
        if probe is None:
            if not _utf8(request):
                return render_error(
                    request,
                    400,
                    "invalid request",
                    field="path",
                    detail="the path and host must be UTF-8",
                )
            return self._app.render(request)
        request.route = path.decode()  # type: ignore[attr-defined]
        if request.method not in _PROBE_METHODS:
            request.setHeader(b"allow", _ALLOW)
            return render_error(request, 405, "method not allowed")
        status, payload = probe()
        return render_json(request, payload, status)


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
