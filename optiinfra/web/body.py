"""Reading a request's JSON body: the content type, the bytes, the parse, the shape."""

from __future__ import annotations

from typing import Any, Final

import orjson
from twisted.web.iweb import IRequest

from optiinfra import exactjson
from optiinfra.errors import InvalidField

#: How deep a body's arrays and objects may nest.  Nothing in the API needs more
#: than a few levels; the limit keeps every document far below the depth
#: orjson can encode again (254) when it is stored, compared or answered.
MAX_DEPTH: Final = 64

_CONTAINERS: Final = (dict, list)


def read_json(request: IRequest, *, optional: bool = False) -> Any:
    """
    The request's body as parsed JSON.

    A body that is sent must be JSON (C{application/json} or C{+json}, or no
    content type at all); C{optional} allows an empty one, read as C{{}}.
    It may nest at most L{MAX_DEPTH} levels, and its integers must fit in 64
    bits: anything else is refused with a 400 naming the field, rather than
    failing later or being changed on the way to the store.
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
        document = exactjson.loads(raw)
    except orjson.JSONDecodeError as error:
        if str(error).startswith("depth limit exceeded"):
            raise InvalidField(
                "body", f"must not nest more than {MAX_DEPTH} levels deep"
            ) from None
        raise InvalidField("body", f"is not valid JSON: {error}") from None
    except exactjson.NotExact as error:
        raise InvalidField(
            error.field or "body", f"cannot be kept exactly: {error}"
        ) from None
    # A cheap test on the bytes first: most bodies hold fewer than MAX_DEPTH
    # brackets.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH:
        _check_depth(document)
    return document


def _check_depth(document: Any) -> None:
    """Refuse C{document} if it nests too deep, naming the top-level field."""
    if type(document) is dict:
        tops: Any = document.items()
    elif type(document) is list:
        tops = enumerate(document)
    else:
        return
    for key, child in tops:
        level = [child] if type(child) in _CONTAINERS else []
        depth = 1
        while level:
            if depth == MAX_DEPTH:
                raise InvalidField(
                    _name("", key), f"must not nest more than {MAX_DEPTH} levels deep"
                )
            level = [
                inner
                for value in level
                for inner in (value.values() if type(value) is dict else value)
                if type(inner) in _CONTAINERS
            ]
            depth += 1


def _name(path: str, key: object) -> str:
    """A field's name the way the validators write it: C{a.b[2].c}."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)
