"""
What the domain says went wrong, without knowing about HTTP.

The web layer maps each to a status: L{InvalidField} 400, L{NotFound} 404,
L{Conflict} 409, L{Overloaded} 429; L{optiinfra.store.interface.StoreUnavailable}
is 503.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class InvalidField(ValueError):
    """A request named C{field} carried a value the service cannot accept."""

    def __init__(self, field: str, detail: str, status: int = 400) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail
        self.status = status


class NotFound(LookupError):
    """The thing asked for does not exist (any more)."""

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields: Mapping[str, Any] = fields


class Conflict(RuntimeError):
    """The request contradicts the state it would change."""

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields: Mapping[str, Any] = fields


class Overloaded(RuntimeError):
    """
    Not taken now, to protect work already taken: the client should slow down
    and try again after C{retry_after} seconds.
    """

    def __init__(
        self, message: str, retry_after: int, field: str | None = None, **fields: Any
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.field = field
        self.fields: Mapping[str, Any] = fields
