"""
Which recommendations of a batch go ahead: the conflicts between them, found and
settled by the platform's documented order.

Pure functions: no clock, no I/O, no randomness except the conflict ids, which
come from the caller's C{new_id}.  The outcome never depends on the order the
recommendations came in: everything below works on the batch sorted by id, and
every choice is made by the rank order, which is total (ids are unique).

Conflicts
=========
Pairwise, checked for every pair whichever order they came in:

  - resource (severity medium): both affect the same resource;
  - action (high): their actions contradict each other, per a table read in
    either order;
  - timing (low): both have windows, the windows overlap, and they affect
    I{related} resources (one an ancestor of the other, or siblings, ids being
    "/"-separated paths) but share none: sharing one is already a resource
    conflict, whatever the windows, so it is not reported twice.

Two recommendations one of which depends, directly or not, on the other are
meant to run together in that order, so they never conflict on resource or
timing; they can still contradict each other (action).

Dependency conflicts (severity high): a cycle (one per strongly connected
component, self-dependency included; every member dropped), a dependency on an
id outside the batch (one per recommendation and missing id; the
recommendation dropped), and a dependency on a recommendation that ends up
dropped (one per such edge; the dependent is dropped too).

Who wins
========
The rank, highest first: customer constraints, agent type (application >
performance > resource > cost, unknown types last), priority, estimated
savings, confidence, lower risk (unknown risk levels count as riskier than
critical), and finally the smaller id.  NaN savings or confidence count as
lowest, so that the order stays total.

Cycle members, recommendations with missing dependencies and everything
depending on them are dropped first.  The rest are taken greedily by rank: one
is kept unless it conflicts with one already kept, or depends on one already
dropped.  A dependency may rank lower than its dependent, so a recommendation
kept in a pass may turn out to depend on one dropped later in the same pass:
it then must go, and those it beat may have lost for nothing.  So the pass is
run again with such recommendations I{held back}: a held-back recommendation
is only considered once all of its dependencies are decided, and so can no
longer beat anyone and then fall.  The held-back set only grows, and the pass
is repeated until no kept recommendation depends on a dropped one; at most one
pass per recommendation, one or two in practice.  (Held back rather than
dropped outright, as a plain fixed point would: its dependencies may well be
kept in the next pass, once what beat them is held back in turn.)

Every drop has a reason that holds in the final outcome: a dependency problem,
or a conflict with a recommendation that is kept.  A held-back recommendation
can lose to a lower-ranked one that was decided first; its reason says so.
Some batches have no outcome in which every dropped recommendation lost to a
higher-ranked kept one (preferences and dependencies can go round in a
circle), so some such rule is needed.  One that contradicts a recommendation it
depends on can never go ahead: it is dropped, whatever the ranks.

A pairwise conflict's rule is the first rank criterion on which the two differ,
and its resolution says which was kept over which and why; when the
higher-ranked one was dropped for another reason, the rule and the words are
that reason's, and when both were dropped, the resolution gives both reasons.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import combinations, pairwise
from typing import Final

import attrs

from optiinfra.coordination.model import (
    ACTION,
    AGENT_TYPE_RANK,
    CONFLICT_TYPES,
    CONTRADICTORY_ACTIONS,
    DEPENDENCY,
    RESOURCE,
    RISK_LEVELS,
    TIMING,
    Conflict,
    Constraints,
    Recommendation,
    Resolution,
)
from optiinfra.ids import random_id

#: How serious each kind of conflict is: contradictory actions and broken
#: dependencies cannot both go ahead whatever is done; a shared resource might be
#: changed twice, one after the other; a related one at the same time is only a
#: risk.
SEVERITY: Final[Mapping[str, str]] = {
    ACTION: "high",
    DEPENDENCY: "high",
    RESOURCE: "medium",
    TIMING: "low",
}

#: The rank criteria, most important first, as L{Conflict.rule} names them.
RULES: Final = (
    "customer_constraints",
    "agent_type",
    "priority",
    "estimated_savings",
    "confidence",
    "risk_level",
    "tie_break",
)

#: What a field holds when the conflict is about it.
_FIELDS: Final[Mapping[str, str]] = {
    RESOURCE: "affected_resources",
    ACTION: "action",
    TIMING: "window",
    DEPENDENCY: "dependencies",
}

_AGENT_ORDER: Final = " > ".join(
    "application quality" if name == "application" else name
    for name in sorted(AGENT_TYPE_RANK, key=AGENT_TYPE_RANK.__getitem__, reverse=True)
)

_NO_CONSTRAINTS: Final = Constraints()

#: A recommendation's rank as a sort key: the smaller, the stronger.
_Key = tuple[int, int, int, float, float, int, str]
_Pair = tuple[int, int]


def resolve(
    recommendations: Sequence[Recommendation],
    constraints: Constraints = _NO_CONSTRAINTS,
    contradictions: Iterable[tuple[str, str]] = CONTRADICTORY_ACTIONS,
    new_id: Callable[[], str] = random_id,
) -> Resolution:
    """
    Find every conflict in C{recommendations} and decide which go ahead.

    The ids must be unique (the caller validates; a duplicate is a
    L{ValueError}).  C{new_id} is called once per conflict, in the order of the
    returned conflicts.
    """
    recs = sorted(recommendations, key=lambda rec: rec.id)
    for before, after in pairwise(recs):
        if before.id == after.id:
            raise ValueError(f"duplicate recommendation id {before.id!r}")
    batch = _Batch.build(recs, constraints)
    pairs = _pairwise(batch, _contradiction_table(contradictions))
    kept, drops = _settle(batch, pairs)
    drafts = sorted(
        [
            *_pair_conflicts(batch, pairs, kept, drops),
            *_dependency_conflicts(batch, kept, drops),
        ],
        key=lambda draft: (CONFLICT_TYPES.index(draft.type), draft.ids, draft.text),
    )
    return Resolution(
        conflicts=tuple(draft.conflict(new_id()) for draft in drafts),
        kept=tuple(recs[i] for i in batch.topological(kept)),
        dropped={recs[i].id: drops[i].reason for i in sorted(drops)},
    )


# -- the batch: ranks and the dependency graph ---------------------------------


@attrs.frozen
class _Batch:
    """The recommendations sorted by id, with everything derived from them."""

    recs: Sequence[Recommendation]
    constraints: Constraints
    #: Rank key of each recommendation, and its place in the rank order (0 wins).
    keys: Sequence[_Key]
    rank: Sequence[int]
    #: Dependencies inside the batch, sorted and without repeats; and reversed.
    deps: Sequence[Sequence[int]]
    dependents: Sequence[Sequence[int]]
    #: Dependencies on ids outside the batch, sorted.
    missing: Sequence[Sequence[str]]
    #: The strongly connected component each recommendation belongs to, and the
    #: components that are cycles (members sorted, the smallest id first).
    component: Sequence[int]
    cycles: Sequence[Sequence[int]]
    #: Bit j of C{reach[i]} is set when i depends on j, directly or not.
    reach: Sequence[int]

    @classmethod
    def build(cls, recs: Sequence[Recommendation], constraints: Constraints) -> _Batch:
        index = {rec.id: i for i, rec in enumerate(recs)}
        deps: list[list[int]] = []
        missing: list[list[str]] = []
        dependents: list[list[int]] = [[] for _ in recs]
        for i, rec in enumerate(recs):
            inside = sorted({index[d] for d in rec.dependencies if d in index})
            deps.append(inside)
            missing.append(sorted({d for d in rec.dependencies if d not in index}))
            for d in inside:
                dependents[d].append(i)
        components = _strongly_connected(deps)
        component = [0] * len(recs)
        for number, members in enumerate(components):
            for i in members:
                component[i] = number
        keys = [_rank_key(rec, constraints) for rec in recs]
        rank = [0] * len(recs)
        for place, i in enumerate(sorted(range(len(recs)), key=keys.__getitem__)):
            rank[i] = place
        return cls(
            recs=recs,
            constraints=constraints,
            keys=keys,
            rank=rank,
            deps=deps,
            dependents=dependents,
            missing=missing,
            component=component,
            cycles=[
                members
                for members in components
                if len(members) > 1 or members[0] in deps[members[0]]
            ],
            reach=_reach(deps, components, component),
        )

    def id(self, i: int) -> str:
        return self.recs[i].id

    def depends(self, i: int, j: int) -> bool:
        """Whether C{i} depends on C{j}, directly or not."""
        return bool(self.reach[i] >> j & 1)

    def ordered(self, i: int, j: int) -> bool:
        """Whether one of the two depends on the other: they run in sequence."""
        return self.depends(i, j) or self.depends(j, i)

    def topological(self, nodes: Iterable[int]) -> list[int]:
        """
        C{nodes}, dependencies first, and among those ready the highest rank
        first.  The dependencies of every node must be among C{nodes} and
        acyclic.
        """
        inside = set(nodes)
        waiting = {i: len(self.deps[i]) for i in inside}
        ready = [(self.rank[i], i) for i, count in waiting.items() if count == 0]
        heapq.heapify(ready)
        order: list[int] = []
        while ready:
            _, i = heapq.heappop(ready)
            order.append(i)
            for dependent in self.dependents[i]:
                if dependent in inside:
                    waiting[dependent] -= 1
                    if waiting[dependent] == 0:
                        heapq.heappush(ready, (self.rank[dependent], dependent))
        return order

    def spell_cycle(self, members: Sequence[int]) -> str:
        """
        A shortest cycle through the smallest id, as C{a -> b -> a} (C{a}
        depends on C{b}); when that does not go through every member of the
        component, the others are named too.
        """
        start = members[0]
        number = self.component[start]
        came_from: dict[int, int] = {start: start}
        frontier = [start]
        last = start
        while start not in self.deps[last]:
            # The component is strongly connected: the search ends inside it.
            following: list[int] = []
            for i in frontier:
                for d in self.deps[i]:
                    if self.component[d] == number and d not in came_from:
                        came_from[d] = i
                        following.append(d)
                        if start in self.deps[d]:
                            last = d
                            break
                if last != start:
                    break
            frontier = following
        path = [last]
        while path[-1] != start:
            path.append(came_from[path[-1]])
        path.reverse()
        spelled = " -> ".join(self.id(i) for i in [*path, start])
        if len(path) < len(members):
            named = ", ".join(self.id(i) for i in members)
            spelled += f" (and {named} all depend on one another)"
        return spelled


def _rank_key(rec: Recommendation, constraints: Constraints) -> _Key:
    return (
        -constraints.score(rec),
        -AGENT_TYPE_RANK.get(rec.agent_type, 0),
        -rec.priority,
        -_number(rec.estimated_savings),
        -_number(rec.confidence),
        RISK_LEVELS.index(rec.risk_level)
        if rec.risk_level in RISK_LEVELS
        else len(RISK_LEVELS),
        rec.id,
    )


def _number(value: float) -> float:
    """NaN as the lowest value, so that the rank stays a total order."""
    return -math.inf if math.isnan(value) else value


def _strongly_connected(deps: Sequence[Sequence[int]]) -> list[list[int]]:
    """
    Tarjan's algorithm with an explicit stack (a long chain must not exhaust
    Python's recursion limit).  Components come out dependencies first, each
    sorted.
    """
    count = len(deps)
    index = [-1] * count
    low = [0] * count
    on_stack = [False] * count
    stack: list[int] = []
    components: list[list[int]] = []
    counter = 0
    for root in range(count):
        if index[root] != -1:
            continue
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack[root] = True
        work = [(root, 0)]
        while work:
            v, child = work[-1]
            if child < len(deps[v]):
                work[-1] = (v, child + 1)
                w = deps[v][child]
                if index[w] == -1:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack[w] = True
                    work.append((w, 0))
                elif on_stack[w]:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
            if low[v] == index[v]:
                members: list[int] = []
                while True:
                    w = stack.pop()
                    on_stack[w] = False
                    members.append(w)
                    if w == v:
                        break
                components.append(sorted(members))
    return components


def _reach(
    deps: Sequence[Sequence[int]],
    components: Sequence[Sequence[int]],
    component: Sequence[int],
) -> list[int]:
    """
    Who depends on whom, transitively, as one bit set per recommendation: a
    component reaches its dependencies' components and what they reach (and
    itself, when it is a cycle).  Components come dependencies first, so one
    pass does it.
    """
    members = [sum(1 << i for i in group) for group in components]
    reached = [0] * len(components)
    for number, group in enumerate(components):
        mask = 0
        for i in group:
            for d in deps[i]:
                other = component[d]
                # An edge inside the component: a cycle, which reaches itself.
                mask |= members[other] | (0 if other == number else reached[other])
        reached[number] = mask
    return [reached[component[i]] for i in range(len(deps))]


# -- pairwise conflicts --------------------------------------------------------


def _contradiction_table(pairs: Iterable[tuple[str, str]]) -> set[frozenset[str]]:
    """The table, read in either order (an action paired with itself allowed)."""
    return {frozenset(pair) for pair in pairs}


def _pairwise(
    batch: _Batch, contradictions: set[frozenset[str]]
) -> dict[_Pair, dict[str, str]]:
    """
    Every pairwise conflict: C{(i, j)} with C{i < j} -> type -> description.

    Recommendations are indexed by resource, action and resource path, so only
    the pairs that have something in common are looked at.
    """
    recs = batch.recs
    found: defaultdict[_Pair, dict[str, str]] = defaultdict(dict)
    resources = [sorted(set(rec.affected_resources)) for rec in recs]

    by_resource: defaultdict[str, list[int]] = defaultdict(list)
    for i, names in enumerate(resources):
        for name in names:
            by_resource[name].append(i)
    shared: defaultdict[_Pair, list[str]] = defaultdict(list)
    for name, holders in by_resource.items():
        for pair in combinations(holders, 2):  # holders are in index order
            shared[pair].append(name)
    for (i, j), names in shared.items():
        if not batch.ordered(i, j):
            spelled = ", ".join(sorted(names))
            found[i, j][RESOURCE] = (
                f"{batch.id(i)} and {batch.id(j)} both affect {spelled}"
            )

    by_action: defaultdict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(recs):
        by_action[rec.action].append(i)
    for actions in contradictions:
        first, *rest = sorted(actions)
        second = rest[0] if rest else first
        for i in by_action.get(first, ()):
            for j in by_action.get(second, ()):
                if i != j:
                    pair = (min(i, j), max(i, j))
                    found[pair][ACTION] = (
                        f"{batch.id(pair[0])} wants {recs[pair[0]].action} and "
                        f"{batch.id(pair[1])} wants {recs[pair[1]].action}, "
                        "which undo each other"
                    )

    for (i, j), links in _related(batch, resources).items():
        window_i, window_j = recs[i].window, recs[j].window
        if (
            window_i is not None
            and window_j is not None
            and window_i.overlaps(window_j)
            and (i, j) not in shared
            and not batch.ordered(i, j)
        ):
            spelled = ", ".join(f"{mine} ~ {theirs}" for mine, theirs in sorted(links))
            found[i, j][TIMING] = (
                f"{batch.id(i)} and {batch.id(j)} run in overlapping windows on "
                f"related resources: {spelled}"
            )
    return dict(found)


def _related(
    batch: _Batch, resources: Sequence[Sequence[str]]
) -> dict[_Pair, set[tuple[str, str]]]:
    """
    Pairs of windowed recommendations affecting related, distinct resources:
    C{(i, j)} -> {(resource of i, resource of j)}.
    """
    windowed = [i for i, rec in enumerate(batch.recs) if rec.window is not None]
    touching: defaultdict[str, list[int]] = defaultdict(list)
    children: defaultdict[str, defaultdict[str, list[int]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for i in windowed:
        for name in resources[i]:
            touching[name].append(i)
            parent, slash, _ = name.rpartition("/")
            if slash:
                children[parent][name].append(i)
    links: defaultdict[_Pair, set[tuple[str, str]]] = defaultdict(set)

    def link(i: int, mine: str, j: int, theirs: str) -> None:
        if i < j:
            links[i, j].add((mine, theirs))
        elif j < i:
            links[j, i].add((theirs, mine))

    for i in windowed:
        for name in resources[i]:
            for ancestor in _ancestors(name):
                for j in touching.get(ancestor, ()):
                    link(i, name, j, ancestor)
    for siblings in children.values():
        for first, second in combinations(sorted(siblings), 2):
            for i in siblings[first]:
                for j in siblings[second]:
                    link(i, first, j, second)
    return dict(links)


def _ancestors(name: str) -> list[str]:
    """C{"a/b/c"} -> C{["a", "a/b"]}; a name without C{/} has none."""
    found: list[str] = []
    at = name.find("/")
    while at != -1:
        found.append(name[:at])
        at = name.find("/", at + 1)
    return found


# -- who wins ------------------------------------------------------------------


@attrs.frozen
class _Drop:
    """Why a recommendation was dropped, as a phrase following its id."""

    reason: str
    rule: str


def _settle(
    batch: _Batch, pairs: Mapping[_Pair, Mapping[str, str]]
) -> tuple[set[int], dict[int, _Drop]]:
    """The kept recommendations and, for the others, why (see the module)."""
    drops = _broken_dependencies(batch)
    rivals: list[list[int]] = [[] for _ in batch.recs]
    for i, j in pairs:
        rivals[i].append(j)
        rivals[j].append(i)
    candidates = [i for i in range(len(batch.recs)) if i not in drops]
    order = batch.topological(candidates)
    held: set[int] = set()
    while True:
        kept, lost = _greedy(batch, pairs, rivals, candidates, held)
        fallen: set[int] = set()
        for i in order:
            if i in kept and any(d not in kept or d in fallen for d in batch.deps[i]):
                fallen.add(i)
        if not fallen:
            drops.update(lost)
            return kept, drops
        held |= fallen


def _broken_dependencies(batch: _Batch) -> dict[int, _Drop]:
    """Cycle members, dependencies outside the batch, and their dependents."""
    drops: dict[int, _Drop] = {}
    for members in batch.cycles:
        reason = f"is part of a dependency cycle: {batch.spell_cycle(members)}"
        for i in members:
            drops[i] = _Drop(reason, DEPENDENCY)
    for i, missing in enumerate(batch.missing):
        if missing and i not in drops:
            drops[i] = _Drop(
                f"depends on {missing[0]}, which is not in this batch", DEPENDENCY
            )
    doomed = set(drops)
    frontier = list(drops)
    while frontier:
        for dependent in batch.dependents[frontier.pop()]:
            if dependent not in doomed:
                doomed.add(dependent)
                frontier.append(dependent)
    for i in sorted(doomed - drops.keys()):
        culprit = min(d for d in batch.deps[i] if d in doomed)
        drops[i] = _Drop(
            f"depends on {batch.id(culprit)}, which was dropped", DEPENDENCY
        )
    return drops


def _greedy(
    batch: _Batch,
    pairs: Mapping[_Pair, Mapping[str, str]],
    rivals: Sequence[Sequence[int]],
    candidates: Sequence[int],
    held: set[int],
) -> tuple[set[int], dict[int, _Drop]]:
    """
    One pass by rank: keep unless it depends on one dropped or conflicts with
    one kept.  A held-back recommendation waits until its dependencies are
    decided.
    """
    waiting = {i: len(batch.deps[i]) for i in held}
    ready = [(batch.rank[i], i) for i in candidates if waiting.get(i, 0) == 0]
    heapq.heapify(ready)
    decided: dict[int, bool] = {}
    lost: dict[int, _Drop] = {}
    while ready:
        _, i = heapq.heappop(ready)
        failed = [d for d in batch.deps[i] if decided.get(d) is False]
        winners = [j for j in rivals[i] if decided.get(j)]
        if failed:
            lost[i] = _Drop(
                f"depends on {batch.id(min(failed))}, which was dropped", DEPENDENCY
            )
        elif winners:
            lost[i] = _beaten(batch, pairs, i, min(winners, key=batch.rank.__getitem__))
        decided[i] = i not in lost
        for dependent in batch.dependents[i]:
            if dependent in waiting:
                waiting[dependent] -= 1
                if waiting[dependent] == 0:
                    heapq.heappush(ready, (batch.rank[dependent], dependent))
    return {i for i, keep in decided.items() if keep}, lost


def _beaten(
    batch: _Batch, pairs: Mapping[_Pair, Mapping[str, str]], loser: int, winner: int
) -> _Drop:
    """Why C{loser} had to give way to C{winner}, which was kept."""
    kinds = ", ".join(
        kind
        for kind in CONFLICT_TYPES
        if kind in pairs[min(loser, winner), max(loser, winner)]
    )
    name, other = batch.id(loser), batch.id(winner)
    if batch.depends(loser, winner):
        return _Drop(
            f"conflicts with {other} ({kinds}), which it depends on", DEPENDENCY
        )
    if batch.rank[winner] < batch.rank[loser]:
        rule, why = _compare(batch, winner, loser)
        return _Drop(f"lost to {other} ({kinds} conflict): {why}", rule)
    return _Drop(
        f"conflicts with {other} ({kinds}), which was kept first: {name} waited "
        "for its dependencies, one of which was dropped at first",
        DEPENDENCY,
    )


def _compare(batch: _Batch, winner: int, loser: int) -> tuple[str, str]:
    """The first rank criterion on which C{winner} beats C{loser}, in words."""
    w, lo = batch.recs[winner], batch.recs[loser]
    rule = next(
        name
        for name, mine, theirs in zip(
            RULES, batch.keys[winner], batch.keys[loser], strict=True
        )
        if mine != theirs
    )
    if rule == "customer_constraints":
        constraints = batch.constraints
        if w.id in constraints.prefer:
            return rule, f"customer constraints (the customer prefers {w.id})"
        if lo.action in constraints.avoid_actions:
            return rule, f"customer constraints (the customer avoids {lo.action})"
        touched = ", ".join(
            sorted(constraints.protected_resources.intersection(lo.affected_resources))
        )
        return rule, f"customer constraints ({lo.id} touches protected {touched})"
    if rule == "agent_type":
        return rule, f"{_AGENT_ORDER} ({w.agent_type} beats {lo.agent_type})"
    if rule == "priority":
        return rule, f"higher priority ({w.priority} > {lo.priority})"
    if rule == "estimated_savings":
        return rule, (
            f"higher estimated savings ({_show(w.estimated_savings)} > "
            f"{_show(lo.estimated_savings)})"
        )
    if rule == "confidence":
        return rule, (
            f"higher confidence ({_show(w.confidence)} > {_show(lo.confidence)})"
        )
    if rule == "risk_level":
        return rule, f"lower risk ({w.risk_level} < {lo.risk_level})"
    return rule, f"equal on every rule, so the smaller id wins ({w.id} < {lo.id})"


def _show(value: float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


# -- the report ----------------------------------------------------------------


@attrs.frozen
class _Draft:
    """A conflict before it gets its id (ids come last, in the final order)."""

    type: str
    ids: tuple[str, ...]
    text: str
    resolution: str
    kept: tuple[str, ...]
    dropped: tuple[str, ...]
    rule: str

    def conflict(self, conflict_id: str) -> Conflict:
        return Conflict(
            id=conflict_id,
            type=self.type,
            recommendation_ids=self.ids,
            description=self.text,
            severity=SEVERITY[self.type],
            conflicting_field=_FIELDS[self.type],
            resolution=self.resolution,
            kept=self.kept,
            dropped=self.dropped,
            rule=self.rule,
        )


def _pair_conflicts(
    batch: _Batch,
    pairs: Mapping[_Pair, Mapping[str, str]],
    kept: set[int],
    drops: Mapping[int, _Drop],
) -> list[_Draft]:
    """One conflict per pair and type, resolved as the final outcome has it."""
    drafts: list[_Draft] = []
    for (i, j), kinds in pairs.items():
        winner, loser = (i, j) if batch.rank[i] < batch.rank[j] else (j, i)
        rule, why = _compare(batch, winner, loser)
        w, lo = batch.id(winner), batch.id(loser)
        if winner in kept:
            resolution = f"kept {w} over {lo}: {why}"
        elif loser in kept:
            resolution = f"kept {lo} over {w}, which {drops[winner].reason}"
            rule = drops[winner].rule
        else:
            resolution = (
                f"dropped both: {w} {drops[winner].reason}; {lo} {drops[loser].reason}"
            )
        for kind, text in kinds.items():
            drafts.append(
                _Draft(
                    type=kind,
                    ids=(batch.id(i), batch.id(j)),
                    text=text,
                    resolution=resolution,
                    kept=tuple(batch.id(x) for x in (i, j) if x in kept),
                    dropped=tuple(batch.id(x) for x in (i, j) if x not in kept),
                    rule=rule,
                )
            )
    return drafts


def _dependency_conflicts(
    batch: _Batch, kept: set[int], drops: Mapping[int, _Drop]
) -> list[_Draft]:
    """Cycles, dependencies outside the batch, dependencies on dropped ones."""
    drafts: list[_Draft] = []
    for members in batch.cycles:
        ids = tuple(batch.id(i) for i in members)
        drafts.append(
            _Draft(
                type=DEPENDENCY,
                ids=ids,
                text=f"dependency cycle: {batch.spell_cycle(members)}",
                resolution=f"dropped {', '.join(ids)}: a dependency cycle cannot be "
                "ordered",
                kept=(),
                dropped=ids,
                rule=DEPENDENCY,
            )
        )
    for i, missing in enumerate(batch.missing):
        name = batch.id(i)
        for absent in missing:
            drafts.append(
                _Draft(
                    type=DEPENDENCY,
                    ids=(name,),
                    text=f"{name} depends on {absent}, which is not in this batch",
                    resolution=f"dropped {name}: it depends on {absent}, which is not "
                    "in this batch",
                    kept=(),
                    dropped=(name,),
                    rule=DEPENDENCY,
                )
            )
    for i, deps in enumerate(batch.deps):
        for d in deps:
            if d in kept or batch.component[d] == batch.component[i]:
                continue
            # A kept recommendation's dependencies are all kept: i was dropped.
            name, other = batch.id(i), batch.id(d)
            ids = (name, other) if i < d else (other, name)
            drafts.append(
                _Draft(
                    type=DEPENDENCY,
                    ids=ids,
                    text=f"{name} depends on {other}, which was dropped",
                    resolution=f"dropped {name}: it depends on {other}, which "
                    f"{drops[d].reason}",
                    kept=(),
                    dropped=ids,
                    rule=DEPENDENCY,
                )
            )
    return drafts
