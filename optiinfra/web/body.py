"""Reading a request's JSON body: the content type, the bytes, the parse, the shape."""

from __future__ import annotations

import json
from typing import Any, Final

import orjson
from twisted.web.iweb import IRequest

from optiinfra.errors import InvalidField

#: How deep a body's arrays and objects may nest.  Nothing in the API needs more
#: than a few levels; the limit keeps every document far below the depth
#: orjson can encode again (254) when it is stored, compared or answered.
MAX_DEPTH: Final = 64

#: The integers orjson keeps exactly; beyond them it silently parses a float.
_SMALLEST_INT: Final = -(2**63)
_LARGEST_INT: Final = 2**64 - 1
#: A float at least this large may have been an integer literal orjson widened.
_SUSPECT_FLOAT: Final = float(2**63)


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
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        if str(error).startswith("depth limit exceeded"):
            raise InvalidField(
                "body", f"must not nest more than {MAX_DEPTH} levels deep"
            ) from None
        raise InvalidField("body", f"is not valid JSON: {error}") from None
    if _has_suspect(document):
        _refuse_wide_integers(raw)
    return document


def _has_suspect(document: Any) -> bool:
    """
    Walk C{document} once: refuse it if it nests too deep, and say whether
    it holds a float large enough to have been a widened integer.
    """
    suspect = False
    stack: list[tuple[Any, int, str]] = [(document, 0, "body")]
    while stack:
        value, depth, top = stack.pop()
        if isinstance(value, dict):
            children: Any = value.items()
        elif isinstance(value, list):
            children = enumerate(value)
        else:
            if isinstance(value, float) and abs(value) >= _SUSPECT_FLOAT:
                suspect = True
            continue
        if depth == MAX_DEPTH:
            raise InvalidField(top, f"must not nest more than {MAX_DEPTH} levels deep")
        for key, child in children:
            if isinstance(child, dict | list | float):
                stack.append((child, depth + 1, top if depth else _name("", key)))
    return suspect


class _WideInteger:
    """An integer literal orjson would have turned into a float."""

    __slots__ = ()


_WIDE: Final = _WideInteger()


def _exact_int(literal: str) -> int | _WideInteger:
    if len(literal) > 21:  # also spares int() Python's 4,300-digit refusal
        return _WIDE
    value = int(literal)
    return value if _SMALLEST_INT <= value <= _LARGEST_INT else _WIDE


def _refuse_wide_integers(raw: bytes) -> None:
    """
    Parse C{raw} again, slowly and exactly, and name the first integer beyond
    64 bits.  Only bodies holding a float of 2**63 or more come here.
    """
    exact = json.loads(raw, parse_int=_exact_int)
    stack: list[tuple[Any, str]] = [(exact, "")]
    while stack:
        value, path = stack.pop()
        if value is _WIDE:
            raise InvalidField(
                path or "body",
                f"integers must be between {_SMALLEST_INT} and {_LARGEST_INT}",
            )
        if isinstance(value, dict):
            stack.extend((child, _name(path, key)) for key, child in value.items())
        elif isinstance(value, list):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(value))


def _name(path: str, key: object) -> str:
    """A field's name the way the validators write it: C{a.b[2].c}."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)
