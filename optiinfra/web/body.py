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
#: The shortest integer literals that may lie beyond 64 bits have 19 digits;
#: with every digit made a 0, a run of them is one C{in} away (a regular
#: expression scanning for it took 8 µs a kilobyte, this 1 µs).
_ZEROED: Final = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGITS: Final = b"0" * 19
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
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        if str(error).startswith("depth limit exceeded"):
            raise InvalidField(
                "body", f"must not nest more than {MAX_DEPTH} levels deep"
            ) from None
        raise InvalidField("body", f"is not valid JSON: {error}") from None
    # Cheap tests on the bytes first: most bodies hold fewer than MAX_DEPTH
    # brackets, and no run of 19 digits (the shortest integer past 64 bits).
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH:
        _check_depth(document)
    if _LONG_DIGITS in raw.translate(_ZEROED):
        _refuse_wide_integers(raw)
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
    64 bits.  Only bodies with a run of 19 digits somewhere come here.
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
