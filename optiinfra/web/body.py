"""Reading a request's JSON body: the content type, the bytes, the parse."""

from __future__ import annotations

from typing import Any

import orjson
from twisted.web.iweb import IRequest

from optiinfra import exactjson
from optiinfra.errors import InvalidField


def read_json(request: IRequest, *, optional: bool = False) -> Any:
    """
    The request's body as parsed JSON.

    A body that is sent must be JSON (C{application/json} or C{+json}, or no
    content type at all); C{optional} allows an empty one, read as C{{}}.
    The size cap is enforced earlier, while the body arrives.
    """
    kind = request.getHeader(b"content-type")
    if kind is not None:
        media = kind.split(b";", 1)[0].strip().lower()
        if media != b"application/json" and not media.endswith(b"+json"):
            raise InvalidField("content-type", "must be application/json", status=415)
    content = request.content
    raw = content.read() if content is not None else b""
    if not raw.strip():
        if optional:
            return {}
        raise InvalidField("body", "a JSON object is required")
    try:
        return exactjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise InvalidField("body", f"is not valid JSON: {error}") from None
    except exactjson.NotExact as error:
        raise InvalidField(
            error.field or "body", f"cannot be kept exactly: {error}"
        ) from None
