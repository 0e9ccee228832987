"""Task ids: UUIDs of version 7 that sort by creation time."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from optiinfra.ids import time_ordered_id

SECONDS = st.floats(min_value=0, max_value=2**47 / 1000, allow_nan=False)


@given(SECONDS)
def test_an_id_is_a_version_7_uuid_holding_its_millisecond(seconds: float) -> None:
    text = time_ordered_id(seconds)
    parsed = uuid.UUID(text)
    assert str(parsed) == text
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert parsed.int >> 80 == int(seconds * 1000)


@given(SECONDS, SECONDS)
def test_ids_sort_by_their_millisecond(first: float, second: float) -> None:
    if int(first * 1000) < int(second * 1000):
        assert time_ordered_id(first) < time_ordered_id(second)


def test_ids_of_one_millisecond_differ() -> None:
    ids = {time_ordered_id(1_760_608_800.123) for _ in range(10_000)}
    assert len(ids) == 10_000
