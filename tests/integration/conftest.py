"""Real twistd processes, always killed when the test ends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .twistd import Twistd


@pytest.fixture
def processes() -> Iterator[list[Twistd]]:
    started: list[Twistd] = []
    yield started
    for process in started:
        process.kill()
