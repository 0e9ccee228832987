"""
What the domain says went wrong, without knowing about HTTP.

The web layer maps each to a status: L{InvalidField} 400, L{NotFound} 404,
L{Conflict} 409; L{optiinfra.store.interface.StoreUnavailable} is 503.
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
