"""The circuit breaker and the balancer, on a fake clock."""

from __future__ import annotations

import random

from twisted.internet.task import Clock

from optiinfra.routing.balancer import Outstanding, pick
from optiinfra.routing.breaker import CLOSED, HALF_OPEN, OPEN, Breakers


def test_opens_after_the_threshold_and_allows_one_trial() -> None:
    clock = Clock()
    breakers = Breakers(clock, threshold=3, cooldown=10)
    assert not breakers.failed("a")
    assert not breakers.failed("a")
    assert breakers.allows("a")
    assert breakers.failed("a")  # the third opens it
    assert breakers.state("a") == OPEN
    assert not breakers.allows("a")
    clock.advance(10)
    assert breakers.state("a") == HALF_OPEN
    assert breakers.allows("a")
    breakers.sent("a")
    assert not breakers.allows("a")  # only one trial at a time
    breakers.released("a")  # the trial did not go out after all
    assert breakers.allows("a")
    breakers.sent("a")
    assert breakers.failed("a")  # the trial failed: open again
    assert breakers.state("a") == OPEN
    clock.advance(10)
    breakers.sent("a")
    breakers.succeeded("a")
    assert breakers.state("a") == CLOSED
    assert breakers.states() == {}


def test_a_success_resets_the_count() -> None:
    breakers = Breakers(Clock(), threshold=2, cooldown=1)
    breakers.failed("a")
    breakers.succeeded("a")
    assert not breakers.failed("a")
    assert breakers.state("a") == CLOSED


def test_two_choices_prefer_the_less_loaded() -> None:
    outstanding = Outstanding()
    for _ in range(5):
        outstanding.started("busy")
    rng = random.Random(1)
    picks = [pick(("busy", "idle"), outstanding, rng) for _ in range(20)]
    assert set(picks) == {"idle"}
    assert pick(("only",), outstanding, rng) == "only"
    for _ in range(5):
        outstanding.finished("busy")
    assert outstanding["busy"] == 0
