"""Recommendations, conflicts, approvals and plans: the coordination vocabulary."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import attrs

RISK_LEVELS: Final = ("low", "medium", "high", "critical")

#: Conflict types, as the contract names them.
RESOURCE: Final = "resource"
ACTION: Final = "action"
DEPENDENCY: Final = "dependency"
TIMING: Final = "timing"
CONFLICT_TYPES: Final = (RESOURCE, ACTION, DEPENDENCY, TIMING)

#: Actions that undo each other; read in either order.
CONTRADICTORY_ACTIONS: Final[tuple[tuple[str, str], ...]] = (
    ("scale_up", "scale_down"),
    ("scale_up", "terminate"),
    ("scale_down", "add_capacity"),
    ("migrate_to_spot", "migrate_to_on_demand"),
    ("migrate_to_spot", "reserve_instances"),
    ("increase_batch_size", "decrease_batch_size"),
    ("enable_caching", "disable_caching"),
)

#: Who wins a conflict, after customer constraints: quality first, cost last.
AGENT_TYPE_RANK: Final[Mapping[str, int]] = {
    "application": 4,
    "performance": 3,
    "resource": 2,
    "cost": 1,
}


@attrs.frozen
class Window:
    """When a recommendation would run, in seconds since the epoch."""

    start: float
    end: float

    def overlaps(self, other: Window) -> bool:
        return self.start < other.end and other.start < self.end


@attrs.frozen
class Recommendation:
    """One agent's proposed change, as the contract shapes it."""

    id: str
    agent_type: str
    action: str
    risk_level: str = "low"
    agent_id: str = ""
    customer_id: str = ""
    type: str = ""
    title: str = ""
    description: str = ""
    estimated_savings: float = 0.0
    estimated_impact: Any = None
    affected_resources: tuple[str, ...] = ()
    parameters: Mapping[str, Any] = attrs.field(factory=dict)
    dependencies: tuple[str, ...] = ()
    priority: int = 5
    confidence: float = 0.0
    created_at: float | None = None
    expires_at: float | None = None
    status: str = "pending"
    metadata: Mapping[str, Any] = attrs.field(factory=dict)
    #: Optional; recommendations on related resources in overlapping windows
    #: conflict on timing.
    window: Window | None = None


@attrs.frozen
class Constraints:
    """
    What the customer asked for in the request's C{metadata.constraints}: the
    first rule of every resolution.
    """

    #: Recommendation ids the customer wants kept.
    prefer: frozenset[str] = frozenset()
    #: Actions the customer does not want.
    avoid_actions: frozenset[str] = frozenset()
    #: Resources the customer does not want touched.
    protected_resources: frozenset[str] = frozenset()

    def score(self, rec: Recommendation) -> int:
        """2 preferred, 0 against the customer's wishes, 1 otherwise."""
        if rec.id in self.prefer:
            return 2
        if rec.action in self.avoid_actions or self.protected_resources.intersection(
            rec.affected_resources
        ):
            return 0
        return 1


@attrs.frozen
class Conflict:
    """Two or more recommendations that cannot all go ahead."""

    id: str
    type: str
    recommendation_ids: tuple[str, ...]
    description: str
    severity: str
    conflicting_field: str
    resolution: str
    #: The ids kept and dropped by this conflict's resolution.
    kept: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    #: The rule that decided: "customer_constraints", "agent_type", "priority",
    #: "estimated_savings", "confidence", "risk_level", "tie_break", or for
    #: dependency problems "dependency".
    rule: str = ""


@attrs.frozen
class Resolution:
    """What coordination decided for a batch."""

    conflicts: tuple[Conflict, ...]
    #: Kept recommendations, dependencies first.
    kept: tuple[Recommendation, ...]
    #: Dropped recommendation id -> why, in words.
    dropped: Mapping[str, str]
