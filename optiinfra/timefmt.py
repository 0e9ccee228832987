"""Time as the Go prototype printed it, which clients already parse."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from twisted.internet.interfaces import IReactorTime


def now(clock: IReactorTime) -> float:
    """
    C{clock}'s time to the millisecond, the precision every view shows, so that
    what is stored and what is rendered never disagree.  The one C{now()} of the
    registry, the router, the coordinator and the executor.
    """
    return round(clock.seconds(), 3)


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


def _second_text(whole: int) -> str:
    """
    C{2025-10-16T10:00:00}: the year always in four digits, as RFC 3339 wants
    (C{strftime}'s C{%Y} writes the year 999 as C{999} on glibc).
    """
    moment = datetime.fromtimestamp(whole, UTC)
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
        f"T{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
    )


def rfc3339(seconds: float) -> str:
    """A UTC time as RFC 3339 with whole seconds: C{2025-10-16T10:00:00Z}."""
    return f"{_second_text(math.floor(seconds))}Z"


#: The last whole second formatted, and its text up to the milliseconds.
_second: list[tuple[int, str]] = [(-1, "")]


def rfc3339_ms(seconds: float) -> str:
    """
    A UTC time as RFC 3339 with milliseconds: C{2025-10-16T10:00:00.250Z}.

    Every log line and task view formats a time, mostly within the same second
    as the last one: the formatted second is kept until the time moves past
    it, which saves a C{strftime} on almost every call.  Rounded to the
    microsecond first, as L{datetime.fromtimestamp} does, then truncated to the
    millisecond.
    """
    fraction, whole_float = math.modf(seconds)
    whole = int(whole_float)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    elif micros < 0:
        whole, micros = whole - 1, micros + 1_000_000
    cached_second, prefix = _second[0]
    if whole != cached_second:
        prefix = f"{_second_text(whole)}."
        _second[0] = (whole, prefix)
    return f"{prefix}{micros // 1000:03d}Z"


def rfc3339_ms_or_none(seconds: float | None) -> str | None:
    """L{rfc3339_ms}, for times that may not have happened yet."""
    return None if seconds is None else rfc3339_ms(seconds)
