"""Every response body is JSON: one place that serialises and sets the headers."""

from __future__ import annotations

from typing import Any

import orjson
from twisted.web.iweb import IRequest

_JSON = [b"application/json"]


def render_json(request: IRequest, payload: Any, status: int = 200) -> bytes:
    """
    Serialise C{payload}, set status, content type and length, return the body.

    An explicit length keeps twisted.web from using chunked encoding.
    """
    body = orjson.dumps(payload)
    request.setResponseCode(status)
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", _JSON)
    headers.setRawHeaders(b"content-length", [str(len(body)).encode("ascii")])
    return body


def render_error(request: IRequest, code: int, message: str, /, **fields: Any) -> bytes:
    """A JSON error: C{{"error": message, ...fields}} with the request id."""
    payload: dict[str, Any] = {"error": message}
    payload.update(fields)
    request_id = getattr(request, "request_id", None)
    if request_id is not None:
        payload.setdefault("request_id", request_id)
    return render_json(request, payload, code)
