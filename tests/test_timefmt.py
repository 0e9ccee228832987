"""The contract's formats for uptime and timestamps."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from optiinfra.timefmt import go_duration, now, rfc3339, rfc3339_ms


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (5.9, "5s"), (330, "5m30s"), (7205, "2h0m5s"), (-1, "0s")],
)
def test_go_duration(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def test_rfc3339() -> None:
    assert rfc3339(1760608800.7) == "2025-10-16T10:00:00Z"


def test_early_years_have_four_digits() -> None:
    year_999 = datetime(999, 5, 1, 2, 3, 4, 250_000, tzinfo=UTC).timestamp()
    assert rfc3339(year_999) == "0999-05-01T02:03:04Z"
    assert rfc3339_ms(year_999) == "0999-05-01T02:03:04.250Z"


@given(
    st.floats(
        min_value=datetime(1, 1, 2, tzinfo=UTC).timestamp(),
        max_value=datetime(9999, 12, 30, tzinfo=UTC).timestamp(),
    )
)
@example(1760608800.9999996)  # rounds up into the next second
@example(-0.0000004)
@example(-1.5)
def test_rfc3339_ms_is_datetimes_own_rounding(seconds: float) -> None:
    moment = datetime.fromtimestamp(seconds, UTC)
    expected = moment.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"
    assert rfc3339_ms(seconds) == expected
    assert rfc3339_ms(seconds) == expected  # the kept second again


def test_now_is_the_clocks_time_to_the_millisecond() -> None:
    clock = Clock()
    clock.advance(1760608800.12345)
    assert now(clock) == 1760608800.123
    clock.advance(0.0006)
    assert now(clock) == 1760608800.124
