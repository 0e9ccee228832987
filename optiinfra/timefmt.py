"""Time as the Go prototype printed it, which clients already parse."""

from __future__ import annotations

from datetime import UTC, datetime


def go_duration(seconds: float) -> str:
    """Whole seconds in Go's C{time.Duration} style: C{5s}, C{5m30s}, C{2h0m5s}."""
    total = max(0, int(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def rfc3339(seconds: float) -> str:
    """A UTC time as RFC 3339 with whole seconds: C{2025-10-16T10:00:00Z}."""
    return datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_second: list[tuple[int, str]] = [(-1, "")]


def rfc3339_ms_fast(seconds: float) -> str:
    """
    L{rfc3339_ms} for the access log: the formatted second is kept until the
    clock moves past it, which saves the strftime on almost every request.
    """
    whole = int(seconds)
    cached_second, prefix = _second[0]
    if whole != cached_second:
        prefix = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        _second[0] = (whole, prefix)
    return f"{prefix}{int((seconds - whole) * 1000):03d}Z"


def rfc3339_ms(seconds: float) -> str:
    """A UTC time as RFC 3339 with milliseconds: C{2025-10-16T10:00:00.250Z}."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def rfc3339_ms_or_none(seconds: float | None) -> str | None:
    """L{rfc3339_ms}, for times that may not have happened yet."""
    return None if seconds is None else rfc3339_ms(seconds)
