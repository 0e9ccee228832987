"""
The site's root: the hottest routes answered directly, everything else by Klein.

Werkzeug's routing and Klein's rendering cost about as much per request as the
rest of twisted.web together.  Probes (hit by every load balancer and monitor)
and agent heartbeats (thousands a second) skip them: a small table of templates
matched with one regular expression each.  They still pass through the site, so
each is request-id'd, access-logged and counted, and errors are rendered by the
same L{render_failure} Klein uses.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from typing import Any, cast
from urllib.parse import unquote_to_bytes

import attrs
import structlog
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from optiinfra.errors import InvalidField
from optiinfra.web.render import render_error

_log = structlog.get_logger("optiinfra.web")

_PLACEHOLDER = re.compile(r"\{(\w+)\}")

Handler = Callable[..., Any]
FailureRenderer = Callable[[IRequest, Failure], bytes]


@attrs.frozen
class _Route:
    template: str
    pattern: re.Pattern[bytes]
    handlers: dict[bytes, Handler]


class FastRoutes:
    """Templates and their handlers, by method, for L{FrontResource}."""

    def __init__(self) -> None:
        self._routes: dict[str, _Route] = {}

    def add(self, template: str, methods: tuple[str, ...], handler: Handler) -> None:
        route = self._routes.get(template)
        if route is None:
            regex = "".join(
                f"(?P<{part}>[^/]+)" if index % 2 else re.escape(part)
                for index, part in enumerate(_PLACEHOLDER.split(template))
            )
            route = _Route(template, re.compile(regex.encode()), {})
            self._routes[template] = route
        for method in methods:
            route.handlers[method.encode()] = handler

    def match(self, path: bytes) -> tuple[_Route, dict[str, bytes]] | None:
        for route in self._routes.values():
            found = route.pattern.fullmatch(path)
            if found is not None:
                return route, found.groupdict()
        return None

    @property
    def templates(self) -> dict[str, tuple[str, ...]]:
        """Each template and its methods (for documentation and tests)."""
        return {
            t: tuple(m.decode() for m in r.handlers) for t, r in self._routes.items()
        }


def _utf8(request: IRequest) -> bool:
    """Klein (Werkzeug) routes text: refuse what would not decode, in JSON."""
    try:
        for segment in request.postpath:
            segment.decode("utf-8")
        request.getRequestHostname().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _values(raw: dict[str, bytes]) -> dict[str, str]:
    try:
        return {key: value.decode("utf-8") for key, value in raw.items()}
    except UnicodeDecodeError:
        raise InvalidField("path", "the path must be UTF-8") from None


class FrontResource(Resource):
    """The fast routes first; Klein (C{app}) for everything else."""

    isLeaf = True

    def __init__(
        self, routes: FastRoutes, app: IResource, render_failure: FailureRenderer
    ) -> None:
        super().__init__()
        self._routes = routes
        self._app = app
        self._render_failure = render_failure

    def render(self, request: IRequest) -> Any:
        # Matched on the decoded path, as Werkzeug does (so %2F is a slash).
        found = self._routes.match(unquote_to_bytes(request.path))
        if found is None:
            if b"//" in request.path:
                # An empty segment names nothing.  Klein would drop a leading
                # one and Werkzeug redirect for the others; the fast routes
                # never match either: one answer for every path and dialect.
                return render_error(request, 404, "not found")
            if not _utf8(request):
                return render_error(
                    request,
                    400,
                    "invalid request",
                    field="path",
                    detail="the path and host must be UTF-8",
                )
            return self._app.render(request)
        route, raw = found
        request.route = route.template  # type: ignore[attr-defined]
        method = request.method
        handler = route.handlers.get(b"GET" if method == b"HEAD" else method)
        if handler is None:
            allowed = sorted({m.decode() for m in route.handlers} | _head(route))
            request.setHeader(b"allow", ", ".join(allowed).encode())
            return render_error(request, 405, "method not allowed")
        try:
            result = handler(request, **_values(raw))
        except Exception:
            return self._render_failure(request, Failure())
        if not isinstance(result, Coroutine | Deferred):
            return result
        answer: Deferred[bytes] = ensureDeferred(result)
        answer.addErrback(lambda failure: self._render_failure(request, failure))
        gone: list[bool] = []

        def lost(_: Failure) -> None:
            gone.append(True)
            answer.cancel()  # like Klein: a dropped connection cancels the work

        cast(Request, request).notifyFinish().addErrback(lost)

        def write(body: bytes) -> None:
            if not gone:
                request.write(body)
                request.finish()

        answer.addCallback(write).addErrback(
            lambda failure: _log.error(
                "could not write an answer", error=failure.getErrorMessage()
            )
        )
        return NOT_DONE_YET


def _head(route: _Route) -> set[str]:
    return {"HEAD"} if b"GET" in route.handlers else set()
