"""Reading query strings: one value per name, and pages of a listing."""

from __future__ import annotations

import re
from typing import Any, Final

import attrs
from twisted.web.iweb import IRequest

from optiinfra.errors import InvalidField

#: The most items one page of a listing holds.
MAX_PAGE: Final = 500
_DIGITS: Final = re.compile(r"[0-9]{1,12}")


_DEFAULT_LIMIT: Final = 100


@attrs.frozen
class QueryInteger:
    """
    A query parameter holding a whole number from 0 to C{maximum}, declared
    once: read here, published by C{optiinfra.openapi} (L{parameter}).
    """

    name: str
    maximum: int
    default: int
    description: str

    def read(self, request: IRequest, default: int | None = None) -> int:
        return query_number(
            request,
            self.name,
            self.default if default is None else default,
            self.maximum,
        )

    def parameter(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "in": "query",
            "required": False,
            "description": self.description,
            "schema": {
                "type": "integer",
                "minimum": 0,
                "maximum": self.maximum,
                "default": self.default,
            },
        }


LIMIT: Final = QueryInteger(
    "limit",
    maximum=MAX_PAGE,
    default=_DEFAULT_LIMIT,
    description=(
        f"At most this many items; anything but a whole number up to {MAX_PAGE} "
        "is a 400 naming `limit`."
    ),
)
OFFSET: Final = QueryInteger(
    "offset",
    maximum=10**9,
    default=0,
    description=(
        "Skip this many matching items; anything but a whole number is a 400 "
        "naming `offset`."
    ),
)


@attrs.frozen
class Page:
    limit: int = LIMIT.default
    offset: int = OFFSET.default


def query_arg(request: IRequest, name: str) -> str | None:
    """The last value given for C{name}, or None."""
    values = (request.args or {}).get(name.encode())
    return values[-1].decode("utf-8", "replace") if values else None


def query_number(request: IRequest, name: str, default: int, maximum: int) -> int:
    raw = query_arg(request, name)
    if raw is None:
        return default
    if not _DIGITS.fullmatch(raw) or int(raw) > maximum:
        raise InvalidField(name, f"must be a whole number up to {maximum}")
    return int(raw)


def page_of(key: str, items: list[Any], limit: int, offset: int) -> dict[str, Any]:
    """One page of a listing, as every listing answers: items, count, the page."""
    return {key: items, "count": len(items), "limit": limit, "offset": offset}


def query_page(request: IRequest) -> Page:
    """C{limit} (at most L{MAX_PAGE}) and C{offset}."""
    return Page(limit=LIMIT.read(request), offset=OFFSET.read(request))
