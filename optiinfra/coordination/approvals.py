"""
Approvals: who must agree before a risky change goes ahead, and for how long
the question stays open.  Pure rules; the coordinator stores the results.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import attrs

from optiinfra.coordination.model import Recommendation
from optiinfra.errors import Conflict

PENDING: Final = "pending"
APPROVED: Final = "approved"
REJECTED: Final = "rejected"
EXPIRED: Final = "expired"
APPROVAL_STATUSES: Final = (PENDING, APPROVED, REJECTED, EXPIRED)

#: The platform's defaults: how long a question stays open, by risk.
DEFAULT_EXPIRY: Final[Mapping[str, float]] = {
    "medium": 48 * 3600.0,
    "high": 24 * 3600.0,
    "critical": 4 * 3600.0,
}


@attrs.frozen
class ApprovalPolicy:
    """Which risks need people, how many, and for how long they may think."""

    expiry: Mapping[str, float] = DEFAULT_EXPIRY
    #: Distinct people who must approve a critical change.
    critical_approvers: int = 2

    def needs_approval(self, rec: Recommendation) -> bool:
        return rec.risk_level in self.expiry

    def required(self, rec: Recommendation) -> int:
        return self.critical_approvers if rec.risk_level == "critical" else 1


@attrs.frozen
class Decision:
    """One person's word on an approval."""

    user_id: str
    approved: bool
    at: float
    reason: str | None = None


@attrs.frozen
class Approval:
    """A risky recommendation waiting for people, or what they decided."""

    id: str
    coordination_id: str
    customer_id: str
    recommendation: Recommendation
    required: int
    created_at: float
    expires_at: float
    execute_now: bool = False
    status: str = PENDING
    decisions: tuple[Decision, ...] = ()
    decided_at: float | None = None
    plan_id: str | None = None
    #: Recommendations of the same coordination whose plans must run first.
    after: tuple[str, ...] = ()
    version: int = 0

    def status_at(self, now: float) -> str:
        """Expiry shows on read, even before the sweep records it."""
        if self.status == PENDING and now >= self.expires_at:
            return EXPIRED
        return self.status

    @property
    def approved_by(self) -> tuple[str, ...]:
        return tuple(d.user_id for d in self.decisions if d.approved)


def new_approval(
    approval_id: str,
    coordination_id: str,
    rec: Recommendation,
    policy: ApprovalPolicy,
    execute_now: bool,
    after: tuple[str, ...],
    now: float,
) -> Approval:
    return Approval(
        id=approval_id,
        coordination_id=coordination_id,
        customer_id=rec.customer_id,
        recommendation=rec,
        required=policy.required(rec),
        created_at=now,
        expires_at=now + policy.expiry[rec.risk_level],
        execute_now=execute_now,
        after=after,
    )


def _open(approval: Approval, now: float) -> None:
    status = approval.status_at(now)
    if status != PENDING:
        raise Conflict(
            f"approval is already {status}", approval_id=approval.id, status=status
        )


def approve(approval: Approval, user_id: str, now: float) -> Approval:
    """
    Record C{user_id}'s approval; the approval is granted once enough
    different people have approved.

    @raise Conflict: already decided or expired, or this person already approved.
    """
    _open(approval, now)
    if user_id in approval.approved_by:
        raise Conflict(
            f"{user_id} has already approved; another person must",
            approval_id=approval.id,
            status=approval.status,
        )
    decisions = (*approval.decisions, Decision(user_id, True, now))
    granted = sum(d.approved for d in decisions) >= approval.required
    return attrs.evolve(
        approval,
        decisions=decisions,
        status=APPROVED if granted else PENDING,
        decided_at=now if granted else None,
    )


def reject(approval: Approval, user_id: str, reason: str, now: float) -> Approval:
    """One person's rejection is final.  @raise Conflict: as for L{approve}."""
    _open(approval, now)
    return attrs.evolve(
        approval,
        decisions=(*approval.decisions, Decision(user_id, False, now, reason)),
        status=REJECTED,
        decided_at=now,
    )


def expire(approval: Approval) -> Approval:
    """The approval as the sweep records it: expired when its time ran out."""
    return attrs.evolve(approval, status=EXPIRED, decided_at=approval.expires_at)
