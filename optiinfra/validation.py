"""
Reading untrusted JSON documents field by field.

Each reader names the field it reads in the L{InvalidField} it raises, so a
client is told exactly what to fix.  Limits keep one request from being able to
store or cost more than its share.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any, Final

import orjson

from optiinfra.errors import InvalidField
from optiinfra.exactjson import MAX_DEPTH

#: Identifiers chosen by clients: agent ids, names of things.
TOKEN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
#: Human-readable names: any printable text.
NAME: Final = re.compile(r"[^\x00-\x1f\x7f]{1,128}")
#: Host names and IP addresses (v4, or v6 without brackets).
HOST: Final = re.compile(r"[A-Za-z0-9._:-]{1,253}")

#: No database stores NUL in text, and no field here needs control characters.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
#: Prose may also break lines and tabulate.
_PROSE_CONTROL: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

MAX_TEXT: Final = 1024
MAX_LIST: Final = 256
MAX_DOCUMENT: Final = 64 * 1024

_MISSING: Final = object()


class Fields:
    """A JSON object being read; remembers its own name for nested errors."""

    def __init__(self, document: object, prefix: str = "") -> None:
        if not isinstance(document, Mapping):
            raise InvalidField(prefix.rstrip(".") or "body", "must be a JSON object")
        self._document: Mapping[str, Any] = document
        self._prefix = prefix

    def name(self, key: str) -> str:
        return self._prefix + key

    def has(self, key: str) -> bool:
        return self._document.get(key) is not None

    def raw(self, key: str) -> Any:
        return self._document.get(key)

    def raw_items(self) -> list[tuple[str, Any]]:
        return list(self._document.items())

    def _get(self, key: str, required: bool) -> Any:
        value = self._document.get(key, _MISSING)
        if value is _MISSING or value is None:
            if required:
                raise InvalidField(self.name(key), "is required")
            return _MISSING
        return value

    def text(
        self,
        key: str,
        *,
        required: bool = True,
        default: str | None = None,
        pattern: re.Pattern[str] | None = None,
        max_length: int = MAX_TEXT,
        multiline: bool = False,
    ) -> str | None:
        value = self._get(key, required)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            raise InvalidField(self.name(key), "must be a string")
        if not value.strip():
            raise InvalidField(self.name(key), "must not be empty")
        if (_PROSE_CONTROL if multiline else _CONTROL).search(value):
            raise InvalidField(self.name(key), "must not contain control characters")
        if len(value) > max_length:
            raise InvalidField(
                self.name(key), f"must be at most {max_length} characters"
            )
        if pattern is not None and not pattern.fullmatch(value):
            raise InvalidField(self.name(key), f"must match {pattern.pattern}")
        return value

    def choice(
        self,
        key: str,
        allowed: Collection[str],
        *,
        required: bool = True,
        default: str | None = None,
        aliases: Mapping[str, str] | None = None,
    ) -> str | None:
        value = self._get(key, required)
        if value is _MISSING:
            return default
        if isinstance(value, str):
            value = (aliases or {}).get(value, value)
            if value in allowed:
                return value
        raise InvalidField(self.name(key), f"must be one of {', '.join(allowed)}")

    def integer(
        self,
        key: str,
        *,
        minimum: int,
        maximum: int,
        required: bool = True,
        default: int | None = None,
    ) -> int | None:
        value = self._get(key, required)
        if value is _MISSING:
            return default
        if isinstance(value, float) and value.is_integer():
            # JSON Schema's (and JavaScript's) integer: 8002.0 is 8002.
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidField(self.name(key), "must be a whole number")
        if not minimum <= value <= maximum:
            raise InvalidField(
                self.name(key), f"must be between {minimum} and {maximum}"
            )
        return value

    def number(
        self, key: str, *, minimum: float, maximum: float, default: float
    ) -> float:
        value = self._get(key, False)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidField(self.name(key), "must be a number")
        if not minimum <= value <= maximum:
            raise InvalidField(
                self.name(key), f"must be between {minimum:g} and {maximum:g}"
            )
        return float(value)

    def strings(
        self,
        key: str,
        *,
        required: bool = False,
        max_items: int = MAX_LIST,
        pattern: re.Pattern[str] | None = TOKEN,
    ) -> tuple[str, ...]:
        value = self._get(key, required)
        if value is _MISSING:
            return ()
        if not isinstance(value, list):
            raise InvalidField(self.name(key), "must be a list of strings")
        if len(value) > max_items:
            raise InvalidField(self.name(key), f"must have at most {max_items} items")
        seen: dict[str, None] = {}
        for index, item in enumerate(value):
            if not isinstance(item, str) or (
                pattern is not None and not pattern.fullmatch(item)
            ):
                raise InvalidField(
                    f"{self.name(key)}[{index}]",
                    "must be a short identifier (letters, digits, . _ : @ -)",
                )
            seen[item] = None
        return tuple(seen)

    def mapping(
        self, key: str, *, required: bool = False, max_bytes: int = MAX_DOCUMENT
    ) -> dict[str, Any]:
        value = self._get(key, required)
        if value is _MISSING:
            return {}
        if not isinstance(value, dict):
            raise InvalidField(self.name(key), "must be a JSON object")
        try:
            encoded = orjson.dumps(value)
        except orjson.JSONEncodeError:
            raise InvalidField(
                self.name(key), f"is nested more than {MAX_DEPTH} levels deep"
            ) from None
        if len(encoded) > max_bytes:
            raise InvalidField(self.name(key), f"must be at most {max_bytes} bytes")
        return value
