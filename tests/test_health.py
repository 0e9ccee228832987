"""The contract's formats for uptime and timestamps."""

from __future__ import annotations

import pytest

from optiinfra.timefmt import go_duration, rfc3339


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (5.9, "5s"), (330, "5m30s"), (7205, "2h0m5s"), (-1, "0s")],
)
def test_go_duration(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def test_rfc3339() -> None:
    assert rfc3339(1760608800.7) == "2025-10-16T10:00:00Z"
