"""
JSON that the store keeps exactly as it came.

orjson reads integers beyond 64 bits as floats (silently changing them) and
cannot write documents nested more than 254 levels deep, so a document it
accepted may still be one the store cannot keep.  Both are caught where JSON
arrives, and said plainly, instead of surfacing later as a changed number or a
write that fails.
"""

from __future__ import annotations

import json
from typing import Any, Final

import orjson

#: Integers orjson reads exactly: signed and unsigned 64-bit.
SMALLEST: Final = -(2**63)
LARGEST: Final = 2**64 - 1
#: Deepest nesting orjson writes.
MAX_DEPTH: Final = 254

#: Every integer outside 64 bits has at least 19 digits; most documents have
#: no such run of digits at all, and are not read a second time.  With every
#: digit made a 0, a run of them is one C{in} away (a regular expression
#: scanning for it took 8 µs a kilobyte, this 1 µs).
_ZEROED: Final = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGITS: Final = b"0" * 19


class NotExact(ValueError):
    """
    A document the store could not keep as it is; the message says why, and
    C{field} where (C{parameters.n}, C{items[2]}), when it is known.
    """

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.field = field


def _too_large(value: int) -> bool:
    return not SMALLEST <= value <= LARGEST


def _shown(value: int) -> str:
    text = str(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} digits)"


def _first_too_large(document: Any) -> tuple[str, int] | None:
    """Where the first integer beyond 64 bits is in C{document}, and its value."""
    stack: list[tuple[str, Any]] = [("", document)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, bool):
            continue
        if isinstance(value, int) and _too_large(value):
            return path, value
        if isinstance(value, dict):
            items = [(f"{path}.{k}" if path else str(k), v) for k, v in value.items()]
        elif isinstance(value, list):
            items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
        else:
            continue
        stack.extend(reversed(items))
    return None


def loads(raw: bytes) -> Any:
    """
    C{raw} parsed, as orjson does.

    @raise orjson.JSONDecodeError: it is not JSON.
    @raise NotExact: it holds an integer orjson would have turned into a float.
    """
    value = orjson.loads(raw)
    if _LONG_DIGITS in raw.translate(_ZEROED):
        try:
            exact = json.loads(raw)
        except RecursionError:
            raise NotExact(f"it is nested more than {MAX_DEPTH} levels deep") from None
        found = _first_too_large(exact)
        if found is not None:
            path, number = found
            raise NotExact(
                f"the integer {_shown(number)} is beyond 64 bits", path or None
            )
    return value


def check_storable(value: Any) -> None:
    """
    @raise NotExact: C{value} cannot be written as JSON (too deeply nested).
    """
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        raise NotExact(f"it is nested more than {MAX_DEPTH} levels deep") from None
