"""
The Klein application: shared error handling and the one way routes are declared.

Routes are declared with L{route}, which takes a template such as
C{/agents/{id}}: the same string names the route in metrics and access logs and is
turned into Werkzeug's C{<id>} syntax for matching.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import structlog
from klein import Klein
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import RequestRedirect

from optiinfra.errors import Conflict, InvalidField, NotFound, Overloaded
from optiinfra.store.interface import StoreUnavailable
from optiinfra.web.front import FastRoutes
from optiinfra.web.guard import Forbidden, Unauthenticated
from optiinfra.web.render import render_error

#: Seconds a client should wait before retrying when the store is down.
RETRY_AFTER = b"5"

Handler = TypeVar("Handler", bound=Callable[..., Any])

_PLACEHOLDER = re.compile(r"\{(\w+)\}")

_log = structlog.get_logger("optiinfra.web")


def route(
    app: Klein,
    template: str,
    methods: Iterable[str] = ("GET",),
    fast: FastRoutes | None = None,
) -> Callable[[Handler], Handler]:
    """
    Declare C{handler} for C{template} and C{methods} on C{app}, and on the
    C{fast} routes too when given (for the few hottest routes).

    The handler is called as C{handler(request, **path_values)} after the request
    has been labelled with C{template}.  A placeholder named like a converter
    of C{app}'s URL map (C{agent_id}) matches only what that converter does.
    """
    methods = tuple(methods)
    converters = app.url_map.converters
    pattern = _PLACEHOLDER.sub(
        lambda m: f"<{m[1]}:{m[1]}>" if m[1] in converters else f"<{m[1]}>",
        template,
    )

    def decorator(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def labelled(request: IRequest, **values: Any) -> Any:
            request.route = template  # type: ignore[attr-defined]
            return handler(request, **values)

        app.route(
            pattern,
            methods=list(methods),
            endpoint=f"{','.join(methods)} {template}",
        )(labelled)
        if fast is not None:
            fast.add(template, methods, handler)
        return handler

    return decorator


def render_failure(request: IRequest, failure: Failure) -> bytes:
    """
    The JSON answer for whatever a handler raised: routing errors, the domain's
    errors, a lost store, and last an unexpected exception (500, traceback logged
    with the request id, never sent).
    """
    error = failure.value
    if isinstance(error, RequestRedirect):
        # No route redirects today (see new_app); should one, it says where to.
        request.setHeader(b"location", error.new_url.encode("utf-8"))
    if isinstance(error, HTTPException):
        code = error.code or 500
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            request.setHeader(b"allow", ", ".join(sorted(error.valid_methods)).encode())
        message = {404: "not found", 405: "method not allowed"}.get(
            code, (error.name or "error").lower()
        )
        return render_error(request, code, message)
    if isinstance(error, InvalidField):
        return render_error(
            request,
            error.status,
            "invalid request",
            field=error.field,
            detail=error.detail,
        )
    if isinstance(error, NotFound):
        return render_error(request, 404, error.message, **error.fields)
    if isinstance(error, Conflict):
        return render_error(request, 409, error.message, **error.fields)
    if isinstance(error, Overloaded):
        request.setHeader(b"retry-after", b"%d" % error.retry_after)
        extra = {} if error.field is None else {"field": error.field}
        return render_error(request, 429, error.message, **extra, **error.fields)
    if isinstance(error, Unauthenticated):
        request.setHeader(b"www-authenticate", b'Bearer realm="optiinfra"')
        return render_error(
            request, 401, "an API key is required (Authorization: Bearer or X-API-Key)"
        )
    if isinstance(error, Forbidden):
        return render_error(request, 403, str(error))
    if isinstance(error, StoreUnavailable):
        _log.warn(
            "store unavailable",
            request_id=getattr(request, "request_id", None),
            error=failure.getErrorMessage(),
        )
        request.setHeader(b"retry-after", RETRY_AFTER)
        return render_error(request, 503, "storage unavailable, try again later")
    _log.error(
        "unhandled error while answering a request",
        request_id=getattr(request, "request_id", None),
        method=request.method.decode("latin-1"),
        path=request.path.decode("latin-1", "replace"),
        exception=failure.getTraceback(),
    )
    return render_error(request, 500, "internal error")


def new_app() -> Klein:
    """
    A Klein app whose every error, routing ones included, is a JSON body.

    Werkzeug would answer C{//agents//register} with a redirect to the path
    with its slashes merged, a redirect a POST cannot follow safely and one
    the fast routes in front of Klein never make: such a path is a 404 here,
    in both dialects alike.
    """
    app = Klein()
    app.url_map.merge_slashes = False
    app.handle_errors(Exception)(render_failure)
    return app
