"""
Conflict detection and resolution: each kind of conflict, each rule of the
documented order, dependency handling, and a property test that the outcome
does not depend on the order the recommendations came in.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence
from typing import Any, Final

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optiinfra.coordination.conflicts import RULES, SEVERITY, resolve
from optiinfra.coordination.model import (
    ACTION,
    AGENT_TYPE_RANK,
    CONTRADICTORY_ACTIONS,
    DEPENDENCY,
    RESOURCE,
    RISK_LEVELS,
    TIMING,
    Conflict,
    Constraints,
    Recommendation,
    Resolution,
    Window,
)

EXAMPLES: Final = int(os.environ.get("OPTIINFRA_FUZZ_EXAMPLES", "300"))


def rec(rec_id: str, **fields: Any) -> Recommendation:
    """A recommendation that conflicts with nothing unless told to."""
    fields.setdefault("agent_type", "cost")
    fields.setdefault("action", "tune")
    if "resources" in fields:
        fields["affected_resources"] = fields.pop("resources")
    if "deps" in fields:
        fields["dependencies"] = fields.pop("deps")
    return Recommendation(id=rec_id, **fields)


def run(
    recs: Sequence[Recommendation],
    constraints: Constraints | None = None,
    contradictions: Iterable[tuple[str, str]] = CONTRADICTORY_ACTIONS,
) -> Resolution:
    counter = itertools.count(1)
    return resolve(
        recs,
        constraints or Constraints(),
        contradictions,
        new_id=lambda: f"c{next(counter)}",
    )


def both_orders(recs: Sequence[Recommendation], **kw: Any) -> Resolution:
    """Resolve in the given and the reverse order; the outcomes must agree."""
    forward, backward = run(recs, **kw), run(list(reversed(recs)), **kw)
    assert summary(forward) == summary(backward)
    return forward


def summary(resolution: Resolution) -> tuple[object, ...]:
    """Everything but the conflict ids."""
    return (
        tuple(r.id for r in resolution.kept),
        dict(resolution.dropped),
        [
            (
                c.type,
                c.recommendation_ids,
                c.description,
                c.severity,
                c.conflicting_field,
                c.kept,
                c.dropped,
                c.rule,
                c.resolution,
            )
            for c in resolution.conflicts
        ],
    )


def kept_ids(resolution: Resolution) -> list[str]:
    return [r.id for r in resolution.kept]


def of_type(resolution: Resolution, kind: str) -> list[Conflict]:
    return [c for c in resolution.conflicts if c.type == kind]


# -- finding conflicts ---------------------------------------------------------


def test_shared_resource() -> None:
    result = both_orders(
        [
            rec("a", resources=("db-1", "vm-1", "vm-2")),
            rec("b", resources=("vm-2", "db-1", "vm-3")),
        ]
    )
    (conflict,) = result.conflicts
    assert conflict.type == RESOURCE
    assert conflict.recommendation_ids == ("a", "b")
    assert conflict.conflicting_field == "affected_resources"
    assert conflict.severity == "medium"
    assert conflict.description == "a and b both affect db-1, vm-2"
    assert (conflict.kept, conflict.dropped, conflict.rule) == (
        ("a",),
        ("b",),
        "tie_break",
    )
    assert kept_ids(result) == ["a"]
    assert conflict.id == "c1"


@pytest.mark.parametrize(("first", "second"), CONTRADICTORY_ACTIONS)
def test_contradictory_actions_in_either_order(first: str, second: str) -> None:
    for one, other in ((first, second), (second, first)):
        result = both_orders([rec("a", action=one), rec("b", action=other)])
        (conflict,) = result.conflicts
        assert conflict.type == ACTION
        assert conflict.conflicting_field == "action"
        assert conflict.severity == "high"
        assert conflict.description == (
            f"a wants {one} and b wants {other}, which undo each other"
        )


def test_actions_not_in_the_table_do_not_conflict() -> None:
    result = both_orders(
        [
            rec("a", action="scale_up"),
            rec("b", action="scale_up"),
            rec("c", action="migrate_to_on_demand"),
            rec("d", action="reserve_instances"),
        ]
    )
    assert result.conflicts == ()
    assert kept_ids(result) == ["a", "b", "c", "d"]


def test_a_custom_contradiction_table() -> None:
    recs = [
        rec("a", action="open"),
        rec("b", action="close"),
        rec("c", action="scale_up"),
        rec("d", action="scale_down"),
    ]
    result = both_orders(recs, contradictions=[("close", "open")])
    assert [(c.type, c.recommendation_ids) for c in result.conflicts] == [
        (ACTION, ("a", "b"))
    ]
    # An action can even contradict itself.
    twice = both_orders(recs, contradictions=[("scale_up", "scale_up")])
    assert twice.conflicts == ()
    twice = both_orders(
        [*recs, rec("e", action="scale_up")], contradictions=[("scale_up", "scale_up")]
    )
    assert [c.recommendation_ids for c in twice.conflicts] == [("c", "e")]
    # An iterator is fine: it is read once.
    assert summary(run(recs, contradictions=iter([("open", "close")]))) == summary(
        result
    )


@pytest.mark.parametrize(
    ("mine", "theirs"),
    [
        ("cluster-a/node-1", "cluster-a/node-2"),  # siblings
        ("cluster-a", "cluster-a/node-1"),  # parent
        ("cluster-a", "cluster-a/node-1/disk-0"),  # further ancestor
        ("r/a/b", "r/a/c"),  # siblings deeper down
    ],
)
def test_timing_on_related_resources(mine: str, theirs: str) -> None:
    result = both_orders(
        [
            rec("a", resources=(mine,), window=Window(0, 10)),
            rec("b", resources=(theirs,), window=Window(9, 20)),
        ]
    )
    (conflict,) = result.conflicts
    assert conflict.type == TIMING
    assert conflict.conflicting_field == "window"
    assert conflict.severity == "low"
    assert conflict.description == (
        f"a and b run in overlapping windows on related resources: {mine} ~ {theirs}"
    )
    assert kept_ids(result) == ["a"]


@pytest.mark.parametrize(
    ("mine", "theirs", "first", "second"),
    [
        ("vm-1", "vm-2", Window(0, 10), Window(0, 10)),  # bare names: no parent
        ("c/n1/d", "c/n2/d", Window(0, 10), Window(0, 10)),  # cousins
        ("c/n1", "c/n2", Window(0, 10), Window(10, 20)),  # one ends as the other starts
        ("c/n1", "c/n2", Window(0, 10), None),  # no window
        ("c", "cc/n1", Window(0, 10), Window(0, 10)),  # a prefix, not an ancestor
    ],
)
def test_no_timing_conflict(
    mine: str, theirs: str, first: Window, second: Window | None
) -> None:
    result = both_orders(
        [
            rec("a", resources=(mine,), window=first),
            rec("b", resources=(theirs,), window=second),
        ]
    )
    assert result.conflicts == ()
    assert kept_ids(result) == ["a", "b"]


def test_a_shared_resource_is_not_also_a_timing_conflict() -> None:
    result = both_orders(
        [
            rec("a", resources=("c/n1", "c/n2"), window=Window(0, 10)),
            rec("b", resources=("c/n1", "c/n3"), window=Window(0, 10)),
        ]
    )
    assert [c.type for c in result.conflicts] == [RESOURCE]


def test_one_conflict_per_pair_and_type() -> None:
    result = both_orders(
        [
            rec("a", action="scale_up", resources=("x", "y"), priority=9),
            rec("b", action="scale_down", resources=("y", "x")),
            rec("c", action="terminate", resources=("x",)),
        ]
    )
    assert [(c.type, c.recommendation_ids) for c in result.conflicts] == [
        (RESOURCE, ("a", "b")),
        (RESOURCE, ("a", "c")),
        (RESOURCE, ("b", "c")),
        (ACTION, ("a", "b")),
        (ACTION, ("a", "c")),
    ]
    assert [c.id for c in result.conflicts] == ["c1", "c2", "c3", "c4", "c5"]
    assert kept_ids(result) == ["a"]
    (both,) = [c for c in result.conflicts if c.recommendation_ids == ("b", "c")]
    assert both.kept == ()
    assert both.dropped == ("b", "c")
    assert both.resolution.startswith("dropped both: b lost to a (resource, action")
    assert "; c lost to a (resource, action conflict)" in both.resolution


def test_dependent_recommendations_do_not_conflict_on_resources_or_timing() -> None:
    result = both_orders(
        [
            rec("a", resources=("vm-1", "c/n1"), window=Window(0, 10)),
            rec("b", resources=("vm-1",), deps=("a",)),
            # c depends on a through b: still in sequence.
            rec("c", resources=("vm-1", "c/n2"), window=Window(0, 10), deps=("b",)),
        ]
    )
    assert result.conflicts == ()
    assert kept_ids(result) == ["a", "b", "c"]


def test_dependent_recommendations_can_still_contradict() -> None:
    # b needs a, but a undoes b: b can never go ahead, whatever the ranks.
    for a_priority in (1, 9):
        result = both_orders(
            [
                rec("a", action="scale_down", priority=a_priority),
                rec("b", action="scale_up", deps=("a",)),
            ]
        )
        (conflict,) = result.conflicts
        assert conflict.type == ACTION
        assert kept_ids(result) == ["a"]
        assert result.dropped == {"b": "conflicts with a (action), which it depends on"}


# -- dependencies --------------------------------------------------------------


def test_cycles_of_three_and_four() -> None:
    result = both_orders(
        [
            rec("c", deps=("a",)),
            rec("a", deps=("b",)),
            rec("b", deps=("c",)),
            rec("w", deps=("x",)),
            rec("x", deps=("y",)),
            rec("y", deps=("z",)),
            rec("z", deps=("w",)),
            rec("free"),
        ]
    )
    cycles = of_type(result, DEPENDENCY)
    assert [(c.recommendation_ids, c.description) for c in cycles] == [
        (("a", "b", "c"), "dependency cycle: a -> b -> c -> a"),
        (("w", "x", "y", "z"), "dependency cycle: w -> x -> y -> z -> w"),
    ]
    assert (
        cycles[0].resolution == "dropped a, b, c: a dependency cycle cannot be ordered"
    )
    assert all(c.rule == DEPENDENCY and c.kept == () for c in cycles)
    assert all(c.severity == "high" for c in cycles)
    assert cycles[1].dropped == ("w", "x", "y", "z")
    assert kept_ids(result) == ["free"]
    assert result.dropped["y"] == (
        "is part of a dependency cycle: w -> x -> y -> z -> w"
    )


def test_a_tangled_component_is_one_conflict() -> None:
    result = both_orders(
        [
            rec("a", deps=("b", "c")),
            rec("b", deps=("a",)),
            rec("c", deps=("a",)),
        ]
    )
    (conflict,) = result.conflicts
    assert conflict.recommendation_ids == ("a", "b", "c")
    assert conflict.description == (
        "dependency cycle: a -> b -> a (and a, b, c all depend on one another)"
    )


def test_self_dependency() -> None:
    result = both_orders([rec("a", deps=("a",)), rec("b")])
    (conflict,) = result.conflicts
    assert conflict.recommendation_ids == ("a",)
    assert conflict.description == "dependency cycle: a -> a"
    assert set(result.dropped) == {"a"}


def test_missing_dependencies() -> None:
    result = both_orders([rec("a", deps=("gone", "b", "also-gone", "gone")), rec("b")])
    assert [
        (c.recommendation_ids, c.description, c.resolution)
        for c in of_type(result, DEPENDENCY)
    ] == [
        (
            ("a",),
            "a depends on also-gone, which is not in this batch",
            "dropped a: it depends on also-gone, which is not in this batch",
        ),
        (
            ("a",),
            "a depends on gone, which is not in this batch",
            "dropped a: it depends on gone, which is not in this batch",
        ),
    ]
    assert result.dropped == {"a": "depends on also-gone, which is not in this batch"}
    assert kept_ids(result) == ["b"]


def test_dependents_of_a_dropped_recommendation_are_dropped() -> None:
    result = both_orders(
        [
            rec("needs-b", deps=("b",), agent_type="application"),
            rec("b", resources=("vm-1",)),
            rec("winner", resources=("vm-1",), priority=9),
            rec("needs-needs-b", deps=("needs-b",)),
            rec("needs-cycle", deps=("loop",)),
            rec("loop", deps=("loop",)),
        ]
    )
    assert kept_ids(result) == ["winner"]
    assert result.dropped == {
        "b": "lost to winner (resource conflict): higher priority (9 > 5)",
        "loop": "is part of a dependency cycle: loop -> loop",
        "needs-b": "depends on b, which was dropped",
        "needs-cycle": "depends on loop, which was dropped",
        "needs-needs-b": "depends on needs-b, which was dropped",
    }
    edges = [
        (c.recommendation_ids, c.description, c.resolution)
        for c in of_type(result, DEPENDENCY)
        if c.description.endswith("which was dropped")
    ]
    assert edges == [
        (
            ("b", "needs-b"),
            "needs-b depends on b, which was dropped",
            "dropped needs-b: it depends on b, which lost to winner (resource "
            "conflict): higher priority (9 > 5)",
        ),
        (
            ("loop", "needs-cycle"),
            "needs-cycle depends on loop, which was dropped",
            "dropped needs-cycle: it depends on loop, which is part of a dependency "
            "cycle: loop -> loop",
        ),
        (
            ("needs-b", "needs-needs-b"),
            "needs-needs-b depends on needs-b, which was dropped",
            "dropped needs-needs-b: it depends on needs-b, which depends on b, which "
            "was dropped",
        ),
    ]


def test_a_recommendation_that_will_fall_does_not_beat_others() -> None:
    # d outranks x but needs z, which loses to w: d goes, so x stays, and so
    # does y, which needs x.
    result = both_orders(
        [
            rec("d", priority=9, resources=("vm-x",), deps=("z",)),
            rec("w", priority=8, resources=("vm-z",)),
            rec("x", priority=7, resources=("vm-x",)),
            rec("z", priority=6, resources=("vm-z",)),
            rec("y", priority=5, deps=("x",)),
        ]
    )
    assert kept_ids(result) == ["w", "x", "y"]
    assert result.dropped == {
        "d": "depends on z, which was dropped",
        "z": "lost to w (resource conflict): higher priority (8 > 6)",
    }
    (dx,) = [c for c in result.conflicts if c.recommendation_ids == ("d", "x")]
    assert dx.kept == ("x",)
    assert dx.rule == DEPENDENCY
    assert dx.resolution == "kept x over d, which depends on z, which was dropped"


def test_a_held_back_recommendation_can_lose_to_a_lower_ranked_one() -> None:
    # e needs x, which at first loses to y; y needs z, which loses to w.  By the
    # time y is known to fall (so x stays), k has been kept, and e, which
    # waited for x, comes too late.  The reason says so.
    result = both_orders(
        [
            rec("e", priority=9, resources=("vm-k",), deps=("x",)),
            rec("y", priority=8, resources=("vm-x",), deps=("z",)),
            rec("w", priority=7, resources=("vm-z",)),
            rec("k", priority=6, resources=("vm-k",)),
            rec("x", priority=5, resources=("vm-x",)),
            rec("z", priority=4, resources=("vm-z",)),
        ]
    )
    assert kept_ids(result) == ["w", "k", "x"]
    assert result.dropped["e"] == (
        "conflicts with k (resource), which was kept first: e waited for its "
        "dependencies, one of which was dropped at first"
    )
    (ek,) = [c for c in result.conflicts if c.recommendation_ids == ("e", "k")]
    assert (ek.kept, ek.rule) == (("k",), DEPENDENCY)
    assert ek.resolution.startswith("kept k over e, which conflicts with k")


def test_kept_recommendations_come_dependencies_first() -> None:
    chain = [rec(f"r{i}", deps=(f"r{i - 1}",) if i else ()) for i in range(6)]
    result = both_orders(list(reversed(chain)))
    assert kept_ids(result) == ["r0", "r1", "r2", "r3", "r4", "r5"]
    # Among those ready, the highest rank first.
    result = both_orders(
        [
            rec("top", deps=("base",), agent_type="application"),
            rec("base"),
            rec("mid", agent_type="performance"),
            rec("low"),
        ]
    )
    assert kept_ids(result) == ["mid", "base", "top", "low"]


@pytest.mark.parametrize("shape", ["chain", "cycle"])
def test_long_dependency_graphs_do_not_recurse(shape: str) -> None:
    count = 5000
    recs = [
        rec(
            f"r{i:05d}",
            deps=(f"r{(i + 1) % count:05d}",)
            if shape == "cycle" or i + 1 < count
            else (),
        )
        for i in range(count)
    ]
    result = run(list(reversed(recs)))
    if shape == "chain":
        assert kept_ids(result) == [r.id for r in reversed(recs)]
        assert result.conflicts == ()
    else:
        assert result.kept == ()
        (conflict,) = result.conflicts
        assert len(conflict.recommendation_ids) == count
        assert conflict.description.startswith("dependency cycle: r00000 -> r00001 ->")
        assert conflict.description.endswith("-> r04999 -> r00000")


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate recommendation id 'a'"):
        resolve([rec("a"), rec("b"), rec("a")])


def test_default_arguments() -> None:
    result = resolve([rec("a", action="scale_up"), rec("b", action="scale_down")])
    (conflict,) = result.conflicts
    assert len(conflict.id) == 36  # a UUID
    assert kept_ids(result) == ["a"]


# -- who wins ------------------------------------------------------------------

#: (winner, loser, constraints, rule, words in the resolution), each one tied on
#: every rule before its own.
ORDER_CASES: Final = [
    pytest.param(
        rec("w", agent_type="cost"),
        rec("l", agent_type="application"),
        Constraints(prefer=frozenset({"w"})),
        "customer_constraints",
        "customer constraints (the customer prefers w)",
        id="preferred-beats-agent-type",
    ),
    pytest.param(
        rec("w", agent_type="cost", priority=1),
        rec("l", agent_type="application", action="scale_down", priority=9),
        Constraints(avoid_actions=frozenset({"scale_down"})),
        "customer_constraints",
        "customer constraints (the customer avoids scale_down)",
        id="avoided-action",
    ),
    pytest.param(
        rec("w", agent_type="cost", resources=("vm-1",)),
        rec("l", agent_type="application", resources=("vm-1", "db-1")),
        Constraints(protected_resources=frozenset({"db-1", "db-2"})),
        "customer_constraints",
        "customer constraints (l touches protected db-1)",
        id="protected-resource",
    ),
    pytest.param(
        rec("w", agent_type="application", priority=1),
        rec("l", agent_type="performance", priority=9),
        None,
        "agent_type",
        "application quality > performance > resource > cost "
        "(application beats performance)",
        id="application-beats-performance",
    ),
    pytest.param(
        rec("w", agent_type="performance", estimated_savings=0.0),
        rec("l", agent_type="resource", estimated_savings=1e6),
        None,
        "agent_type",
        "(performance beats resource)",
        id="performance-beats-resource",
    ),
    pytest.param(
        rec("w", agent_type="resource"),
        rec("l", agent_type="cost"),
        None,
        "agent_type",
        "(resource beats cost)",
        id="resource-beats-cost",
    ),
    pytest.param(
        rec("w", agent_type="cost"),
        rec("l", agent_type="mystery"),
        None,
        "agent_type",
        "(cost beats mystery)",
        id="unknown-agent-type-last",
    ),
    pytest.param(
        rec("w", priority=10, estimated_savings=0.0),
        rec("l", priority=5, estimated_savings=500.0),
        None,
        "priority",
        "higher priority (10 > 5)",
        id="priority",
    ),
    pytest.param(
        rec("w", estimated_savings=120.0, confidence=0.1),
        rec("l", estimated_savings=80.5, confidence=0.9),
        None,
        "estimated_savings",
        "higher estimated savings (120 > 80.5)",
        id="savings",
    ),
    pytest.param(
        rec("w", estimated_savings=1.0, confidence=0.9, risk_level="critical"),
        rec("l", estimated_savings=float("nan"), confidence=0.95),
        None,
        "estimated_savings",
        "higher estimated savings (1 > nan)",
        id="nan-savings-lowest",
    ),
    pytest.param(
        rec("w", confidence=0.9, risk_level="critical"),
        rec("l", confidence=0.8, risk_level="low"),
        None,
        "confidence",
        "higher confidence (0.9 > 0.8)",
        id="confidence",
    ),
    pytest.param(
        rec("w", risk_level="medium"),
        rec("l", risk_level="high"),
        None,
        "risk_level",
        "lower risk (medium < high)",
        id="risk",
    ),
    pytest.param(
        rec("w", risk_level="critical"),
        rec("l", risk_level="unheard-of"),
        None,
        "risk_level",
        "lower risk (critical < unheard-of)",
        id="unknown-risk-last",
    ),
    pytest.param(
        rec("a"),
        rec("b"),
        None,
        "tie_break",
        "equal on every rule, so the smaller id wins (a < b)",
        id="tie-break",
    ),
]


@pytest.mark.parametrize(
    ("winner", "loser", "constraints", "rule", "words"), ORDER_CASES
)
def test_each_rule_decides_when_the_earlier_ones_tie(
    winner: Recommendation,
    loser: Recommendation,
    constraints: Constraints | None,
    rule: str,
    words: str,
) -> None:
    # Both on vm-1, so that they conflict.
    pair = [
        attrs.evolve(r, affected_resources=("vm-1", *r.affected_resources))
        for r in (winner, loser)
    ]
    result = both_orders(pair, constraints=constraints)
    assert kept_ids(result) == [winner.id]
    (conflict,) = result.conflicts
    assert conflict.rule == rule
    assert (conflict.kept, conflict.dropped) == ((winner.id,), (loser.id,))
    assert conflict.resolution.startswith(f"kept {winner.id} over {loser.id}: ")
    assert words in conflict.resolution
    assert result.dropped[loser.id].startswith(
        f"lost to {winner.id} (resource conflict)"
    )
    assert words in result.dropped[loser.id]


def test_the_agent_order_is_transitive_over_a_batch() -> None:
    recs = [
        rec(f"by-{kind}", agent_type=kind, action=action, resources=("vm-1",))
        for kind, action in [
            ("cost", "scale_down"),
            ("resource", "add_capacity"),
            ("performance", "scale_up"),
            ("application", "enable_caching"),
        ]
    ]
    result = both_orders(recs)
    assert kept_ids(result) == ["by-application"]
    assert result.dropped["by-cost"] == (
        "lost to by-application (resource conflict): application quality > "
        "performance > resource > cost (application beats cost)"
    )
    (perf_cost,) = of_type(result, ACTION)[:1]
    assert perf_cost.recommendation_ids == ("by-cost", "by-performance")
    assert perf_cost.resolution == (
        "dropped both: by-performance lost to by-application (resource conflict): "
        "application quality > performance > resource > cost (application beats "
        "performance); by-cost lost to by-application (resource conflict): "
        "application quality > performance > resource > cost (application beats cost)"
    )
    assert perf_cost.rule == "agent_type"
    assert perf_cost.dropped == ("by-cost", "by-performance")


# -- the property test ---------------------------------------------------------

POOL: Final = tuple(f"r{i}" for i in range(10))
RESOURCES: Final = ("vm-1", "vm-2", "c", "c/n1", "c/n2", "c/n1/d", "c/n2/d", "k/a")
ACTIONS: Final = (
    *sorted({action for pair in CONTRADICTORY_ACTIONS for action in pair}),
    "restart",
    "tune",
)
AGENT_TYPES: Final = (*AGENT_TYPE_RANK, "other")


@st.composite
def batches(draw: st.DrawFn) -> tuple[list[Recommendation], Constraints]:
    ids = draw(st.lists(st.sampled_from(POOL), unique=True, max_size=9))
    targets = [*ids, "ghost"]
    recs = []
    for rec_id in ids:
        start = draw(st.integers(0, 6))
        length = draw(st.none() | st.integers(1, 4))
        recs.append(
            Recommendation(
                id=rec_id,
                agent_type=draw(st.sampled_from(AGENT_TYPES)),
                action=draw(st.sampled_from(ACTIONS)),
                risk_level=draw(st.sampled_from(RISK_LEVELS)),
                priority=draw(st.integers(1, 3)),
                estimated_savings=draw(st.sampled_from([0.0, 10.0, 25.5])),
                confidence=draw(st.sampled_from([0.5, 0.9])),
                affected_resources=tuple(
                    draw(st.lists(st.sampled_from(RESOURCES), max_size=3))
                ),
                dependencies=tuple(
                    draw(st.lists(st.sampled_from(targets), max_size=2))
                ),
                window=None if length is None else Window(start, start + length),
            )
        )
    constraints = Constraints(
        prefer=draw(st.frozensets(st.sampled_from(POOL), max_size=2)),
        avoid_actions=draw(st.frozensets(st.sampled_from(ACTIONS), max_size=2)),
        protected_resources=draw(st.frozensets(st.sampled_from(RESOURCES), max_size=2)),
    )
    return recs, constraints


def outcome(resolution: Resolution) -> tuple[object, ...]:
    """What must not depend on the input order (the conflict ids may)."""
    return (
        tuple(r.id for r in resolution.kept),
        sorted(resolution.dropped.items()),
        [
            (
                c.type,
                tuple(sorted(c.recommendation_ids)),
                c.kept,
                c.dropped,
                c.rule,
                c.resolution,
            )
            for c in resolution.conflicts
        ],
    )


@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(batch=batches(), data=st.data())
def test_the_outcome_does_not_depend_on_the_order(
    batch: tuple[list[Recommendation], Constraints], data: st.DataObject
) -> None:
    recs, constraints = batch
    expected = run(recs, constraints)
    permuted = data.draw(st.permutations(recs))
    shuffled = list(recs)
    data.draw(st.randoms()).shuffle(shuffled)
    for other in (permuted, shuffled):
        assert outcome(run(other, constraints)) == outcome(expected)
    check(recs, constraints, expected)


class Oracle:
    """The rules re-read from the brief, by brute force, for small batches."""

    def __init__(self, recs: Sequence[Recommendation], constraints: Constraints):
        self.recs = {r.id: r for r in recs}
        self.constraints = constraints
        self.reach: dict[str, set[str]] = {}
        for start in self.recs:
            seen: set[str] = set()
            todo = [start]
            while todo:
                for d in self.recs[todo.pop()].dependencies:
                    if d in self.recs and d not in seen:
                        seen.add(d)
                        todo.append(d)
            self.reach[start] = seen

    def key(self, rec_id: str) -> tuple[object, ...]:
        r = self.recs[rec_id]
        return (
            -self.constraints.score(r),
            -AGENT_TYPE_RANK.get(r.agent_type, 0),
            -r.priority,
            -r.estimated_savings,
            -r.confidence,
            RISK_LEVELS.index(r.risk_level),
            r.id,
        )

    def rule(self, a: str, b: str) -> str:
        return next(
            name
            for name, x, y in zip(RULES, self.key(a), self.key(b), strict=True)
            if x != y
        )

    def in_cycle(self, a: str) -> bool:
        return a in self.reach[a]

    def missing(self, a: str) -> set[str]:
        return {d for d in self.recs[a].dependencies if d not in self.recs}

    def conflicts(self, a: str, b: str) -> set[str]:
        x, y = self.recs[a], self.recs[b]
        found = set()
        if (x.action, y.action) in CONTRADICTORY_ACTIONS or (
            y.action,
            x.action,
        ) in CONTRADICTORY_ACTIONS:
            found.add(ACTION)
        if a in self.reach[b] or b in self.reach[a]:
            return found
        shared = set(x.affected_resources) & set(y.affected_resources)
        if shared:
            found.add(RESOURCE)
        elif (
            x.window is not None
            and y.window is not None
            and x.window.start < y.window.end
            and y.window.start < x.window.end
            and any(
                related(r, s)
                for r in x.affected_resources
                for s in y.affected_resources
            )
        ):
            found.add(TIMING)
        return found


def related(r: str, s: str) -> bool:
    def parent(name: str) -> str | None:
        return name.rsplit("/", 1)[0] if "/" in name else None

    return r != s and (
        s.startswith(r + "/")
        or r.startswith(s + "/")
        or (parent(r) is not None and parent(r) == parent(s))
    )


def check(
    recs: Sequence[Recommendation], constraints: Constraints, result: Resolution
) -> None:
    """The invariants of any resolution."""
    oracle = Oracle(recs, constraints)
    kept = [r.id for r in result.kept]
    assert len(kept) == len(set(kept))
    assert set(kept).isdisjoint(result.dropped)
    assert set(kept) | set(result.dropped) == set(oracle.recs)
    assert all(result.dropped.values())

    # Kept ones: runnable, dependencies first, no two in conflict.
    for place, rec_id in enumerate(kept):
        assert not oracle.in_cycle(rec_id)
        assert not oracle.missing(rec_id)
        for d in oracle.recs[rec_id].dependencies:
            assert d in kept[:place]
    for a, b in itertools.combinations(kept, 2):
        assert not oracle.conflicts(a, b), (a, b)

    # Dropped ones: each had to go, and a loss names a higher-ranked kept winner.
    for rec_id, reason in result.dropped.items():
        deps = oracle.recs[rec_id].dependencies
        assert (
            oracle.in_cycle(rec_id)
            or oracle.missing(rec_id)
            or any(d not in kept for d in deps)
            or any(oracle.conflicts(rec_id, k) for k in kept)
        ), rec_id
        if reason.startswith("lost to "):
            winner = reason.removeprefix("lost to ").split(" ")[0]
            assert winner in kept
            assert oracle.conflicts(rec_id, winner)
            assert oracle.key(winner) < oracle.key(rec_id)

    # The conflicts reported are exactly the ones the rules describe.
    ids = sorted(oracle.recs)
    expected: set[tuple[str, tuple[str, ...]]] = {
        (kind, (a, b))
        for a, b in itertools.combinations(ids, 2)
        for kind in oracle.conflicts(a, b)
    }
    expected |= {
        (
            DEPENDENCY,
            tuple(sorted({a, *(x for x in oracle.reach[a] if a in oracle.reach[x])})),
        )
        for a in ids
        if oracle.in_cycle(a)
    }
    expected |= {(DEPENDENCY, (a,)) for a in ids for _ in oracle.missing(a)}
    expected |= {
        (DEPENDENCY, tuple(sorted((a, d))))
        for a in ids
        for d in oracle.recs[a].dependencies
        if d in result.dropped and not (a in oracle.reach[d] and d in oracle.reach[a])
    }
    reported = [(c.type, c.recommendation_ids) for c in result.conflicts]
    assert set(reported) == expected
    pairwise = [c for c in result.conflicts if c.type != DEPENDENCY]
    assert len(pairwise) == len({(c.type, c.recommendation_ids) for c in pairwise})
    assert len({c.id for c in result.conflicts}) == len(result.conflicts)

    for c in result.conflicts:
        assert set(c.kept) | set(c.dropped) == set(c.recommendation_ids)
        assert set(c.kept) == set(c.recommendation_ids) & set(kept)
        assert c.rule in (*RULES, DEPENDENCY)
        assert c.severity == SEVERITY[c.type]
        if c.type == DEPENDENCY:
            assert c.kept == ()
            assert c.rule == DEPENDENCY
            continue
        a, b = c.recommendation_ids
        assert len(c.kept) == 1 or c.resolution.startswith("dropped both: ")
        if len(c.kept) == 1:
            (winner,) = c.kept
            (loser,) = c.dropped
            assert c.resolution.startswith(f"kept {winner} over {loser}")
            if oracle.key(winner) < oracle.key(loser):
                assert c.rule == oracle.rule(winner, loser)
        else:
            assert c.rule == oracle.rule(a, b)
