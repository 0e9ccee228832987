"""
Recommendations, conflicts, approvals and plans as the API shows them: the
contract's field names, times in RFC 3339.
"""

from __future__ import annotations

from typing import Any

from optiinfra.coordination.approvals import Approval
from optiinfra.coordination.model import Conflict, Recommendation
from optiinfra.coordination.plans import Plan, Step
from optiinfra.timefmt import rfc3339_ms, rfc3339_ms_or_none


def recommendation_view(
    rec: Recommendation, status: str | None = None
) -> dict[str, Any]:
    """C{status}, when given, is what became of it since it was stored."""
    return {
        "id": rec.id,
        "agent_id": rec.agent_id,
        "agent_type": rec.agent_type,
        "customer_id": rec.customer_id,
        "type": rec.type,
        "title": rec.title,
        "description": rec.description,
        "action": rec.action,
        "risk_level": rec.risk_level,
        "estimated_savings": rec.estimated_savings,
        "estimated_impact": rec.estimated_impact,
        "affected_resources": list(rec.affected_resources),
        "parameters": rec.parameters,
        "dependencies": list(rec.dependencies),
        "priority": rec.priority,
        "confidence": rec.confidence,
        "created_at": rfc3339_ms_or_none(rec.created_at),
        "expires_at": rfc3339_ms_or_none(rec.expires_at),
        "status": status or rec.status,
        "metadata": rec.metadata,
        "window": None
        if rec.window is None
        else {
            "start": rfc3339_ms(rec.window.start),
            "end": rfc3339_ms(rec.window.end),
        },
    }


def conflict_view(conflict: Conflict, at: float) -> dict[str, Any]:
    return {
        "id": conflict.id,
        "type": conflict.type,
        "recommendation_ids": list(conflict.recommendation_ids),
        "description": conflict.description,
        "severity": conflict.severity,
        "conflicting_field": conflict.conflicting_field,
        "detected_at": rfc3339_ms_or_none(at),
        "resolved": True,
        "resolution": conflict.resolution,
        "resolved_at": rfc3339_ms_or_none(at),
        "kept": list(conflict.kept),
        "dropped": list(conflict.dropped),
        "rule": conflict.rule,
    }


def approval_view(approval: Approval, now: float) -> dict[str, Any]:
    rejection = next((d for d in approval.decisions if not d.approved), None)
    status = approval.status_at(now)
    return {
        "id": approval.id,
        "coordination_id": approval.coordination_id,
        "customer_id": approval.customer_id,
        "recommendation_id": approval.recommendation.id,
        "recommendation": recommendation_view(approval.recommendation, status),
        "risk_level": approval.recommendation.risk_level,
        "status": status,
        "required_approvals": approval.required,
        "approved_by": list(approval.approved_by),
        "decisions": [
            {
                "user_id": d.user_id,
                "decision": "approved" if d.approved else "rejected",
                "at": rfc3339_ms_or_none(d.at),
                "reason": d.reason,
            }
            for d in approval.decisions
        ],
        "rejected_by": None if rejection is None else rejection.user_id,
        "rejection_reason": None if rejection is None else rejection.reason,
        "created_at": rfc3339_ms_or_none(approval.created_at),
        "expires_at": rfc3339_ms_or_none(approval.expires_at),
        "decided_at": rfc3339_ms_or_none(approval.decided_at),
        "execute_now": approval.execute_now,
        "plan_id": approval.plan_id,
    }


def _step_view(step: Step) -> dict[str, Any]:
    return {
        "index": step.index,
        "task_type": step.task_type,
        "agent_type": step.agent_type,
        "critical": step.critical,
        "reversible": step.reversible,
        "rollback_task_type": step.rollback_task_type,
        "timeout_seconds": step.timeout_seconds,
        "status": step.status,
        "task_id": step.task_id,
        "rollback_task_id": step.rollback_task_id,
        "started_at": rfc3339_ms_or_none(step.started_at),
        "completed_at": rfc3339_ms_or_none(step.completed_at),
        "result": step.result,
        "error": step.error,
    }


def plan_view(plan: Plan) -> dict[str, Any]:
    return {
        "id": plan.id,
        "coordination_id": plan.coordination_id,
        "customer_id": plan.customer_id,
        "recommendation_id": plan.recommendation.id,
        "action": plan.recommendation.action,
        "status": plan.status,
        "steps": [_step_view(step) for step in plan.steps],
        "after": list(plan.after),
        "requested_at": rfc3339_ms_or_none(plan.requested_at),
        "created_at": rfc3339_ms_or_none(plan.created_at),
        "started_at": rfc3339_ms_or_none(plan.started_at),
        "completed_at": rfc3339_ms_or_none(plan.completed_at),
        "error": plan.error,
    }
